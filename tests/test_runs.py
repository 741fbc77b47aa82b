"""Run folders' provenance: which code version a run records."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import neurocoder
from neurocoder.runs import code_version

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs a git checkout")
def test_a_checkout_records_its_commit():
    info = code_version()
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert info["git_commit"] == head and isinstance(info["git_dirty"], bool)
    assert info["neurocoder"] == neurocoder.__version__


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_an_installed_copy_does_not_record_the_commit_of_the_project_around_it(tmp_path):
    # A user's project under git, with the package installed in its virtual environment.
    project = tmp_path / "project"
    site = project / ".venv" / "lib" / "python3" / "site-packages"
    shutil.copytree(Path(neurocoder.__file__).parent, site / "neurocoder",
                    ignore=shutil.ignore_patterns("__pycache__"))
    git = ["git", "-C", str(project), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], check=True)
    (project / "notes.txt").write_text("x")
    subprocess.run(git + ["add", "notes.txt"], check=True)
    subprocess.run(git + ["commit", "-qm", "theirs"], check=True)
    probe = "from neurocoder.runs import code_version; import json; print(json.dumps(code_version()))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}).stdout
    assert '"neurocoder"' in out and "git_commit" not in out
