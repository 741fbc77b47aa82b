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
    for command in ("make setup", "make demo", "make test", "make bench", "neurocoder data download"):
        assert command in text
    makefile = (README.parent / "Makefile").read_text()
    for target in ("setup:", "demo:", "test:", "bench:"):
        assert target in makefile
    assert "make test" in (README.parent / ".ci" / "run").read_text()
