"""The quadratic penalty of EWC-style strategies: per-term form against the combined form, side by side.

    python benchmarks/bench_strategies.py [--models mlp neurocoder-released] [--terms 4] [--repeats 30]
                                          [--threads 1] [--out FILE]

For each model of the split-MNIST protocol (domain-incremental: one 2-way head, 32x32 inputs),
builds an EWC strategy holding ``--terms`` terms (EWC after the last task of split MNIST holds
4) and times, rounds interleaved, on a batch of 128:

- ``penalty per-term``: forward and backward of :func:`per_term_penalty` alone (as the project
  computed it before session 12: each term, each parameter tensor);
- ``penalty combined``: the same for :meth:`QuadraticPenalty.penalty` (one flat vector);
- ``step``: a whole training step (forward, loss, orthogonality, penalty, backward, Adam) with
  each form, and with no penalty at all (Adam naive);
- ``step, gradient added``: the step the continual trainer takes since session 27: the penalty
  left out of the loss, its gradient added after backward
  (:meth:`QuadraticPenalty.add_penalty_gradient`).

It prints medians and ratios, and checks that both forms give the same value and gradients
(relative error), so a speed-up is never one of a different penalty.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import neurocoder  # noqa: E402
from neurocoder.experiments.models import build_mlp  # noqa: E402
from neurocoder.train.strategies import STRATEGIES  # noqa: E402
from neurocoder.train.strategies.base import parameters_of, per_term_penalty  # noqa: E402


def make_strategy(model, terms: int, generator: torch.Generator):
    """EWC with ``terms`` terms: importances like squared gradients (some exact zeros, as an
    unused head's), anchors near the current parameters."""
    strategy = STRATEGIES["ewc"](model)
    params = parameters_of(model)
    for _ in range(terms):
        importance, anchor = {}, {}
        for n, p in params.items():
            g = torch.randn(p.shape, generator=generator) * 1e-2
            importance[n] = (g ** 2) * (torch.rand(p.shape, generator=generator) > 0.1)
            anchor[n] = p.detach() + 1e-2 * torch.randn(p.shape, generator=generator)
        strategy.terms.append({"importance": importance, "anchor": anchor})
    return strategy


def gradients(model, value) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    value.backward()
    return torch.cat([p.grad.reshape(-1) for p in parameters_of(model).values()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "neurocoder-released", "neurocoder"])
    parser.add_argument("--terms", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="also write the figures as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s), "
          f"{args.terms} EWC terms, batch 128, {args.repeats} interleaved rounds; medians in ms")
    report = {"torch": torch.__version__, "threads": args.threads, "terms": args.terms, "models": {}}
    for variant in args.models:
        torch.manual_seed(0)
        generator = torch.Generator().manual_seed(0)
        model = build_mlp(variant, 1024, 1, 2)
        strategy = make_strategy(model, args.terms, generator)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        x, y = torch.randn(128, 1024, generator=generator), torch.randint(0, 2, (128,), generator=generator)
        heads = torch.zeros(128, dtype=torch.long)

        reference, combined = per_term_penalty(strategy), strategy.penalty()
        value_error = abs(float(combined.detach()) - float(reference.detach())) / abs(float(reference.detach()))
        g_ref, g_new = gradients(model, reference), gradients(model, combined)
        grad_error = float((g_new - g_ref).norm() / g_ref.norm())
        model.zero_grad(set_to_none=True)
        strategy.add_penalty_gradient()
        g_added = torch.cat([p.grad.reshape(-1) for p in parameters_of(model).values()])
        added_error = float((g_added - g_ref).norm() / g_ref.norm())

        def penalty_only(form):
            def run():
                model.zero_grad(set_to_none=True)
                form().backward()
            return run

        def train_step(form, add_gradient=False):
            def run():
                loss = F.cross_entropy(model(x, heads), y) + neurocoder.regularization(model)
                if form is not None:
                    loss = loss + form()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if add_gradient:
                    strategy.add_penalty_gradient()
                optimizer.step()
            return run

        state = {n: p.detach().clone() for n, p in model.named_parameters()}
        cases = {"penalty per-term": penalty_only(lambda: per_term_penalty(strategy)),
                 "penalty combined": penalty_only(strategy.penalty),
                 "step, no penalty": train_step(None),
                 "step, per-term": train_step(lambda: per_term_penalty(strategy)),
                 "step, combined": train_step(strategy.penalty),
                 "step, gradient added": train_step(None, add_gradient=True)}
        times = {name: [] for name in cases}
        for name, run in cases.items():   # warm-up
            run()
        for _ in range(args.repeats):
            for name, run in cases.items():
                start = time.perf_counter()
                run()
                times[name].append(1000 * (time.perf_counter() - start))
        with torch.no_grad():   # the steps moved the model: put it back (nothing later reads it)
            for n, p in model.named_parameters():
                p.copy_(state[n])
        medians = {name: statistics.median(t) for name, t in times.items()}
        size = sum(p.numel() for p in parameters_of(model).values())
        print(f"\n{variant}: {size:,} parameters in {len(parameters_of(model))} tensors; combined vs per-term: "
              f"value rel. error {value_error:.1e}, gradient rel. error {grad_error:.1e} "
              f"(added gradient: {added_error:.1e})")
        for name, median in medians.items():
            print(f"  {name:18s} {median:8.2f}")
        penalty_ratio = medians["penalty per-term"] / medians["penalty combined"]
        step_ratio = medians["step, per-term"] / medians["step, combined"]
        overhead = (medians["step, combined"] - medians["step, no penalty"]) / medians["step, no penalty"]
        added_overhead = (medians["step, gradient added"] - medians["step, no penalty"]) / medians["step, no penalty"]
        added_ratio = medians["step, combined"] / medians["step, gradient added"]
        print(f"  penalty alone {penalty_ratio:.1f}x faster combined; training step {step_ratio:.2f}x faster; "
              f"the combined penalty adds {100 * overhead:.0f}% to a naive step")
        print(f"  gradient added: training step {added_ratio:.2f}x faster than combined; "
              f"adds {100 * added_overhead:.0f}% to a naive step")
        report["models"][variant] = {"parameters": size, "tensors": len(parameters_of(model)),
                                     "median_ms": medians, "penalty_speedup": penalty_ratio,
                                     "step_speedup": step_ratio, "added_gradient_speedup": added_ratio,
                                     "added_gradient_rel_error": added_error, "value_rel_error": value_error,
                                     "gradient_rel_error": grad_error}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
