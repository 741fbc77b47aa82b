"""Where a NeurocoderLinear training step spends its time: the torch profiler's table of
operators, ordered by time on the device, for the released shape.

    python benchmarks/profile_layer.py [--device cpu|cuda] [--batch 128] [--rows 25]

A tool for speed work, not a benchmark: ratios against nn.Linear come from bench_layers.py.
"""

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from neurocoder import NeurocoderLinear, presets  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    device = torch.device(args.device)
    layer = NeurocoderLinear(1024, 400, bias=False, **presets.layer_options("released")).to(device)
    x = torch.randn(args.batch, 1024, device=device, requires_grad=True)

    def step():
        layer(x).square().mean().backward()

    for _ in range(3):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"released shape, batch {args.batch}, {args.steps} forward+backward steps on {device}")
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
