"""The fused layer's Triton kernels on a GPU, against nn.Linear and the fast path's ATen
operations, side by side in one process.

    python benchmarks/bench_triton.py [--repeats 30] [--blocks 5] [--out FILE]

Needs CUDA and Triton (on a CPU it says so and exits 0). At the released shape (batch 128,
1024 -> 400, P = 50, r = 10, k = 5, content keys) it times a forward+backward of:
nn.Linear(1024, 400); NeurocoderLinear's fast path (neurocoder.fused._FusedLayer, ~77 kernels);
the same layer through neurocoder.triton_layer (switched on for the call), with the products with
V inside the read kernels (the default) and as two GEMMs. Rows:
- as benchmarks/bench_layers.py times them (gradients accumulate across steps);
- with the gradients set to None before each step, as ``optimizer.zero_grad()`` does in a
  training loop (accumulating adds one kernel per parameter: 2 for nn.Linear, 10 here);
- with the input requiring its gradient (a hidden layer);
- against batch size;
and the number of GPU kernels each step launches (torch.profiler). Checks first that the Triton
step's output and gradients match the fast path's (float32 tolerances).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import neurocoder  # noqa: E402
from bench_layers import block_ratios, time_in_blocks, time_side_by_side, train_step  # noqa: E402
from neurocoder import NeurocoderLinear, presets, triton_layer  # noqa: E402
from neurocoder.fused import functions_behind  # noqa: E402
from neurocoder.runs import code_version  # noqa: E402


def with_triton(module: nn.Module, fold: bool = True):
    """``module``'s forward with the Triton kernels switched on (the backward follows the forward);
    ``fold``: the products with V inside the read kernels, or as GEMMs."""
    def run(x):
        before = dict(triton_layer._state)
        triton_layer.set_enabled(True)
        triton_layer.set_fold_output_products(fold)
        try:
            return module(x)
        finally:
            triton_layer._state.update(before)
    return run


def fresh_grads(fn, module: nn.Module):
    """``fn`` with ``module``'s gradients set to None first, as a training loop's zero_grad does."""
    def run(x):
        module.zero_grad(set_to_none=True)
        return fn(x)
    return run


def kernels_per_step(fn, x) -> int:
    """GPU kernels launched by one forward+backward (after a warm-up call)."""
    from torch.profiler import ProfilerActivity, profile
    train_step(fn, x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        train_step(fn, x)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def check_against_fast_path(layer: NeurocoderLinear, x: torch.Tensor, fold: bool) -> float:
    """Largest relative difference of the output and every gradient, Triton step against fast path."""
    results = []
    for fn in (with_triton(layer, fold), layer):
        layer.zero_grad(set_to_none=True)
        y = fn(x)
        took = "TritonFusedLayerBackward" in functions_behind(y)
        assert took == (fn is not layer), f"the Triton kernels {'were' if took else 'were not'} taken"
        y.square().mean().backward()
        results.append([y.detach()] + [p.grad.clone() for p in layer.parameters() if p.grad is not None])
    layer.zero_grad(set_to_none=True)
    worst = 0.0
    for got, want in zip(*results):
        worst = max(worst, ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item())
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30, help="interleaved rounds per block")
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/triton-cuda.json")
    args = parser.parse_args()
    if not torch.cuda.is_available() or not triton_layer.available():
        print("bench_triton: needs a CUDA device and Triton (pip install triton); nothing timed")
        return 0
    device = torch.device("cuda")
    torch.manual_seed(0)
    B, d_in, d_out = 128, 1024, 400
    dense = nn.Linear(d_in, d_out).to(device)
    layer = NeurocoderLinear(d_in, d_out, bias=False, **presets.layer_options("released")).to(device)
    x = torch.randn(B, d_in, device=device)
    results: dict = {"device_name": torch.cuda.get_device_name(device), "torch": torch.__version__,
                     "triton": __import__("triton").__version__, "neurocoder": neurocoder.__version__,
                     "code_version": code_version(), "repeats": args.repeats, "blocks": args.blocks, "cases": {}}
    for fold in (True, False):
        worst = check_against_fast_path(layer, x, fold)
        results[f"largest_relative_difference_to_fast_path{'' if fold else '_products_as_gemms'}"] = worst
        print(f"Triton step{'' if fold else ' (products with V as GEMMs)'} against the fast path: largest relative "
              f"difference {worst:.2e} (output and gradients)")
    triton_copy = copy.deepcopy(layer)

    def report(name, times, per_block):
        base = "nn.Linear(1024, 400)"
        ratios = {k: v / times[base] for k, v in times.items()}
        spread = {k: block_ratios(per_block, k, base) for k in times}
        results["cases"][name] = {"seconds": times, "ratio_to_nn.Linear": ratios, "ratio_by_block": spread}
        print(f"\n== {name}")
        for k, v in times.items():
            blocks = ", ".join(f"{r:.2f}" for r in spread[k])
            print(f"  {k:<34} {v * 1e3:8.3f} ms  {ratios[k]:6.2f}x nn.Linear   (blocks {blocks})")

    contenders = {"nn.Linear(1024, 400)": dense, "NeurocoderLinear, fast path": layer,
                  "NeurocoderLinear, Triton kernels": with_triton(triton_copy),
                  "Triton, products with V as GEMMs": with_triton(copy.deepcopy(layer), fold=False)}
    times, per_block = time_in_blocks(contenders, x, args.repeats, device, args.blocks, warm_calls=1)
    report("released shape, batch 128 (gradients accumulate, as bench_layers.py)", times, per_block)

    copies = {name: copy.deepcopy(m) for name, m in (("dense", dense), ("fast", layer), ("triton", layer),
                                                      ("unfolded", layer))}
    fresh = {"nn.Linear(1024, 400)": fresh_grads(copies["dense"], copies["dense"]),
             "NeurocoderLinear, fast path": fresh_grads(copies["fast"], copies["fast"]),
             "NeurocoderLinear, Triton kernels": fresh_grads(with_triton(copies["triton"]), copies["triton"]),
             "Triton, products with V as GEMMs": fresh_grads(with_triton(copies["unfolded"], fold=False),
                                                            copies["unfolded"])}
    times, per_block = time_in_blocks(fresh, x, args.repeats, device, args.blocks, warm_calls=1)
    report("released shape, batch 128, gradients set to None before each step (zero_grad)", times, per_block)

    hidden_x = x.clone().requires_grad_(True)
    times, per_block = time_in_blocks(fresh, hidden_x, args.repeats, device, args.blocks, warm_calls=1)
    report("the same, input requiring grad (a hidden layer)", times, per_block)

    results["kernels_per_step"] = {name: kernels_per_step(fn, x) for name, fn in fresh.items()}
    print("\n== GPU kernels per forward+backward (zero_grad): "
          + ", ".join(f"{k} {v}" for k, v in results["kernels_per_step"].items()))

    sweep = []
    for batch in (32, 128, 2048, 16384):
        xb = torch.randn(batch, d_in, device=device)
        times = time_side_by_side(fresh, xb, args.repeats, device)
        sweep.append({"batch": batch, "seconds": times})
        print(f"  batch {batch:>6}: " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in times.items())
              + f"   Triton {times['NeurocoderLinear, Triton kernels'] / times['nn.Linear(1024, 400)']:.2f}x nn.Linear")
    results["batch_sweep"] = sweep
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
