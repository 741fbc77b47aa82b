"""No-grad, eval-mode calls of NeurocoderLinear (an agent's rollout, evaluation passes): the C++
inference kernel against the Python inference path and nn.Linear, side by side in one process.

    python benchmarks/bench_inference.py [--threads 1] [--rounds 60] [--out benchmarks/results/inference-cpu.json]

For each shape the three contenders are timed in interleaved rounds (a busy host slows them
alike) inside ``neurocoder.reuse_programs``, as the PPO trainer's rollout runs; medians and
ratios are printed and written to the JSON file.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import neurocoder  # noqa: E402
from neurocoder import native, presets  # noqa: E402

# (label, preset, in, out, slots, rank, batch)
SHAPES = [
    ("agent head, rollout call", "default", 128, 6, 16, 4, 32),
    ("released shape, batch 128", "released", 1024, 400, 50, 10, 128),
    ("released layer, MNIST test batch", "released", 784, 400, 50, 10, 1000),
    ("default preset, batch 128", "default", 1024, 400, 50, 10, 128),
]


def _git(*command: str) -> str | None:
    try:
        return subprocess.run(["git", *command], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not native.available():
        raise SystemExit("bench_inference: the C++ kernels are not built or disabled (NEUROCODER_NATIVE=0); "
                         "build them with `python -c 'import neurocoder.native as n; n.main()'`")
    torch.manual_seed(0)
    results = {"threads": args.threads, "rounds": args.rounds, "git_commit": _git("rev-parse", "--short", "HEAD"),
               "git_dirty": None if (status := _git("status", "--porcelain")) is None else bool(status),
               "torch": torch.__version__, "machine": platform.processor() or platform.machine(), "cases": []}
    print(f"no-grad eval-mode calls, {args.threads} thread(s), medians of {args.rounds} interleaved rounds")
    for label, preset, d_in, d_out, slots, rank, batch in SHAPES:
        layer = neurocoder.NeurocoderLinear(d_in, d_out, **{**presets.layer_options(preset),
                                                            "num_programs": slots, "rank": rank}).eval()
        linear = torch.nn.Linear(d_in, d_out).eval()
        x = torch.randn(batch, d_in)
        calls = max(1, 2000 // batch)             # several calls per timing: small batches take microseconds

        def with_kernels(enabled: bool):
            def run():
                native.set_enabled(enabled)
                for _ in range(calls):
                    layer(x)
            return run

        def plain():
            for _ in range(calls):
                linear(x)

        contenders = {"nn.Linear": plain, "C++ kernel": with_kernels(True), "Python path": with_kernels(False)}
        times = {name: [] for name in contenders}
        with torch.no_grad(), neurocoder.reuse_programs(layer):
            for run in contenders.values():       # warm-up
                run()
            for _ in range(args.rounds):
                for name, run in contenders.items():
                    start = time.perf_counter()
                    run()
                    times[name].append((time.perf_counter() - start) / calls)
        native.set_enabled(True)
        ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        print(f"== {label}: {preset} preset, batch {batch}, {d_in} -> {d_out}, P = {slots}, r = {rank}")
        for name, value in ms.items():
            print(f"  {name:<12} {value:8.3f} ms   {value / ms['nn.Linear']:6.2f}x nn.Linear")
        print(f"  the kernel takes {ms['C++ kernel'] / ms['Python path']:.2f}x the Python path's time")
        results["cases"].append({"label": label, "preset": preset, "batch": batch, "in": d_in, "out": d_out,
                                 "slots": slots, "rank": rank, "ms": ms,
                                 "kernel_over_python": ms["C++ kernel"] / ms["Python path"]})
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
