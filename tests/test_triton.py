"""The Triton kernels of the fused layer (neurocoder.triton_layer) against the Python Function they
replace (neurocoder.fused._FusedLayer): same values and gradients for every option they cover.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py
before Triton is imported), on CPU tensors: the same kernel code, executed with NumPy. With a GPU
they are compiled and run on CUDA tensors. Skipped where Triton is not installed."""

import itertools

import pytest
import torch

triton = pytest.importorskip("triton")

from neurocoder import NeurocoderLinear, presets, triton_layer  # noqa: E402
from neurocoder.fused import _FusedLayer, functions_behind, fused_layer_apply  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _restore_switch():
    state = dict(triton_layer._state)
    yield
    triton_layer._state.update(state)


def _inputs(B, d_in, d_out, P, rank, k, key_mode, learned_sharpness, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def tensor(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=dtype) * scale).to(DEVICE).requires_grad_(True)

    C = 3 * rank * k + (3 * rank if learned_sharpness else 0)
    keys = ((tensor(k, d_in), tensor(k), tensor(k, d_out), tensor(k)) if key_mode == "content" else
            (tensor(P, k), tensor(P, k)))
    return dict(x=tensor(B, d_in), head_weight=tensor(C, d_in, scale=0.5), head_bias=tensor(C),
                u_values=tensor(P, d_in), v_values=tensor(P, d_out), s_values=tensor(P), s_keys=tensor(P, k),
                key_tensors=keys, rank=rank, key_dim=k)


def _run(function, inputs, sharpness, use_sigma=True):
    """Outputs and every input's gradient of one forward+backward through ``function``."""
    leaves = [v for v in inputs.values() if isinstance(v, torch.Tensor)] + list(inputs["key_tensors"])
    for leaf in leaves:
        leaf.grad = None
    a, b, c, d = (tuple(inputs["key_tensors"]) + (None, None))[:4]
    y, sigma, usage = function.apply(inputs["x"], inputs["head_weight"], inputs["head_bias"], inputs["u_values"],
                                     inputs["v_values"], inputs["s_values"], inputs["s_keys"], a, b, c, d, None,
                                     inputs["rank"], inputs["key_dim"], sharpness, True)
    weights = torch.linspace(-1, 1, y.shape[1], dtype=y.dtype, device=y.device)
    loss = (y * weights).square().sum() + (sigma.log().sum() if use_sigma else 0)
    loss.backward()
    return [y.detach(), sigma.detach(), usage], [None if leaf.grad is None else leaf.grad.clone() for leaf in leaves]


# Key modes, sharpness (a fixed one exact in float32, as Triton passes a float argument; a large
# one, where the softmax needs its max; learned), batches (one; one short of a block; over two
# blocks), key sizes (a power of two or not), slot counts (a power of two or not).
CASES = list(itertools.product(["content", "learned"], ["fixed", "large", "learned"], [1, 15, 37], [4, 5],
                               [9, 16]))


@pytest.mark.parametrize("key_mode,sharpness,B,k,P", CASES,
                         ids=[f"{m}-{s}-B{n}-k{k}-P{p}" for m, s, n, k, p in CASES])
def test_kernels_equal_the_python_function_in_float64(key_mode, sharpness, B, k, P):
    inputs = _inputs(B, 40, 70, P, 3, k, key_mode, sharpness == "learned", seed=B + k + P)
    fixed = {"fixed": 1.5, "large": 45.0, "learned": None}[sharpness]
    outputs_triton, grads_triton = _run(triton_layer.TritonFusedLayer, inputs, fixed)
    outputs_python, grads_python = _run(_FusedLayer, inputs, fixed)
    for got, want, name in zip(outputs_triton, outputs_python, ("y", "sigma", "usage")):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)
    for i, (got, want) in enumerate(zip(grads_triton, grads_python)):
        assert (got is None) == (want is None), i
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=f"gradient of input {i}")


UNFOLDED = list(itertools.product(["content", "learned"], ["fixed", "learned"], [15, 37]))


@pytest.mark.parametrize("key_mode,sharpness,B", UNFOLDED, ids=[f"{m}-{s}-B{n}" for m, s, n in UNFOLDED])
def test_the_products_with_v_as_gemms_give_the_same(key_mode, sharpness, B):
    """set_fold_output_products(False): y = mixed V and grad_y V^T as GEMMs, not in the kernels."""
    triton_layer.set_fold_output_products(False)
    inputs = _inputs(B, 40, 70, 9, 3, 5, key_mode, sharpness == "learned", seed=B)
    fixed = None if sharpness == "learned" else 1.5
    outputs_triton, grads_triton = _run(triton_layer.TritonFusedLayer, inputs, fixed)
    outputs_python, grads_python = _run(_FusedLayer, inputs, fixed)
    for got, want in zip(outputs_triton + grads_triton, outputs_python + grads_python):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_many_blocks_are_summed_before_the_keys_backward(monkeypatch):
    """Past _MAX_UNREDUCED_BLOCKS sample blocks the partial sums go through one torch.sum first."""
    monkeypatch.setattr(triton_layer, "_MAX_UNREDUCED_BLOCKS", 1)
    inputs = _inputs(40, 12, 5, 7, 2, 3, "content", True, seed=3)
    outputs_triton, grads_triton = _run(triton_layer.TritonFusedLayer, inputs, None)
    outputs_python, grads_python = _run(_FusedLayer, inputs, None)
    for got, want in zip(outputs_triton + grads_triton, outputs_python + grads_python):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("needs", [(0,), (1, 3), (4, 5, 6), (7, 8, 9, 10)])
def test_only_the_inputs_that_need_it_get_a_gradient(needs):
    inputs = _inputs(5, 8, 5, 6, 2, 3, "content", True)
    leaves = [inputs[n] for n in ("x", "head_weight", "head_bias", "u_values", "v_values", "s_values", "s_keys")]
    leaves += list(inputs["key_tensors"])
    for i, leaf in enumerate(leaves):
        leaf.requires_grad_(i in needs)
    _, grads_triton = _run(triton_layer.TritonFusedLayer, inputs, None)
    _, grads_python = _run(_FusedLayer, inputs, None)
    for got, want in zip(grads_triton, grads_python):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_float32_at_the_released_shape():
    """The released layer's training step, batch 128 (eight sample blocks), in float32."""
    torch.manual_seed(0)
    layer = NeurocoderLinear(1024, 400, **presets.layer_options("released")).to(DEVICE)
    P, k = layer.memory.num_programs, layer.key_dim
    memory, head = layer.memory, layer.composer.head
    x = torch.randn(128, 1024, device=DEVICE)
    params = [head.linear.weight, head.linear.bias, memory.u_values, memory.v_values, memory.s_values, memory.s_keys,
              memory.u_key_map.weight, memory.u_key_map.bias, memory.v_key_map.weight, memory.v_key_map.bias]
    results = []
    for function in (triton_layer.TritonFusedLayer, _FusedLayer):
        layer.zero_grad(set_to_none=True)
        y, sigma, usage = function.apply(x, *params[:6], *params[6:], None, layer.rank, k, 1.0, True)
        y.square().mean().backward()
        results.append([y.detach(), sigma.detach(), usage] + [p.grad.clone() for p in params])
    assert usage.shape == (3, P)
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-6)


def test_slot_bias_is_refused_with_its_reason():
    inputs = _inputs(3, 8, 5, 6, 2, 3, "learned", False)
    a, b = inputs["key_tensors"]
    with pytest.raises(ValueError, match="slot_bias"):
        triton_layer.TritonFusedLayer.apply(inputs["x"], inputs["head_weight"], inputs["head_bias"],
                                            inputs["u_values"], inputs["v_values"], inputs["s_values"],
                                            inputs["s_keys"], a, b, None, None, torch.zeros(3, 6, dtype=torch.float64),
                                            2, 3, 1.0, True)


def test_a_composer_of_the_wrong_size_is_named():
    inputs = _inputs(3, 8, 5, 6, 2, 3, "learned", True)       # rows for a learned sharpness
    a, b = inputs["key_tensors"]
    with pytest.raises(ValueError, match="composer has 24 rows, expected 18"):
        triton_layer.TritonFusedLayer.apply(inputs["x"], inputs["head_weight"], inputs["head_bias"],
                                            inputs["u_values"], inputs["v_values"], inputs["s_values"],
                                            inputs["s_keys"], a, b, None, None, None, 2, 3, 1.0, True)


def test_the_switch_and_where_the_kernels_apply():
    x = torch.zeros(4, 3)
    triton_layer.set_enabled(True)
    assert not triton_layer.applies(x, None)                          # a CPU tensor: the CPU paths
    if torch.cuda.is_available():
        assert triton_layer.applies(x.cuda(), None)
        assert not triton_layer.applies(x.cuda(), torch.zeros(3, 2, device="cuda"))     # slot offsets
        assert not triton_layer.applies(x.cuda().half(), None)
        assert not triton_layer.applies(x.cuda()[:0], None)
    triton_layer.set_enabled(False)
    assert not triton_layer.applies(x.to(DEVICE), None)
    with pytest.raises(TypeError, match="True or False"):
        triton_layer.set_enabled(1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the layer routes to the kernels on CUDA only")
def test_the_layer_routes_its_training_step_to_the_kernels_on_cuda():
    torch.manual_seed(0)
    layer = NeurocoderLinear(32, 16, **presets.layer_options("released")).cuda()
    x = torch.randn(8, 32, device="cuda")
    triton_layer.set_enabled(True)
    y = layer(x)
    assert "TritonFusedLayerBackward" in functions_behind(y)
    triton_layer.set_enabled(False)
    want = layer(x)
    assert "TritonFusedLayerBackward" not in functions_behind(want)
    torch.testing.assert_close(y, want, rtol=2e-4, atol=2e-6)


def test_fused_layer_apply_keeps_the_cpu_paths_for_cpu_tensors():
    triton_layer.set_enabled(True)
    inputs = {name: value.detach().cpu().requires_grad_(True) if isinstance(value, torch.Tensor) else value
              for name, value in _inputs(3, 8, 5, 6, 2, 3, "learned", False).items()}
    keys = tuple(t.detach().cpu().requires_grad_(True) for t in inputs["key_tensors"])
    y, _, _ = fused_layer_apply(inputs["x"], inputs["head_weight"], inputs["head_bias"], inputs["u_values"],
                                inputs["v_values"], inputs["s_values"], inputs["s_keys"], keys, None, 2, 3, 1.0)
    assert type(y.grad_fn).__name__ in ("_NativeFusedLayerBackward", "_FusedLayerBackward")


# ATen operations that launch no kernel of their own (allocation, views, and the interpreter's
# copies of each argument to and from the host when there is no GPU).
_NO_KERNEL = {"new_empty", "empty", "set_", "copy_", "permute", "slice", "unsqueeze", "select", "view", "detach",
              "transpose", "t", "expand", "alias"}


@pytest.mark.parametrize("input_needs_grad", [False, True])
@pytest.mark.parametrize("fold", [True, False])
def test_a_training_step_issues_few_aten_kernels(input_needs_grad, fold):
    """The point of the kernels is the launch count (a GPU step at this size is bound by it):
    beside the four Triton kernels, a step issues 3 ATen kernels forward (two GEMMs and the
    usage's sum) and 2 backward (GEMMs), 4 when the input needs its gradient; one more each way
    with the products with V as GEMMs. (The ATen fast path, neurocoder.fused._FusedLayer:
    session 27's GPU profile counted at least 77 kernels a step.)"""
    triton_layer.set_fold_output_products(fold)
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.kernels = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in _NO_KERNEL:
                self.kernels.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    inputs = _inputs(20, 12, 7, 6, 2, 3, "content", False, dtype=torch.float32)
    inputs["x"].requires_grad_(input_needs_grad)
    a, b, c, d = inputs["key_tensors"]
    arguments = (inputs["x"], inputs["head_weight"], inputs["head_bias"], inputs["u_values"], inputs["v_values"],
                 inputs["s_values"], inputs["s_keys"], a, b, c, d, None, 2, 3, 1.0, True)
    with Count() as forward:
        y, _, _ = triton_layer.TritonFusedLayer.apply(*arguments)
    grad_y = torch.ones_like(y)
    with Count() as backward:
        y.backward(grad_y)           # first backward: every gradient is assigned, not added
    extra = [] if fold else ["mm"]
    assert sorted(forward.kernels) == sorted(["addmm", "mm", "sum"] + extra)
    assert sorted(backward.kernels) == sorted(["mm", "mm"] + (["addmm_", "mm"] if input_needs_grad else []) + extra)


def test_every_kernel_compiles_for_an_h200_without_one():
    """The interpreter runs the kernels but does not compile them: compile each one ahead of time
    for sm_90 through Triton's whole pipeline to a cubin (no GPU or driver needed), as a GPU would
    at its first call."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "compile_triton_kernels.py"
    done = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("compiled in") == 12 and "all kernels compiled" in done.stdout
