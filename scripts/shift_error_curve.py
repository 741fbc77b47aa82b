"""The pattern-shift error, step by step, after each switch: mean over the switches and seeds of
one or more finished program-shift run folders. Separates how far a model is off at once (what it
recalls) from how long it takes to get the rest back (what the recovery measure counts).

    python scripts/shift_error_curve.py RUN [RUN ...] [--steps 16] [--first]

Reads each seed's ``errors`` (relative error at every step, measured before that step's update),
``switches`` and ``order`` from ``seeds/seed-NN.json``; nothing is recomputed. By default only
switches to a program seen before (recurring); ``--first`` takes the first appearances instead.
Prints one row per run: the mean error at offsets 0 .. steps-1 after the switch, and their sum.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def switch_segments(record: dict, steps: int, recurring: bool = True) -> list[list[float]]:
    """The ``steps`` errors that follow each switch (the stream's start counts as the first
    program's first appearance) to a recurring program (or, ``recurring=False``, to a new one)."""
    errors, order = record["errors"], record["order"]
    starts = [0] + list(record["switches"])
    if len(order) != len(starts):
        raise ValueError(f"{len(order)} programs in 'order' but {len(starts)} segments")
    seen: set[int] = set()
    segments = []
    for program, start in zip(order, starts):
        if (program in seen) == recurring and start + steps <= len(errors):
            segments.append(errors[start:start + steps])
        seen.add(program)
    return segments


def curve(folder: Path, steps: int, recurring: bool = True) -> tuple[list[float], int]:
    """Mean error at each offset over every qualifying switch of every seed, and how many switches."""
    files = sorted((folder / "seeds").glob("seed-*.json"))
    if not files:
        raise SystemExit(f"shift_error_curve: {folder} has no seeds/seed-*.json: is it a finished program-shift run?")
    segments = []
    for path in files:
        record = json.loads(path.read_text())
        if "errors" not in record:
            raise SystemExit(f"shift_error_curve: {path} has no 'errors': is {folder} a program-shift run?")
        segments += switch_segments(record, steps, recurring)
    if not segments:
        raise SystemExit(f"shift_error_curve: {folder} has no switch followed by {steps} steps")
    return [sum(s[i] for s in segments) / len(segments) for i in range(steps)], len(segments)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--steps", type=int, default=16, help="steps after each switch (default 16)")
    parser.add_argument("--first", action="store_true", help="first appearances instead of recurring programs")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    kind = "first appearance" if args.first else "recurring program"
    print(f"mean relative error at each step after a switch to a {kind} (offset 0 = the switch)")
    for run in args.runs:
        values, count = curve(run, args.steps, recurring=not args.first)
        print(f"{run.name}: {' '.join(f'{v:.2f}' for v in values)}  (sum {sum(values):.2f}; {count} switches)")


if __name__ == "__main__":
    main(sys.argv[1:])
