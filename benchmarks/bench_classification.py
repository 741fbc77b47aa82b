"""Training-step time of every classification backbone variant, side by side in one process.

    python benchmarks/bench_classification.py [--device cpu|cuda] [--repeats 15] [--threads N] [--out FILE]

For each backbone, times one training step (forward, cross-entropy, orthogonality loss,
backward) on a batch of 128 for every variant, rounds interleaved, and prints the median and
the ratio to the plain backbone. The run folders' seconds per epoch come from runs that shared
the machine with other work; these ratios are the ones to compare.
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
from neurocoder.experiments.backbones import build_classifier, variants_for  # noqa: E402

SHAPES = {"mlp": (1, 28, 28), "lenet": (1, 28, 28), "resnet20": (1, 28, 28), "cnn1d": (1, 1, 40)}


def step(model, x, y):
    loss = F.cross_entropy(model(x), y) + neurocoder.regularization(model) + neurocoder.load_balancing_loss(model)
    model.zero_grad(set_to_none=True)
    loss.backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--backbones", nargs="*", default=list(SHAPES))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    report = {"device": str(device), "threads": torch.get_num_threads(), "batch": args.batch,
              "torch": torch.__version__, "machine": platform.machine(), "backbones": {}}
    for backbone in args.backbones:
        shape = SHAPES[backbone]
        x = torch.randn(args.batch, *shape, device=device)
        y = torch.randint(0, 10, (args.batch,), device=device)
        models = {v: build_classifier(backbone, v, shape, 10).to(device).train() for v in variants_for(backbone)}
        for model in models.values():
            for _ in range(2):
                step(model, x, y)
        times = {v: [] for v in models}
        for _ in range(args.repeats):
            for name, model in models.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                step(model, x, y)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
        medians = {v: statistics.median(t) for v, t in times.items()}
        report["backbones"][backbone] = {v: {"seconds": medians[v], "ratio_to_plain": medians[v] / medians["plain"]}
                                         for v in medians}
        print(f"{backbone} ({'x'.join(map(str, shape))}, batch {args.batch}, {torch.get_num_threads()} threads):")
        for v, m in medians.items():
            print(f"  {v:<9} {m * 1000:8.1f} ms/step   {m / medians['plain']:5.2f}x plain")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"written to {args.out}")


if __name__ == "__main__":
    main()
