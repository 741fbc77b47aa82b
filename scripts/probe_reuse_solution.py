"""Probe (issue 5, reuse): is composing a program as the sum of its cued pieces out of a
Neurocoder layer's reach, or out of training's?

Builds by hand a layer that composes every program of the reuse task exactly: 7 slots (one per
piece, one empty), 6 components (one per piece), learned one-hot keys, a fixed sharpness.
Component r's query points at slot r when the cue names piece r and at the empty slot otherwise,
so what a component reads depends on one cue entry only, and an unseen combination is composed
as well as a seen one. The script reports that layer's error, then trains it with the table's
protocol (Adam 3e-3, batch 64, 60 epochs, orthogonality weight as given) from that start
perturbed by Gaussian noise of each size, and from a random start of the same configuration.
The tasks and seeds are the table's (seed index i: task 100 + i, model seed i).

    python scripts/probe_reuse_solution.py --seeds 4 --noise 0 0.1 0.3 [--orthogonality-weight 0.1]
"""

from __future__ import annotations

import argparse
import math

import torch

from neurocoder.data.programs import reuse_task
from neurocoder.experiments.program_models import ProgramModel, build_program_model
from neurocoder.train.programs import ProgramConfig, _fit, _relative_error

LAYER = dict(num_programs=7, rank=6, key_mode="learned")


def build_layer(sharpness: float = 20.0) -> ProgramModel:
    """The configuration the hand-built solution uses, randomly initialised."""
    return build_program_model("nc-ff", 8, 8, 6, {**LAYER, "sharpness": sharpness})


@torch.no_grad()
def hand_built(task: dict, sharpness: float = 20.0, off_weight: float = 0.3) -> ProgramModel:
    """A layer whose composed weight is sum_{j in cue} a_j b_j^T for every cue of ``task``.

    y = sum_r sigma_r v_r (u_r . x): component r reads slot r (u = b_r / sigma_r, v = a_r) when
    cue r is on, and the empty slot (u = v = 0) when it is off. Every S value is softplus^-1(1),
    so the ordered singular values are sigma_r = R - r (r = 0..R-1), divided out of u_r.
    """
    a, b = task["pieces"]
    pieces, dim = a.shape
    model = build_layer(sharpness)
    memory, head = model.layer.memory, model.layer.composer.head.linear
    key_dim = memory.u_keys.shape[1]
    empty = pieces                                                  # the last slot
    one_hot = torch.eye(key_dim)[:pieces + 1]
    for keys in (memory.u_keys, memory.v_keys, memory.s_keys):
        keys.copy_(one_hot)
    memory.s_values.fill_(math.log(math.e - 1.0))                   # softplus(s) = 1
    rank = pieces
    memory.u_values.zero_()
    memory.v_values.zero_()
    for r in range(pieces):
        memory.u_values[r] = b[r] / (rank - r)
        memory.v_values[r] = a[r]
    head.weight.zero_()
    head.bias.zero_()
    model.layer.bias.zero_()
    # Head columns are laid out (bank, component, key): banks U, V, S.
    for bank in range(2):
        for r in range(rank):
            column = (bank * rank + r) * key_dim
            for cue in range(pieces):
                if cue == r:
                    head.weight[column + r, cue] = 1.0
                else:
                    head.weight[column + empty, cue] = off_weight
    for r in range(rank):                                           # S: every slot holds the same value
        head.bias[(2 * rank + r) * key_dim] = 1.0
    return model


def trained_errors(model: ProgramModel, task: dict, seed: int, orthogonality_weight: float,
                   epochs: int = 60) -> tuple[float, float]:
    cfg = ProgramConfig(task="reuse", orthogonality_weight=orthogonality_weight, epochs=epochs)
    _fit(model, task["train"], cfg, torch.Generator().manual_seed(seed + 7))
    return _relative_error(model, task["test_seen"]), _relative_error(model, task["test_unseen"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4, help="seed indices 0..N-1 (tasks 100..)")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.1, 0.3],
                        help="std of the Gaussian noise added to every parameter of the hand-built start")
    parser.add_argument("--orthogonality-weight", type=float, default=0.1)
    parser.add_argument("--sharpness", type=float, default=20.0)
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args(argv)
    rows = {}
    for index in range(args.seeds):
        task = reuse_task(100 + index)
        exact = hand_built(task, args.sharpness)
        rows.setdefault("hand-built, untrained", []).append(
            (_relative_error(exact, task["test_seen"]), _relative_error(exact, task["test_unseen"])))
        for noise in args.noise:
            torch.manual_seed(index)
            model = hand_built(task, args.sharpness)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(noise * torch.randn_like(p))
            rows.setdefault(f"hand-built + noise {noise:g}, trained", []).append(
                trained_errors(model, task, index, args.orthogonality_weight, args.epochs))
        torch.manual_seed(index)
        rows.setdefault("random start, trained", []).append(
            trained_errors(build_layer(args.sharpness), task, index, args.orthogonality_weight, args.epochs))
        print(f"seed {index} done", flush=True)
    print(f"\nreuse task, {args.seeds} seeds; layer {LAYER}, sharpness {args.sharpness:g}, "
          f"orthogonality weight {args.orthogonality_weight:g}, {args.epochs} epochs")
    print("| start | error, seen combinations | error, unseen combinations | unseen, per seed |")
    print("|---|---|---|---|")
    for name, values in rows.items():
        seen, unseen = (torch.tensor(column, dtype=torch.float64) for column in zip(*values))
        spread = lambda t: f"{t.mean():.4f} +- {t.std() if len(t) > 1 else 0.0:.4f}"  # noqa: E731
        print(f"| {name} | {spread(seen)} | {spread(unseen)} | {', '.join(f'{v:.3f}' for v in unseen)} |")


if __name__ == "__main__":
    main()
