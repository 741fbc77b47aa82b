"""Pool the repeats of continual-learning run sets made with different seeds, and give each
method's gap between two models with its standard error.

    python scripts/pool_repeats.py results/r1-full results/r1-full-seed1 results/r1-full-seed2
        [--model neurocoder-released] [--reference mlp] [--reference-sets SET ...]

Each SET is a folder of run folders named ``<method>-<model>`` (as ``scripts/reproduce_r1.sh``
writes them); every repeat's final average accuracy is read from its ``results.json``
(``final_average_accuracy.values``), nothing is recomputed. For each method present with both
models in every set: the gap per set, and over all repeats pooled, mean(model) - mean(reference)
+- sqrt(var(model) / n_model + var(reference) / n_reference).

``--reference-sets`` takes the reference model's run folders from other sets, one per SET in the
same order (the same seeds): for a model run again with another option while the reference's
runs, which the option does not touch, stay where they are.
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


def pool(sets: list[Path], model: str, reference: str, reference_sets: list[Path] | None = None) -> list[dict]:
    """One row per method found with both models in every set, in the first set's order (the
    reference's folders from ``reference_sets``, paired with ``sets`` in order, when given)."""
    reference_sets = reference_sets or sets
    if len(reference_sets) != len(sets):
        raise ValueError(f"{len(reference_sets)} reference sets for {len(sets)} sets: give one per set, in the same order")
    methods = sorted(p.name[:-len(model) - 1] for p in sets[0].iterdir()
                     if p.is_dir() and p.name.endswith("-" + model))
    rows = []
    for method in methods:
        if not all((s / f"{method}-{model}").is_dir() and (r / f"{method}-{reference}").is_dir()
                   for s, r in zip(sets, reference_sets)):
            continue
        per_set, pooled_model, pooled_reference = [], [], []
        for s, rs in zip(sets, reference_sets):
            m, r = read_values(s / f"{method}-{model}"), read_values(rs / f"{method}-{reference}")
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
    parser.add_argument("--reference-sets", nargs="+", type=Path, default=None,
                        help="where the reference's run folders are, one set per SET in the same order "
                             "(default: the SETs themselves)")
    args = parser.parse_args(argv)
    for s in args.sets + (args.reference_sets or []):
        if not s.is_dir():
            raise SystemExit(f"pool_repeats: {s} is not a folder of run folders")
    if args.reference_sets is not None and len(args.reference_sets) != len(args.sets):
        raise SystemExit(f"pool_repeats: {len(args.reference_sets)} --reference-sets for {len(args.sets)} sets; "
                         f"give one per set, in the same order (the same seeds)")
    rows = pool(args.sets, args.model, args.reference, args.reference_sets)
    if not rows:
        raise SystemExit(f"pool_repeats: no method has both '-{args.model}' and '-{args.reference}' run folders "
                         f"in every set given" + (" (the reference's in --reference-sets)" if args.reference_sets else ""))
    names = [s.name for s in args.sets]
    print(f"gap = {args.model} - {args.reference}, final average accuracy (points)")
    print("| method | " + " | ".join(f"gap, {n}" for n in names) + " | pooled gap +- standard error | repeats |")
    print("|---|" + "---|" * (len(names) + 2))
    for row in rows:
        cells = " | ".join(f"{g:+.2f}" for g in row["per_set"])
        print(f"| {row['method']} | {cells} | {row['gap']:+.2f} +- {row['standard_error']:.2f} | {row['repeats']} |")


if __name__ == "__main__":
    main(sys.argv[1:])
