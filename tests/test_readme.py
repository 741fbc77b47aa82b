import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert (tmp_path / "head.safetensors").is_file()
    assert namespace["usage"]["3"].shape == (10, 50)
    assert namespace["model"][3].num_programs == 58
    assert namespace["model"][3].memory.frozen_slots == [0, 1, 2]


def test_readme_names_the_commands_it_documents():
    text = README.read_text()
    for command in ("make setup", "make demo", "make test", "make bench", "neurocoder data download",
                    "neurocoder info"):
        assert command in text
    makefile = (README.parent / "Makefile").read_text()
    for target in ("setup:", "demo:", "test:", "bench:"):
        assert target in makefile
    assert "make test" in (README.parent / ".ci" / "run").read_text()


def _markdown_files():
    root = README.parent
    return [README, *sorted((root / "docs").rglob("*.md"))]


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation other than '-' and '_' dropped, spaces
    to hyphens; a repeated heading gets -1, -2, ..."""
    anchors, seen = set(), {}
    for line in path.read_text().splitlines():
        match = re.match(r"#{1,6}\s+(.*)", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _dead_links(pages) -> list[str]:
    broken = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):          # http:, https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            resolved = (page.parent / path_part).resolve() if path_part else page
            if not resolved.exists():
                broken.append(f"{page.name} ({page.parent.name}/): {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{page.name} ({page.parent.name}/): {target} (no such heading)")
    return broken


def test_relative_links_in_readme_and_docs_resolve():
    """Every relative link (file, folder, or #anchor) of README.md and docs/**/*.md points at
    something that exists: text moved between files must not leave dead links behind."""
    broken = _dead_links(_markdown_files())
    assert not broken, "dead links:\n" + "\n".join(broken)


def test_dead_link_check_finds_missing_files_and_headings(tmp_path):
    (tmp_path / "other.md").write_text("# A heading, with punctuation\n## Twice\n## Twice\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#a-heading-with-punctuation) [ok](other.md#twice-1) [ok](#local)\n"
                    "# Local\n[gone](missing.md) [bad](other.md#nowhere) [web](https://x.org/y)\n"
                    "```\n[in code](ignored.md)\n```\n")
    assert _dead_links([page]) == [f"page.md ({tmp_path.name}/): missing.md (no such file)",
                                   f"page.md ({tmp_path.name}/): other.md#nowhere (no such heading)"]
