"""The ``neurocoder`` command."""

from __future__ import annotations

import argparse
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
    except (DataSetMissing, FileExistsError, ValueError) as error:
        print(f"neurocoder: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("neurocoder: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
