"""The pattern-shift stream's reference predictor: no learning, the fitted map applied directly.

    python scripts/shift_fit_reference.py --streams 39100-39119 40100-40119 [--history 2] [--pooled]
    python scripts/shift_fit_reference.py --streams 41100-41104 --pooled --affine --spread 2.0

At every step it predicts the next state as M x_t, where M is :func:`shift_fit` of the window
(pooled over the batch's parallel sequences with ``--pooled``, as ``shift_context=fit-pooled``
gives it to a model; with ``--affine`` the map has an offset, M x_t + b, as
``fit-pooled-affine`` gives it, for the streams with centres, ``--spread``), and scores it
exactly as ``neurocoder run program-shift`` scores a model: the relative error measured per step, the same recovery rule (steps until the 10-step moving
average is under 0.1) and the same first-meeting / recurring split. It is the floor a model given
that context can reach by applying it, so a model's recovery is read against it: near it, the model
uses its context as well as it can be used; far above it, the context is there but not used.
Streams are task seeds (a run folder's ``task_seeds`` in results.json).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from neurocoder.data.programs import shift_stream
from neurocoder.train.programs import _recovery, shift_fit


def parse_streams(texts: list[str]) -> list[int]:
    """'39100-39119' and '39105' -> the task seeds they name."""
    seeds = []
    for text in texts:
        low, _, high = text.partition("-")
        try:
            seeds.extend(range(int(low), int(high or low) + 1))
        except ValueError:
            raise SystemExit(f"shift_fit_reference: --streams {text!r} is not a seed or a range like 39100-39119")
    return seeds


def reference(seed: int, history: int, pooled: bool, centre_spread: float = 0.0, affine: bool = False) -> dict:
    """Recovery and error figures of the fitted map applied directly, on one stream."""
    stream = shift_stream(seed, centre_spread=centre_spread, history=history)
    dim = stream.states.shape[-1]
    errors = []
    for t in range(len(stream.program)):
        window, target = stream.window(t)                                  # (B, H d), (B, d)
        state = window[:, -dim:]                                           # (B, d)
        if affine:
            state = torch.cat([state, state.new_ones(state.shape[0], 1)], dim=1)   # (B, d + 1)
        fitted = shift_fit(window, dim, pooled=pooled, affine=affine).unflatten(1, (dim, state.shape[1]))
        prediction = torch.einsum("bij,bj->bi", fitted, state)            # (B, d): M x_t (+ b)
        errors.append((((prediction - target) ** 2).mean() / target.pow(2).mean()).item())
    seen: set[int] = set()
    first, recurring = [], []
    for start in [0] + stream.switches:
        program = int(stream.program[start])
        (recurring if program in seen else first).append(_recovery(errors, start, stream.segment))
        seen.add(program)
    return {"recovery_first": statistics.mean(first), "recovery_recurring": statistics.mean(recurring),
            "final_error": statistics.mean(errors[-50:])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", nargs="+", required=True, help="task seeds: 39100-39119 or single seeds")
    parser.add_argument("--history", type=int, default=2, help="states in the window (the run's shift_history)")
    parser.add_argument("--pooled", action="store_true", help="one fit over the batch (shift_context=fit-pooled)")
    parser.add_argument("--affine", action="store_true", help="fit an offset too (shift_context=fit-pooled-affine)")
    parser.add_argument("--spread", type=float, default=0.0, help="shift_centre_spread (0: the table's stream)")
    args = parser.parse_args(argv)
    if args.history < 2:
        raise SystemExit("shift_fit_reference: --history must be at least 2 (a fit needs one pair of states)")
    rows = [reference(seed, args.history, args.pooled, args.spread, args.affine) for seed in parse_streams(args.streams)]
    label = ("fit-pooled" if args.pooled else "fit") + ("-affine" if args.affine else "")
    print(f"{label}, H = {args.history}, spread {args.spread}, {len(rows)} streams (mean +- std over streams):")
    for key in ("recovery_first", "recovery_recurring", "final_error"):
        values = [row[key] for row in rows]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"  {key:20s} {statistics.mean(values):.4g} +- {spread:.3g}")


if __name__ == "__main__":
    main()
