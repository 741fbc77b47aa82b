"""Compile the fused layer's Triton kernels for a GPU, without one: the check a machine with no GPU
can make that the kernels will compile where one is lent (Triton's interpreter, which the tests
use here, does not compile them).

    python scripts/compile_triton_kernels.py [--arch 90] [--quick]

Compiles each kernel of neurocoder.triton_layer, ahead of time through Triton's whole pipeline to
a cubin (ptxas ships with Triton), for the shapes that matter: the released layer (content keys,
fixed sharpness), the default preset (learned sharpness, k = 8) and learned keys, with the launch
options the layer uses. Prints each kernel's registers and spilled bytes (cuobjdump, also shipped
with Triton) and exits 1 if any kernel fails to compile. --quick: the released layer (both ways of
its products with V) and learned keys only. Needs Triton with its NVIDIA backend (Linux x86-64); no GPU, no CUDA driver.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The kernels must be compiled, not interpreted, whatever the caller's environment says.
os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

PTR = "ptr"


def _compile(kernel, values: dict, arch: int, num_warps: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constants = {}, {}
    for param in kernel.params:
        value = values[param.name]
        if param.is_constexpr or value is None:
            signature[param.name], constants[param.name] = "constexpr", value
        elif value == PTR:
            signature[param.name] = "*fp32"
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            signature[param.name] = "i32"
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def _resources(compiled) -> str:
    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return "(no cuobjdump to read registers)"
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as handle:
        handle.write(compiled.asm["cubin"])
        handle.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", handle.name], capture_output=True, text=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return f"{match.group(1)} registers, {match.group(2)} bytes spilled to the stack" if match else out.strip()


def configurations(quick: bool) -> list[dict]:
    """(name, P, k, rank, content keys, learned sharpness, d_in, d_out, batch)."""
    rows = [dict(name="released (content keys, fixed sharpness)", P=50, k=5, rank=10, content=True, learned=False),
            dict(name="released, the products with V as GEMMs", P=50, k=5, rank=10, content=True, learned=False,
                 fold=False),
            dict(name="learned keys, learned sharpness", P=50, k=5, rank=10, content=False, learned=True)]
    if not quick:
        rows += [dict(name="default preset (content keys, learned sharpness, k = 8)", P=50, k=8, rank=10,
                      content=True, learned=True),
                 dict(name="the agents' head (P = 16, r = 4, k = 8)", P=16, k=8, rank=4, content=True, learned=True)]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200; 80: A100)")
    parser.add_argument("--quick", action="store_true", help="three configurations instead of five")
    args = parser.parse_args(argv)
    try:
        import triton  # noqa: F401
    except ImportError:
        print("compile_triton_kernels: Triton is not installed (pip install triton)", file=sys.stderr)
        return 1
    from neurocoder import triton_layer as kernels

    failures = 0
    B, d_in, d_out = 128, 1024, 400
    for row in configurations(args.quick):
        P, k, rank, content, learned = row["P"], row["k"], row["rank"], row["content"], row["learned"]
        C = 3 * rank * k + (3 * rank if learned else 0)
        blocks = kernels._blocks(P, k, rank)
        maybe = PTR if content else None
        fold = row.get("fold", True)
        read = dict(B=B, P=P, K=k, C=C, D_OUT=d_out, fixed_sharpness=1.0, RANK=rank, LEARNED=learned,
                    BLOCK_B=kernels._BLOCK_B, BLOCK_O=kernels._BLOCK_O, **blocks)
        jobs = [
            ("keys", kernels._keys_kernel, 4,
             dict(u_ptr=PTR, a_ptr=PTR, b_ptr=PTR, v_ptr=maybe, c_ptr=maybe, d_ptr=maybe, s_keys_ptr=PTR,
                  unit_keys_ptr=PTR, key_norm_ptr=PTR, P=P, K=k, D_IN=d_in, D_OUT=d_out, CONTENT=content,
                  BLOCK_P=blocks["BLOCK_P"], BLOCK_K=blocks["BLOCK_K"], BLOCK_D=16)),
            ("read forward", kernels._read_forward_kernel, kernels._READ_WARPS,
             dict(head_ptr=PTR, keys_ptr=PTR, s_ptr=PTR, mixed_ptr=PTR, sigma_ptr=PTR, usage_ptr=PTR, v_ptr=PTR,
                  y_ptr=PTR, WANT_USAGE=True, WITH_OUTPUT=fold, **read)),
            ("read backward", kernels._read_backward_kernel, kernels._READ_WARPS,
             dict(head_ptr=PTR, keys_ptr=PTR, s_ptr=PTR, grad_mixed_ptr=PTR, grad_sigma_ptr=PTR, grad_head_ptr=PTR,
                  partial_ptr=PTR, v_ptr=PTR, grad_y_ptr=PTR, HAS_GRAD_SIGMA=False, FROM_GRAD_Y=fold, **read)),
            ("keys backward", kernels._keys_backward_kernel, 4,
             dict(partial_ptr=PTR, n_blocks=8, unit_keys_ptr=PTR, key_norm_ptr=PTR, grad_keys_ptr=PTR, grad_s_ptr=PTR,
                  grad_bias_ptr=PTR, u_ptr=PTR, a_ptr=PTR, grad_u_ptr=PTR, grad_a_ptr=maybe, grad_b_ptr=maybe,
                  v_ptr=PTR, c_ptr=maybe, grad_v_ptr=PTR, grad_c_ptr=maybe, grad_d_ptr=maybe, P=P, K=k, C=C,
                  D_IN=d_in, D_OUT=d_out, BLOCKS_IN=64, CONTENT=content, BLOCK_P=blocks["BLOCK_P"],
                  BLOCK_K=blocks["BLOCK_K"], BLOCK_D=16, BLOCK_C=64)),
        ]
        print(f"== {row['name']}, sm_{args.arch}")
        for name, kernel, warps, values in jobs:
            start = time.perf_counter()
            try:
                compiled = _compile(kernel, values, args.arch, warps)
            except Exception as error:  # noqa: BLE001 - every kernel is tried; the exit code says
                failures += 1
                print(f"  {name:<14} FAILED: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
                continue
            print(f"  {name:<14} compiled in {time.perf_counter() - start:5.1f} s, {warps} warps: "
                  f"{_resources(compiled)}")
    print("all kernels compiled" if not failures else f"{failures} kernel(s) failed to compile")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
