"""Compare two run folders seed by seed: the mean paired difference of one per-seed figure, its
standard error, and how often each side is lower.

    python scripts/paired_seeds.py RUN_A RUN_B [--key recovery_recurring]
    python scripts/paired_seeds.py RUN_A,RUN_A2 RUN_B,RUN_B2 --key final_return

A side given as several folders, comma-separated (say, seeds 0-2 and seeds 3000-3002 of one
setting, run apart), pools their seeds; a seed found in two folders of one side is refused.

Both folders must hold ``seeds/seed-NN.json`` files (as every ``neurocoder run`` writes them)
with the recorded ``seed`` and the figure ``--key``; seeds are matched by that recorded value, so
two runs made with the same ``seed`` and ``seeds`` settings compare the same streams or data
(for example program-shift: each seed is one stream both models see). The difference is A - B
per seed; a lower figure is better for recovery steps and errors. Nothing is recomputed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path


def read_seeds(folder: Path, key: str, tasks: dict[int, int] | None = None) -> dict[int, float]:
    """{recorded seed: figure} for every finished seed of one run folder; ``tasks``, when given,
    collects {recorded seed: recorded task_seed} (program runs record which task a seed ran on)."""
    files = sorted((folder / "seeds").glob("seed-*.json"))
    if not files:
        raise SystemExit(f"paired_seeds: {folder} has no seeds/seed-*.json: is it a run folder with a finished seed?")
    values = {}
    for path in files:
        try:
            record = json.loads(path.read_text())
            values[int(record["seed"])] = float(record[key])
            if tasks is not None and "task_seed" in record:
                tasks[int(record["seed"])] = int(record["task_seed"])
        except json.JSONDecodeError as error:
            raise SystemExit(f"paired_seeds: {path} is not valid JSON ({error}); rerun that folder with --resume")
        except KeyError as error:
            raise SystemExit(f"paired_seeds: {path} has no {error.args[0]!r} (figures there: "
                             f"{', '.join(k for k in record if not isinstance(record[k], list))})")
    return values


def read_side(spec: str, key: str, tasks: dict[int, int] | None = None) -> dict[int, float]:
    """{recorded seed: figure} over one side's folders (``DIR`` or ``DIR,DIR,...``)."""
    values: dict[int, float] = {}
    for part in spec.split(","):
        folder_values = read_seeds(Path(part), key, tasks)
        twice = sorted(set(values) & set(folder_values))
        if twice:
            raise SystemExit(f"paired_seeds: seed(s) {twice} appear in two folders of one side ({spec}); "
                             f"pool only folders made with different --set seed values")
        values.update(folder_values)
    return values


def paired(a: dict[int, float], b: dict[int, float]) -> dict:
    """Over the seeds both have: mean of a - b, its standard error, and the counts a < b, a > b."""
    common = sorted(set(a) & set(b))
    if not common:
        raise SystemExit("paired_seeds: the two folders share no seed (make both runs with the same "
                         "--set seed=N and --set seeds=M)")
    differences = [a[s] - b[s] for s in common]
    error = statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else float("nan")
    return {"seeds": len(common), "mean_a": statistics.mean(a[s] for s in common),
            "mean_b": statistics.mean(b[s] for s in common), "difference": statistics.mean(differences),
            "standard_error": error, "a_lower": sum(d < 0 for d in differences),
            "b_lower": sum(d > 0 for d in differences), "only_one": len(set(a) ^ set(b))}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a", help="run folder, or several comma-separated (their seeds pooled)")
    parser.add_argument("run_b", help="the same for the other side")
    parser.add_argument("--key", default="recovery_recurring", help="the per-seed figure to compare")
    args = parser.parse_args(argv)
    tasks_a: dict[int, int] = {}
    tasks_b: dict[int, int] = {}
    a, b = read_side(args.run_a, args.key, tasks_a), read_side(args.run_b, args.key, tasks_b)
    # A seed is one task only if both folders ran it on the same one: program runs written before
    # session 23 ran task 100 + index whatever the seed, so a seed can name two tasks.
    mismatched = sorted(s for s in set(tasks_a) & set(tasks_b) if tasks_a[s] != tasks_b[s])
    if mismatched:
        raise SystemExit(f"paired_seeds: seed(s) {mismatched} ran on different tasks in the two sides (task_seed "
                         f"{[tasks_a[s] for s in mismatched]} against {[tasks_b[s] for s in mismatched]}); "
                         f"pair only runs made with the same code's seeds")
    row = paired(a, b)
    print(f"{args.key}, {row['seeds']} seeds both have"
          + (f" ({row['only_one']} seeds in one folder only, left out)" if row["only_one"] else "") + ":")
    print(f"  A {args.run_a}: {row['mean_a']:.3f}")
    print(f"  B {args.run_b}: {row['mean_b']:.3f}")
    print(f"  A - B = {row['difference']:+.3f} +- {row['standard_error']:.3f} (standard error of the paired "
          f"difference); A lower on {row['a_lower']}, B lower on {row['b_lower']}, "
          f"equal on {row['seeds'] - row['a_lower'] - row['b_lower']}")
    return row


if __name__ == "__main__":
    main(sys.argv[1:])
