"""Run folders: one folder per run holding its config, seed, code version, metrics and results.

Reports read run folders; they never recompute. Files are written atomically (a temporary file,
then a rename), so an interrupted run never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ._version import __version__

__all__ = ["RunFolder", "start_seeded_run", "changed_settings", "code_version", "atomic_write_text",
           "atomic_torch_save", "remove_if_unstarted", "read_json", "finished_seeds"]


def code_version() -> dict:
    """The library version, and the git commit (with a dirty flag) when run from a checkout."""
    info = {"neurocoder": __version__, "torch": torch.__version__, "python": platform.python_version()}
    root = Path(__file__).resolve().parents[2]
    if (root / "src" / "neurocoder" / "runs.py").resolve() != Path(__file__).resolve():
        # An installed copy (site-packages): the folder above it may be some other project's
        # checkout, whose commit says nothing about this code.
        return info
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10)
            info["git_dirty"] = bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def changed_settings(cfg: Any, names: tuple[str, ...] | list[str]) -> str:
    """``"name=value, ..."`` for those of ``names`` where the config ``cfg`` (a dataclass instance)
    differs from its class's default ('' if none): settings a run would ignore are named with it."""
    default = type(cfg)()
    return ", ".join(f"{n}={getattr(cfg, n)!r}" for n in names if getattr(cfg, n) != getattr(default, n))


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_json(path: str | os.PathLike, remedy: str) -> Any:
    """A run folder's JSON file, or a ValueError that names the file and ``remedy`` (what to do
    about it) when it is not valid JSON: these files are written atomically, so a damaged one was
    edited or cut short outside the run, and a raw decoder message would name neither."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); {remedy}") from error


def finished_seeds(out: str | os.PathLike) -> list[dict]:
    """The ``seeds/seed-NN.json`` records of a run folder, in seed order."""
    return [read_json(p, "delete it and resume to run that seed again")
            for p in sorted((Path(out) / "seeds").glob("seed-*.json"))]


def atomic_torch_save(obj: Any, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class RunFolder:
    """A run's folder: ``config.json``, ``metrics.jsonl``, ``results.json``, ``checkpoints/``."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, path: str | os.PathLike, config: dict, seed: int, exist_ok: bool = False) -> "RunFolder":
        path = Path(path)
        if path.exists() and any(path.iterdir()) and not exist_ok:
            raise FileExistsError(f"run folder {path} already exists and is not empty; pass another --out, "
                                  f"or --resume to continue it")
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        record = {"config": config, "seed": seed, "code_version": code_version(),
                  "command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write_text(path / "config.json", json.dumps(record, indent=2, default=str))
        return run

    @classmethod
    def start(cls, path: str | os.PathLike, config: dict, seed: int, resume: bool,
              ignore: tuple[str, ...] = ("threads",), write: bool = True,
              defaults: dict | None = None) -> "RunFolder":
        """A new run folder (``resume=False``), or the existing one to continue (``resume=True``),
        after checking that its recorded config equals ``config`` except for the ``ignore`` keys
        (settings that do not change results, such as thread counts). ``write=False``: only open
        it (the other processes of a distributed run). ``defaults``: the config class's defaults; a
        setting the recorded config lacks (the run predates it) compares as its default, the value
        the code behaved as before the setting existed."""
        path = Path(path)
        if resume:
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"--resume: {path} holds no run (no config.json); start it without --resume")
            saved = read_json(path / "config.json", "the run's recorded settings are lost: start a new run "
                              "folder")["config"]
            recorded = {**(defaults or {}), **saved}
            changed = sorted(k for k in config if k not in ignore and recorded.get(k) != config[k])
            if changed:
                raise ValueError(f"--resume: the config differs from the one in {path} in {changed}; resume with "
                                 f"the same settings, or start a new run folder")
            check_same_data(path, saved.get("data"), config.get("data"))
            return cls(path)
        return cls.create(path, config, seed) if write else cls(path)

    def log(self, **metrics) -> None:
        with open(self.path / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(metrics, default=float) + "\n")

    def metrics(self) -> list[dict]:
        file = self.path / "metrics.jsonl"
        if not file.exists():
            return []
        return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]

    def write_results(self, results: dict) -> None:
        atomic_write_text(self.path / "results.json", json.dumps(results, indent=2, default=float))

    def results(self) -> dict:
        return json.loads((self.path / "results.json").read_text())

    def config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())


def start_seeded_run(cfg: Any, kind: str, out: str | os.PathLike, resume: bool, preset: str | None,
                     quiet: bool) -> tuple[RunFolder, Path, dict, Any]:
    """The start every single-process trainer that writes one file per seed to ``out/seeds/``
    shares: check ``cfg`` (a dataclass with ``check()``, ``seed`` and ``threads``), set the thread
    count, and open the run folder with its config recorded as ``{"kind", "preset", **cfg}``
    (defaults from ``type(cfg)()``, so a resumed older run compares a newer setting as its default).
    Returns (run folder, its path, the config recorded, ``say``: print, or a no-op when ``quiet``)."""
    from dataclasses import asdict

    cfg.check()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(out)
    config = {"kind": kind, "preset": preset, **asdict(cfg)}
    run = RunFolder.start(out, config, cfg.seed, resume, defaults=asdict(type(cfg)()))
    (out / "seeds").mkdir(exist_ok=True)
    say = (lambda *a: None) if quiet else print
    return run, out, config, say


def remove_if_unstarted(path: str | os.PathLike) -> bool:
    """Remove a run folder that holds nothing but its ``config.json`` and empty folders: a run that
    failed before its first metric, checkpoint or result (a bad option found when the model is
    built, missing data), so that the corrected command can use the same folder without
    ``--resume``. Anything else in it is progress and is kept. Returns whether it was removed."""
    path = Path(path)
    if not path.is_dir():
        return False
    files = [p for p in path.rglob("*") if not p.is_dir()]
    if any(p.relative_to(path) != Path("config.json") for p in files):
        return False
    shutil.rmtree(path)
    return True


def check_same_data(path: Path, started: dict | None, now: dict | None) -> None:
    """A resumed run must continue on the data it started on (the same sample counts, and the full
    files or the npm subset alike); which ``data_source`` setting found it is not compared."""
    if not started or not now:
        return
    keys = ("train_samples", "test_samples", "subset")
    if any(started.get(k) != now.get(k) for k in keys):
        hint = ("add --set data_source=npm-subset (the 10,000 npm digits it was started on)" if started.get("subset")
                else "add --set data_source=idx, with the data it was started on installed")
        raise ValueError(f"--resume: {path} was started on {started.get('source')} ({started.get('train_samples')} "
                         f"training samples); this machine now gives {now.get('source')} "
                         f"({now.get('train_samples')}). To finish it on its own data, {hint}; or start a new run "
                         f"folder")
