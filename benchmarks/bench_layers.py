"""Speed and memory of Neurocoder layers, measured side by side in one process.

    python benchmarks/bench_layers.py [--device cpu|cuda] [--repeats 30] [--blocks 5] [--out FILE]

Prints ratios against the dense layer they replace and against the released formulation
(compose each sample's weight, apply it with bmm), and writes everything to a JSON file.
Timings interleave the contenders round by round and report medians, so a noisy shared
machine slows all of them alike. The released-shape cases run in blocks and also report each
block's ratio: their spread is how far the machine's noise moves the figure within one run.

Memory: the bytes autograd saves for the backward pass of one training step (what grows with
the batch), counted by a saved-tensors hook; on CUDA also the peak allocated memory.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import neurocoder  # noqa: E402
from neurocoder import NeurocoderConv2d, NeurocoderLinear, native, presets  # noqa: E402
from neurocoder.runs import code_version  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def without_native(module: nn.Module):
    """``module``'s forward with the C++ kernels switched off (the backward follows the forward)."""
    def run(x):
        native.set_enabled(False)
        try:
            return module(x)
        finally:
            native.set_enabled(True)
    return run


def train_step(fn, x):
    """One forward + backward (a captured CUDA graph's replay does both at once)."""
    y = fn(x)
    if y is not None:
        y.float().square().mean().backward()


def time_side_by_side(contenders: dict, x: torch.Tensor, repeats: int, device: torch.device) -> dict:
    """Median seconds of a forward+backward for each contender, rounds interleaved."""
    return time_in_blocks(contenders, x, repeats, device, blocks=1)[0]


def time_in_blocks(contenders: dict, x: torch.Tensor, repeats: int, device: torch.device,
                   blocks: int, warm_calls: int = 0) -> tuple[dict, list[dict]]:
    """As :func:`time_side_by_side` over ``blocks`` x ``repeats`` rounds; also returns each
    block's medians: the spread of a ratio across blocks shows how much a shared machine moves it.
    ``warm_calls`` untimed calls precede each timed one, so that no contender pays for the caches
    and memory the one before it used (the released formulation's 200 MB of per-sample weights
    slowed whichever contender came next: before session 15's change the compiled row, right after
    it, read 2.35-2.61x nn.Linear here against 1.72-1.84x in benchmarks/bench_compile.py)."""
    times = {name: [] for name in contenders}
    for fn in contenders.values():          # warm-up (allocator, kernels, compile)
        for _ in range(3):
            train_step(fn, x)
    _sync(device)
    per_block = []
    for _ in range(blocks):
        block = {name: [] for name in contenders}
        for _ in range(repeats):
            for name, fn in contenders.items():
                for _ in range(warm_calls):
                    train_step(fn, x)
                _sync(device)
                start = time.perf_counter()
                train_step(fn, x)
                _sync(device)
                block[name].append(time.perf_counter() - start)
        per_block.append({name: statistics.median(t) for name, t in block.items()})
        for name, t in block.items():
            times[name] += t
    return {name: statistics.median(t) for name, t in times.items()}, per_block


def captured_step(module: nn.Module, x: torch.Tensor):
    """A CUDA graph of one forward+backward of ``module`` on the static input ``x``; returns a
    function that replays it. Replaying removes the per-kernel launch cost that dominates small
    layers on a GPU, so the time left is the arithmetic and memory traffic."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):                     # warm-up outside the capture, as the docs ask
        for _ in range(3):
            module.zero_grad(set_to_none=True)
            train_step(module, x)
    torch.cuda.current_stream().wait_stream(stream)
    module.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        train_step(module, x)
    return lambda _x: graph.replay()


def print_batch_rows(title: str, rows: list[dict]) -> None:
    print(f"\n== {title}")
    for row in rows:
        print(f"  batch {row['batch']:>5}: nn.Linear {row['seconds']['nn.Linear'] * 1e3:8.3f} ms, NeurocoderLinear "
              f"{row['seconds']['NeurocoderLinear'] * 1e3:8.3f} ms   {row['ratio']:5.2f}x")


def block_ratios(per_block: list[dict], name: str, baseline: str) -> list[float]:
    return [block[name] / block[baseline] for block in per_block]


def saved_bytes(fn, x) -> int:
    """Bytes of distinct tensors autograd keeps for the backward pass of fn(x), with x requiring
    grad as in a hidden layer (the input itself and the parameters are not counted)."""
    x = x.detach().requires_grad_(True)
    seen: dict[int, int] = {}

    def pack(t):
        if t.device.type != "meta":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    y.float().sum().backward()
    parameters = {p.untyped_storage().data_ptr() for p in _parameters_of(fn)}
    return sum(n for ptr, n in seen.items() if ptr not in parameters and ptr != x.untyped_storage().data_ptr())


def _parameters_of(fn):
    module = getattr(fn, "__self__", fn)
    return module.parameters() if isinstance(module, nn.Module) else []


def peak_cuda_bytes(fn, x) -> int | None:
    if x.device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    train_step(fn, x)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=30, help="interleaved rounds per block")
    parser.add_argument("--blocks", type=int, default=5,
                        help="blocks of rounds for the released-shape cases (their ratios' spread is reported)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/layers-<device>.json)")
    args = parser.parse_args()
    if args.repeats < 1 or args.blocks < 1:
        parser.error(f"--repeats and --blocks must be >= 1 (got {args.repeats}, {args.blocks})")
    device = torch.device(args.device)
    torch.manual_seed(0)
    results: dict = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "neurocoder": neurocoder.__version__,
        # The commit (and whether the tree had changes): ratios move with the layer's code.
        "code_version": code_version(),
        # Whether the CPU rows ran the C++ kernels (neurocoder.native).
        "native_kernels": device.type == "cpu" and native.available(),
        "repeats": args.repeats,
        "blocks": args.blocks,
        "cases": {},
    }

    def report(name: str, times: dict, baseline: str, **extra) -> None:
        ratios = {k: v / times[baseline] for k, v in times.items()}
        results["cases"][name] = {"seconds": times, "ratio_to_" + baseline: ratios, **extra}
        print(f"\n== {name}")
        for k, v in times.items():
            print(f"  {k:<38} {v * 1e3:9.3f} ms   {ratios[k]:7.2f}x {baseline}")

    # 1. The released shape.
    released = presets.layer_options("released")
    B, d_in, d_out = 128, 1024, 400
    dense = nn.Linear(d_in, d_out).to(device)
    layer = NeurocoderLinear(d_in, d_out, bias=False, **released).to(device)
    x = torch.randn(B, d_in, device=device)
    composable = copy.deepcopy(layer)
    composable.fused = False
    contenders = {"nn.Linear(1024, 400)": dense, "NeurocoderLinear (fast path)": layer,
                  "fast path, composable (fused=False)": composable,
                  "composed weight + bmm (released)": layer.forward_explicit}
    if device.type == "cpu" and native.available():
        # The fast path as it runs without the C++ kernels (the Python Function; also what runs
        # where they cannot be built).
        contenders["fast path, Python (no C++ kernels)"] = without_native(copy.deepcopy(layer))
    if not args.no_compile:
        # max-autotune also tries inductor's own GEMM kernels (C++ templates on a CPU) against
        # the library's. nn.Linear is timed eager: compiled with max-autotune it was slower here
        # (session 15: 1.30x its eager time).
        contenders["NeurocoderLinear, torch.compile"] = torch.compile(layer, fullgraph=True)
        if device.type == "cpu":
            # On a GPU max-autotune benchmarks dozens of Triton kernels per product: over 200 s
            # on an H200 (session 27), longer than the rest of this benchmark together.
            contenders["NeurocoderLinear, compile max-autotune"] = torch.compile(
                copy.deepcopy(layer), fullgraph=True, mode="max-autotune-no-cudagraphs")
    times, per_block = time_in_blocks(contenders, x, args.repeats, device, args.blocks, warm_calls=1)
    speedup = times["composed weight + bmm (released)"] / times["NeurocoderLinear (fast path)"]
    spread = {name: block_ratios(per_block, name, "nn.Linear(1024, 400)") for name in contenders}
    report("linear, released shape: B=128, 1024->400, P=50, r=10, k=5, feed-forward, content keys",
           times, "nn.Linear(1024, 400)", fast_over_explicit_speedup=speedup, ratio_by_block=spread,
           fast_over_explicit_by_block=[b["composed weight + bmm (released)"] / b["NeurocoderLinear (fast path)"]
                                        for b in per_block])
    print(f"  fast path is {speedup:.1f}x faster than composing each sample's weight")
    fast = spread["NeurocoderLinear (fast path)"]
    print(f"  fast path / nn.Linear by block of {args.repeats} rounds: " + ", ".join(f"{r:.2f}" for r in fast))
    if "NeurocoderLinear, torch.compile" in times:
        compiled_speedup = times["composed weight + bmm (released)"] / times["NeurocoderLinear, torch.compile"]
        results["cases"][next(reversed(results["cases"]))]["compiled_over_explicit_speedup"] = compiled_speedup
        print(f"  compiled fast path is {compiled_speedup:.1f}x faster than composing each sample's weight")

    # The same layer in a hidden position: the input needs its gradient too.
    hidden_x = x.clone().requires_grad_(True)
    hidden_contenders = {"nn.Linear(1024, 400)": dense, "NeurocoderLinear (fast path)": layer,
                         "fast path, composable (fused=False)": composable}
    if "fast path, Python (no C++ kernels)" in contenders:
        hidden_contenders["fast path, Python (no C++ kernels)"] = contenders["fast path, Python (no C++ kernels)"]
    times, per_block = time_in_blocks(hidden_contenders, hidden_x, args.repeats, device, args.blocks)
    spread = {name: block_ratios(per_block, name, "nn.Linear(1024, 400)") for name in hidden_contenders}
    report("linear, released shape, input requiring grad (a hidden layer)", times, "nn.Linear(1024, 400)",
           ratio_by_block=spread)
    print(f"  fast path / nn.Linear by block of {args.repeats} rounds: "
          + ", ".join(f"{r:.2f}" for r in spread["NeurocoderLinear (fast path)"]))

    # Memory: saved activations at several batch sizes, fast against explicit.
    memory_rows = []
    for batch in (32, 128, 512):
        xb = torch.randn(batch, d_in, device=device)
        row = {"batch": batch,
               "fast_saved_MiB": saved_bytes(layer, xb) / 2**20,
               "explicit_saved_MiB": saved_bytes(layer.forward_explicit, xb) / 2**20,
               "dense_saved_MiB": saved_bytes(dense, xb) / 2**20,
               "batch_x_P_x_R_MiB": batch * 50 * 10 * 4 * 3 / 2**20,
               "batch_x_din_x_dout_MiB": batch * d_in * d_out * 4 / 2**20}
        cuda_fast, cuda_explicit = peak_cuda_bytes(layer, xb), peak_cuda_bytes(layer.forward_explicit, xb)
        if cuda_fast is not None:
            row["fast_cuda_peak_MiB"], row["explicit_cuda_peak_MiB"] = cuda_fast / 2**20, cuda_explicit / 2**20
        memory_rows.append(row)
    results["memory_released_shape"] = memory_rows
    print("\n== training-step memory at the released shape (bytes autograd saves for backward)")
    print(f"  {'batch':>6} {'fast MiB':>10} {'explicit MiB':>13} {'nn.Linear MiB':>14}")
    for row in memory_rows:
        print(f"  {row['batch']:>6} {row['fast_saved_MiB']:>10.2f} {row['explicit_saved_MiB']:>13.2f} "
              f"{row['dense_saved_MiB']:>14.2f}")

    # Where the time goes: the ratio against batch size. A fixed cost per operation weighs most at
    # small batches; the arithmetic (about half a dense layer's here) shows at large ones.
    sweep = []
    for batch in (1, 32, 128, 512, 2048):
        xb = torch.randn(batch, d_in, device=device)
        times = time_side_by_side({"nn.Linear": dense, "NeurocoderLinear": layer}, xb, args.repeats, device)
        sweep.append({"batch": batch, "seconds": times, "ratio": times["NeurocoderLinear"] / times["nn.Linear"]})
    results["batch_sweep_released_shape"] = sweep
    print_batch_rows("released shape, forward+backward against batch size", sweep)
    # Split the batch-128 step into a cost paid once per call (the batch-1 step: operations,
    # dispatch, parameter-sized work) and what the other 127 samples add.
    one, full = (next(row["seconds"] for row in sweep if row["batch"] == b) for b in (1, 128))
    split = {name: {"per_call_s": one[name], "added_by_127_samples_s": full[name] - one[name]} for name in one}
    results["per_call_and_per_sample_batch128"] = split
    print("  batch 128 split into the batch-1 step (paid once per call) and what 127 more samples add:")
    for name, part in split.items():
        print(f"    {name:<18} per call {part['per_call_s'] * 1e3:7.3f} ms, samples {part['added_by_127_samples_s'] * 1e3:7.3f} ms")
    per_sample_ratio = split["NeurocoderLinear"]["added_by_127_samples_s"] / split["nn.Linear"]["added_by_127_samples_s"]
    results["per_sample_ratio_batch128"] = per_sample_ratio
    print(f"    the samples' part alone: {per_sample_ratio:.2f}x nn.Linear's")

    # Where the time goes, continued: the ratio against the number of CPU threads. nn.Linear is one
    # large GEMM that splits across cores; the layer's ~60 small operations hardly do, so its ratio
    # grows with the threads. Only thread counts up to the default (the machine's cores) are timed.
    if device.type == "cpu":
        default_threads = torch.get_num_threads()
        thread_rows = []
        for threads in sorted({1, 2, default_threads}):
            if threads > default_threads:
                continue
            torch.set_num_threads(threads)
            times = time_side_by_side({"nn.Linear": dense, "NeurocoderLinear": layer}, x, args.repeats, device)
            thread_rows.append({"threads": threads, "seconds": times,
                                "ratio": times["NeurocoderLinear"] / times["nn.Linear"]})
        torch.set_num_threads(default_threads)
        results["thread_sweep_released_shape"] = thread_rows
        print("\n== released shape, batch 128, forward+backward against CPU threads (the targets use the default, "
              f"{default_threads})")
        for row in thread_rows:
            print(f"  threads {row['threads']:>3}: nn.Linear {row['seconds']['nn.Linear'] * 1e3:8.3f} ms, "
                  f"NeurocoderLinear {row['seconds']['NeurocoderLinear'] * 1e3:8.3f} ms {row['ratio']:7.2f}x")

    # 1b. On a GPU a layer this small is bound by kernel launches (the time hardly moves with the
    # batch). Captured as CUDA graphs, both layers lose that cost and the ratio shows the work.
    if device.type == "cuda":
        graph_rows = []
        for batch in (128, 2048, 16384):
            xb = torch.randn(batch, d_in, device=device)
            try:
                graphs = {"nn.Linear": captured_step(copy.deepcopy(dense), xb),
                          "NeurocoderLinear": captured_step(copy.deepcopy(layer), xb)}
            except Exception as error:   # report it and go on: the other cases still stand
                print(f"\n== CUDA graphs: capture failed at batch {batch}: {type(error).__name__}: {error}")
                break
            times = time_side_by_side(graphs, xb, args.repeats, device)
            graph_rows.append({"batch": batch, "seconds": times, "ratio": times["NeurocoderLinear"] / times["nn.Linear"]})
        results["cuda_graphs_released_shape"] = graph_rows
        print_batch_rows("released shape, forward+backward captured as CUDA graphs, against batch size", graph_rows)

    # 2. Recurrent composer, T = 4.
    recurrent = NeurocoderLinear(d_in, d_out, bias=False, **{**released, "composer": "recurrent", "steps": 4}).to(device)
    times = time_side_by_side({"nn.Linear(1024, 400)": dense, "NeurocoderLinear recurrent T=4": recurrent},
                              x, args.repeats, device)
    report("linear, recurrent composer T=4 (R=40), otherwise released shape", times, "nn.Linear(1024, 400)")

    # 3. Least-used reading on (project option), feed-forward.
    least = NeurocoderLinear(d_in, d_out, bias=False, **{**released, "least_used": 5}).to(device)
    times = time_side_by_side({"nn.Linear(1024, 400)": dense, "NeurocoderLinear least_used=5": least},
                              x, args.repeats, device)
    report("linear, least-used reading m=5, otherwise released shape", times, "nn.Linear(1024, 400)")

    # 4. Convolution.
    conv = nn.Conv2d(32, 64, 3, padding=1).to(device)
    nconv = NeurocoderConv2d(32, 64, 3, padding=1, num_programs=32, rank=8).to(device)
    xc = torch.randn(64, 32, 16, 16, device=device)
    contenders = {"nn.Conv2d(32, 64, 3)": conv, "NeurocoderConv2d (fast path)": nconv,
                  "composed filters + grouped conv": nconv.forward_explicit}
    if not args.no_compile:
        contenders["NeurocoderConv2d, torch.compile"] = torch.compile(nconv, fullgraph=True)
    times = time_side_by_side(contenders, xc, args.repeats, device)
    report("conv, B=64, 32->64, 3x3, 16x16 maps, P=32, r=8", times, "nn.Conv2d(32, 64, 3)")

    out = Path(args.out or Path(__file__).parent / "results" / f"layers-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
