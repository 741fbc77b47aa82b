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


def test_a_damaged_run_file_is_named_with_what_to_do(tmp_path):
    """A finished seed's file or a run's config.json that is not valid JSON (cut short or edited
    outside the run) gives an error naming the file and the remedy, not a bare decoder message;
    deleting the seed's file and resuming runs that seed again."""
    from neurocoder.runs import RunFolder
    from neurocoder.train.programs import ProgramConfig, run_programs

    cfg = ProgramConfig(task="reuse", model="mlp", seeds=2, epochs=1)
    out = tmp_path / "run"
    first = run_programs(cfg, out, quiet=True)
    seed_file = out / "seeds" / "seed-01.json"
    seed_file.write_text('{"unseen_error": 0.1')
    with pytest.raises(ValueError, match=r"seed-01\.json is not valid JSON .*delete it and resume to run that seed again"):
        run_programs(cfg, out, resume=True, quiet=True)
    seed_file.unlink()
    again = run_programs(cfg, out, resume=True, quiet=True)
    assert again["summary"] == first["summary"]
    (out / "config.json").write_text("{")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON .*start a new run folder"):
        RunFolder.start(out, {"kind": "programs"}, 0, resume=True)


def test_a_run_older_than_a_setting_resumes_as_that_setting_s_default(tmp_path):
    """A run folder recorded before a setting existed (here routing_lr_scale, session 17) resumes:
    the missing setting compares as its default, the behaviour the run had; another value is
    still refused."""
    import json

    from neurocoder.train.programs import ProgramConfig, run_programs

    cfg = ProgramConfig(task="reuse", model="mlp", seeds=2, epochs=1)
    out = tmp_path / "run"
    first = run_programs(ProgramConfig(task="reuse", model="mlp", seeds=1, epochs=1), out, quiet=True)
    record = json.loads((out / "config.json").read_text())
    del record["config"]["routing_lr_scale"]
    (out / "config.json").write_text(json.dumps(record))
    (out / "results.json").unlink()
    with pytest.raises(ValueError, match=r"differs from the one in .* in \['seeds'\]"):
        run_programs(cfg, out, resume=True, quiet=True)
    resumed = run_programs(ProgramConfig(task="reuse", model="mlp", seeds=1, epochs=1), out, resume=True, quiet=True)
    assert resumed["summary"] == first["summary"]
    with pytest.raises(ValueError, match=r"in \['routing_lr_scale'\]"):
        run_programs(ProgramConfig(task="reuse", model="mlp", seeds=1, epochs=1, routing_lr_scale=0.5), out,
                     resume=True, quiet=True)
