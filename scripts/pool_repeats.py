"""Pool the repeats of continual-learning run sets made with different seeds, and give each
method's gap between two models with its standard error.

    python scripts/pool_repeats.py results/r1-full results/r1-full-seed1 results/r1-full-seed2
        [--model neurocoder-released] [--reference mlp]

Each SET is a folder of run folders named ``<method>-<model>`` (as ``scripts/reproduce_r1.sh``
writes them); every repeat's final average accuracy is read from its ``results.json``
(``final_average_accuracy.values``), nothing is recomputed. For each method present with both
models in every set: the gap per set, and over all repeats pooled, mean(model) - mean(reference)
+- sqrt(var(model) / n_model + var(reference) / n_reference).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path


def read_values(folder: Path) -> list[float]:
    """Every repeat's final average accuracy of one run folder."""
    path = folder / "results.json"
    try:
        values = json.loads(path.read_text())["final_average_accuracy"]["values"]
    except FileNotFoundError:
        raise SystemExit(f"pool_repeats: {path} is missing: is {folder} a finished continual-learning run?")
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise SystemExit(f"pool_repeats: {path} has no final_average_accuracy.values ({error}); "
                         f"rerun that folder with --resume to finish it")
    return [float(v) for v in values]


def gap(model: list[float], reference: list[float]) -> tuple[float, float]:
    """(mean(model) - mean(reference), its standard error); one repeat alone gives no spread."""
    difference = statistics.mean(model) - statistics.mean(reference)
    if len(model) < 2 or len(reference) < 2:
        return difference, float("nan")
    return difference, math.sqrt(statistics.variance(model) / len(model)
                                 + statistics.variance(reference) / len(reference))


def pool(sets: list[Path], model: str, reference: str) -> list[dict]:
    """One row per method found with both models in every set, in the first set's order."""
    methods = sorted(p.name[:-len(model) - 1] for p in sets[0].iterdir()
                     if p.is_dir() and p.name.endswith("-" + model))
    rows = []
    for method in methods:
        if not all((s / f"{method}-{model}").is_dir() and (s / f"{method}-{reference}").is_dir() for s in sets):
            continue
        per_set, pooled_model, pooled_reference = [], [], []
        for s in sets:
            m, r = read_values(s / f"{method}-{model}"), read_values(s / f"{method}-{reference}")
            per_set.append(gap(m, r)[0])
            pooled_model += m
            pooled_reference += r
        difference, error = gap(pooled_model, pooled_reference)
        rows.append({"method": method, "per_set": per_set, "gap": difference, "standard_error": error,
                     "repeats": len(pooled_model)})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sets", nargs="+", type=Path, help="folders of <method>-<model> run folders")
    parser.add_argument("--model", default="neurocoder-released")
    parser.add_argument("--reference", default="mlp")
    args = parser.parse_args(argv)
    for s in args.sets:
        if not s.is_dir():
            raise SystemExit(f"pool_repeats: {s} is not a folder of run folders")
    rows = pool(args.sets, args.model, args.reference)
    if not rows:
        raise SystemExit(f"pool_repeats: no method has both '-{args.model}' and '-{args.reference}' run folders "
                         f"in every set given")
    names = [s.name for s in args.sets]
    print(f"gap = {args.model} - {args.reference}, final average accuracy (points)")
    print("| method | " + " | ".join(f"gap, {n}" for n in names) + " | pooled gap +- standard error | repeats |")
    print("|---|" + "---|" * (len(names) + 2))
    for row in rows:
        cells = " | ".join(f"{g:+.2f}" for g in row["per_set"])
        print(f"| {row['method']} | {cells} | {row['gap']:+.2f} +- {row['standard_error']:.2f} | {row['repeats']} |")


if __name__ == "__main__":
    main(sys.argv[1:])
