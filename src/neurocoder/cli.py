"""The ``neurocoder`` command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from ._version import __version__


def _demo(args: argparse.Namespace) -> int:
    from .experiments.demo import DemoConfig, run_demo

    cfg = DemoConfig(epochs=args.epochs, seed=args.seed, train_limit=args.train_limit, data_dir=args.data_dir,
                     preset=args.preset)
    out = args.out or Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    run_demo(cfg, out)
    return 0


def _data(args: argparse.Namespace) -> int:
    from .data.sources import cache_dir, download_dataset

    target = Path(args.into) if args.into else cache_dir() / args.name
    download_dataset(args.name, target, base_url=args.base_url)
    print(f"{args.name}: files verified in {target}")
    return 0


def _info(args: argparse.Namespace) -> int:
    """What this install has: versions, threads, devices, the C++ kernels, data sets, extras."""
    import importlib.metadata
    import platform

    import torch

    from . import native
    from .data.sources import DATASETS, locate_dataset

    if args.build:
        try:
            native.build()
        except Exception as error:  # noqa: BLE001 - reported below, as the kernels' state
            native._state["error"] = error

    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "missing"

    print(f"neurocoder {__version__}, Python {platform.python_version()}, torch {torch.__version__}, "
          f"numpy {version('numpy')}, safetensors {version('safetensors')}")
    print(f"  CPU: {torch.get_num_threads()} thread(s) for PyTorch, vector capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        print(f"  CUDA: {torch.cuda.device_count()} device(s): {names}")
    else:
        print("  CUDA: not available (everything runs on the CPU)")
    print(f"  C++ CPU kernels: {native.describe()}")
    # Read from the environment, without importing Triton (neurocoder.triton_layer reads the same).
    triton_version = version("triton")
    if triton_version == "missing":
        gpu_kernels = "Triton not installed (pip install 'neurocoder[gpu]'); CUDA runs the fused layer's ATen path"
    else:
        switched_on = os.environ.get("NEUROCODER_TRITON", "0") == "1"
        gpu_kernels = (f"Triton {triton_version}; " + ("in use for CUDA tensors (NEUROCODER_TRITON=1)" if switched_on
                       else "off until switched on (NEUROCODER_TRITON=1): not yet timed on a GPU"))
    print(f"  Triton GPU kernels: {gpu_kernels}")
    print("data sets:")
    for name in DATASETS:
        where = locate_dataset(name)
        print(f"  {name:<14} {where or 'missing; install: ' + DATASETS[name]['install']}")
    print("optional packages (experiments: pip install -e '.[experiments,rl]'; make setup installs them):")
    for package in ("matplotlib", "mnist1d", "minatar", "gymnasium", "ale-py"):
        print(f"  {package:<14} {version(package)}")
    return 1 if args.build and native._state["error"] is not None else 0


def _list(args: argparse.Namespace) -> int:
    from .experiments.backbones import BACKBONES, VARIANTS, variants_for
    from .experiments.models import MODEL_VARIANTS
    from .experiments.registry import PRESETS
    from .train.strategies import STRATEGIES

    print("presets (neurocoder run PRESET [--set key=value ...]):")
    for name, (description, _) in PRESETS.items():
        print(f"  {name:<22} {description}")
    print("\nstrategies (--set strategy=NAME; naive takes --set optimizer=adam|sgd|adagrad):")
    print("  " + ", ".join(STRATEGIES))
    print("\nmodels (--set model=NAME):")
    for name, description in MODEL_VARIANTS.items():
        print(f"  {name:<22} {description}")
    print("\nclassify-* presets: backbones (--set backbone=NAME) and the variants each offers (--set variant=NAME):")
    for name, (_, description) in BACKBONES.items():
        print(f"  {name:<22} {description}; variants: {', '.join(variants_for(name))}")
    for name, description in VARIANTS.items():
        print(f"  {name:<22} {description}")
    from .experiments.program_models import PROGRAM_MODELS
    print("\nprogram-* presets: models (--set model=NAME):")
    for name, description in PROGRAM_MODELS.items():
        print(f"  {name:<22} {description}")
    from .train.rl.ppo import AGENT_VARIANTS
    print("\nminatar-*, atari-*, gym presets: agent variants (--set variant=NAME):")
    for name, description in AGENT_VARIANTS.items():
        print(f"  {name:<22} {description}")
    return 0


def _default_out(preset: str, cfg) -> Path:
    """The run folder when --out is not given: runs/<what the run is>."""
    from .train.classification import ClassificationConfig
    from .train.programs import ProgramConfig
    from .train.rl.ppo import PPOConfig

    if isinstance(cfg, PPOConfig):
        return Path("runs") / f"{cfg.env.replace(':', '-').replace('/', '-')}-{cfg.variant}"
    if isinstance(cfg, ProgramConfig):
        return Path("runs") / f"{preset}-{cfg.model}"
    if isinstance(cfg, ClassificationConfig):
        return Path("runs") / f"{preset}-{cfg.backbone}-{cfg.variant}"
    return Path("runs") / f"{preset}-{cfg.strategy}{'-' + cfg.optimizer if cfg.strategy == 'naive' else ''}-{cfg.model}"


def _recorded_config(preset: str, cfg, out: Path):
    """For ``--resume``: the settings recorded in ``out``, so that ``neurocoder run PRESET --resume
    --out DIR`` continues a run whatever --set flags started it (``--set`` flags given with
    ``--resume`` apply on top). A folder without a run is left to the trainer, whose error says so."""
    path = out / "config.json"
    if not path.is_file():
        return cfg
    try:
        saved = json.loads(path.read_text())["config"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"--resume: {path} is not a run's config ({error}); it may be damaged: start a new "
                         f"run folder, or repeat the run's --set flags after restoring the file") from None
    if saved.get("preset", preset) != preset:
        raise ValueError(f"--resume: {out} holds a run of preset {saved['preset']!r}, not {preset!r}; "
                         f"run `neurocoder run {saved['preset']} --resume --out {out}`")
    names = {field.name for field in dataclasses.fields(cfg)}
    # A setting the run predates takes the value the code then behaved as (e.g. EWC's Fisher average).
    legacy = {key: value for key, value in getattr(cfg, "LEGACY", {}).items() if key not in saved}
    return dataclasses.replace(cfg, **legacy, **{key: value for key, value in saved.items() if key in names})


def _run(args: argparse.Namespace) -> int:
    from .experiments.registry import apply_overrides, make_config
    from .runs import remove_if_unstarted
    from .train.classification import ClassificationConfig, run_classification
    from .train.continual import run_continual
    from .train.programs import ProgramConfig, run_programs

    from .train.rl.ppo import PPOConfig, run_ppo

    cfg = make_config(args.preset, args.set)
    out = Path(args.out) if args.out else _default_out(args.preset, cfg)
    if args.resume:
        # The recorded settings, then this command's --set flags: `--resume --set threads=1`
        # continues the run on one thread; a --set that changes the method is refused by the
        # trainer's check that the config matches the folder's.
        cfg = _recorded_config(args.preset, make_config(args.preset), out)
        if args.set:
            cfg = apply_overrides(cfg, args.set)
    trainer = (run_ppo if isinstance(cfg, PPOConfig) else run_programs if isinstance(cfg, ProgramConfig)
               else run_classification if isinstance(cfg, ClassificationConfig) else run_continual)
    # A folder this command creates and that fails before any progress (an option only the model's
    # constructor checks, missing data) is removed, so the corrected command needs no --resume.
    fresh = not args.resume and not (out.exists() and any(out.iterdir()))
    try:
        trainer(cfg, out, resume=args.resume, preset=args.preset)
    except BaseException as error:
        if fresh:
            remove_if_unstarted(out)
        if isinstance(error, KeyboardInterrupt) and out.is_dir():
            print(f"neurocoder: {out} keeps what was done; continue it with "
                  f"`neurocoder run {args.preset} --out {out} --resume`", file=sys.stderr)
        raise
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import continual_tables, load_runs, write_report
    from .report_classification import classification_tables
    from .report_programs import program_tables
    from .report_rl import rl_tables

    runs = load_runs(args.runs)
    print(continual_tables(runs) + classification_tables(runs) + program_tables(runs) + rl_tables(runs))
    if args.out:
        path = write_report(runs, args.out)
        print(f"\nreport with figures: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neurocoder", description="Neurocoder experiments")
    parser.add_argument("--version", action="version", version=f"neurocoder {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="plain MLP vs Neurocoder MLP on Fashion-MNIST, with what it read")
    demo.add_argument("--epochs", type=int, default=3)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--preset", default="default", help="layer preset: default or released")
    demo.add_argument("--train-limit", type=int, default=None, help="use only the first N training images")
    demo.add_argument("--data-dir", default=None, help="folder with the IDX files")
    demo.add_argument("--out", default=None, help="run folder (default runs/demo-<time>)")
    demo.set_defaults(func=_demo)

    info = commands.add_parser("info", help="versions, threads, devices, C++ kernels, data sets on this machine")
    info.add_argument("--build", action="store_true", help="build (or load) the C++ CPU kernels first")
    info.set_defaults(func=_info)

    lister = commands.add_parser("list", help="named experiment presets, strategies and models")
    lister.set_defaults(func=_list)

    run = commands.add_parser("run", help="run an experiment preset into a run folder")
    run.add_argument("preset")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value (repeatable), e.g. --set strategy=ewc --set repeats=3")
    run.add_argument("--out", default=None, help="run folder (default runs/PRESET-STRATEGY-MODEL)")
    run.add_argument("--resume", action="store_true",
                     help="continue an interrupted run in --out (without --set: with the settings it recorded)")
    run.set_defaults(func=_run)

    report = commands.add_parser("report", help="tables and figures from run folders (no recomputation)")
    report.add_argument("runs", nargs="+", help="run folders, or folders holding run folders (at any depth)")
    report.add_argument("--out", default=None, help="also write report.md and figures here")
    report.set_defaults(func=_report)

    data = commands.add_parser("data", help="data sets")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    download = data_commands.add_parser("download", help="download a data set (online users) with checksums")
    download.add_argument("name", choices=["mnist", "fashion-mnist"])
    download.add_argument("--into", default=None, help="folder (default the cache, ~/.cache/neurocoder/NAME)")
    download.add_argument("--base-url", default=None, help="mirror to download from")
    download.set_defaults(func=_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .data.sources import DataSetMissing

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DataSetMissing, FileExistsError, FileNotFoundError, ValueError) as error:
        print(f"neurocoder: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("neurocoder: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:             # output piped into `head` and the like, which stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
