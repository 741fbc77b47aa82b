"""NeurocoderLinear under torch.compile at the released shape, side by side in one process.

    python benchmarks/bench_compile.py [--blocks 3] [--repeats 60] [--threads N]

Times a forward+backward at batch 128 (1024 -> 400, P=50, r=10, k=5, feed-forward, content keys)
of: nn.Linear eager and compiled with ``mode="max-autotune-no-cudagraphs"``; NeurocoderLinear
eager (fused path); and the layer compiled in the default mode and with max-autotune, once through
its fused read-and-apply (an autograd Function with a hand-written backward) and once through its
composable path (``fused=False``), whose elementwise work inductor fuses itself; and once with
inductor's C++ wrapper (``options={"cpp_wrapper": True}``). Rounds are
interleaved; each block prints every contender's median as a ratio to eager nn.Linear.
The question it answers: which way of compiling the layer is fastest on this machine, and
whether compiling nn.Linear moves the reference.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from neurocoder import NeurocoderLinear, presets  # noqa: E402

MAX = "max-autotune-no-cudagraphs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense = nn.Linear(1024, 400)
    layer = NeurocoderLinear(1024, 400, bias=False, **presets.layer_options("released"))
    composable = copy.deepcopy(layer)
    composable.fused = False
    contenders = {
        "nn.Linear": dense,
        "nn.Linear, max-autotune": torch.compile(copy.deepcopy(dense), fullgraph=True, mode=MAX),
        "NeurocoderLinear eager": layer,
        "compiled, fused": torch.compile(copy.deepcopy(layer), fullgraph=True),
        "compiled, composable": torch.compile(copy.deepcopy(composable), fullgraph=True),
        "max-autotune, fused": torch.compile(copy.deepcopy(layer), fullgraph=True, mode=MAX),
        "max-autotune, composable": torch.compile(copy.deepcopy(composable), fullgraph=True, mode=MAX),
        # Inductor's C++ wrapper calls the generated kernels from C++ instead of Python.
        "C++ wrapper, fused": torch.compile(copy.deepcopy(layer), fullgraph=True, options={"cpp_wrapper": True}),
    }
    x = torch.randn(128, 1024)
    for fn in contenders.values():                   # warm-up, and compilation
        for _ in range(3):
            fn(x).square().mean().backward()
    print(f"released shape, batch 128, forward+backward, {torch.get_num_threads()} thread(s), torch {torch.__version__}; "
          "medians as ratios to eager nn.Linear")
    for block in range(args.blocks):
        times = {name: [] for name in contenders}
        for _ in range(args.repeats):
            for name, fn in contenders.items():
                start = time.perf_counter()
                fn(x).square().mean().backward()
                times[name].append(time.perf_counter() - start)
        base = statistics.median(times["nn.Linear"])
        print(f"  block {block + 1}: nn.Linear {base * 1e3:.3f} ms; "
              + ", ".join(f"{name} {statistics.median(t) / base:.2f}x" for name, t in times.items() if name != "nn.Linear"))


if __name__ == "__main__":
    main()
