"""The C++ CPU kernels (neurocoder.native, csrc/fused_layer.cpp) against the Python Functions
they replace (neurocoder.fused._FusedLayer and _FusedReadApply, and the no-grad inference path):
same values and gradients for every option, taken exactly where they apply, buffers reused only
when nothing else holds them, and a failed build that falls back with a warning."""

import copy
import itertools
import shutil

import pytest
import torch

import neurocoder
import neurocoder.fused as fused_module
from neurocoder import NeurocoderConv2d, NeurocoderLinear, native, presets, reading
from neurocoder.fused import functions_behind, fused_layer_apply

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler to build the kernels")


@pytest.fixture(autouse=True)
def _restore_native_switch():
    yield
    native.set_enabled(True)


def _inputs(B, d_in, d_out, P, rank, k, key_mode, slot_bias, learned_sharpness, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def tensor(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=dtype) * scale).requires_grad_(True)

    C = 3 * rank * k + (3 * rank if learned_sharpness else 0)
    keys = ((tensor(k, d_in), tensor(k), tensor(k, d_out), tensor(k)) if key_mode == "content" else
            (tensor(P, k), tensor(P, k)))
    return dict(x=tensor(B, d_in), head_weight=tensor(C, d_in, scale=0.5), head_bias=tensor(C),
                u_values=tensor(P, d_in), v_values=tensor(P, d_out), s_values=tensor(P), s_keys=tensor(P, k),
                key_tensors=keys, slot_bias=tensor(3, P) if slot_bias else None, rank=rank, key_dim=k)


def _run(enabled, inputs, sharpness, use_sigma=True):
    """Outputs and the gradient of every input of one forward+backward, with the kernels on or off."""
    native.set_enabled(enabled)
    leaves = [v for name, v in inputs.items() if isinstance(v, torch.Tensor)] + list(inputs["key_tensors"])
    for leaf in leaves:
        leaf.grad = None
    y, sigma, usage = fused_layer_apply(inputs["x"], inputs["head_weight"], inputs["head_bias"], inputs["u_values"],
                                        inputs["v_values"], inputs["s_values"], inputs["s_keys"],
                                        inputs["key_tensors"], inputs["slot_bias"], inputs["rank"],
                                        inputs["key_dim"], sharpness)
    weights = torch.linspace(-1, 1, y.shape[1], dtype=y.dtype)
    loss = (y * weights).square().sum() + (sigma.log().sum() if use_sigma else 0)
    loss.backward()
    return [y.detach(), sigma.detach(), usage], [None if leaf.grad is None else leaf.grad.clone() for leaf in leaves]


def _function_taken(inputs, sharpness):
    y, _, _ = fused_layer_apply(inputs["x"], inputs["head_weight"], inputs["head_bias"], inputs["u_values"],
                                inputs["v_values"], inputs["s_values"], inputs["s_keys"], inputs["key_tensors"],
                                inputs["slot_bias"], inputs["rank"], inputs["key_dim"], sharpness)
    return type(y.grad_fn).__name__


CASES = list(itertools.product(["content", "learned"], [False, True], ["fixed", "large", "learned"], [1, 5, 70],
                               [3, 5, 7]))


@pytest.mark.parametrize("key_mode,slot_bias,sharpness,B,k", CASES,
                         ids=[f"{m}-bias{int(b)}-{s}-B{n}-k{k}" for m, b, s, n, k in CASES])
def test_kernels_equal_the_python_function_in_float64(key_mode, slot_bias, sharpness, B, k):
    """Every branch of the kernels: content and learned keys, slot bias, a fixed sharpness small
    enough for the max-free softmax and one too large for it, a learned one; batches of one, an
    odd size and one the threads split; key sizes compiled in (3, 5) and taken at run time (7)."""
    inputs = _inputs(B, 11, 6, 9, 3, k, key_mode, slot_bias, sharpness == "learned", seed=B + k)
    fixed = {"fixed": 1.7, "large": 45.0, "learned": None}[sharpness]
    assert _function_taken(inputs, fixed) == "_NativeFusedLayerBackward"
    outputs_native, grads_native = _run(True, inputs, fixed)
    outputs_python, grads_python = _run(False, inputs, fixed)
    for got, want in zip(outputs_native, outputs_python):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)
    for i, (got, want) in enumerate(zip(grads_native, grads_python)):
        assert (got is None) == (want is None), i
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=f"gradient of input {i}")


def test_kernels_in_float32_at_the_released_shape():
    """float32 (the softmax's exp is a polynomial there) against the Python Function."""
    torch.manual_seed(0)
    layer = NeurocoderLinear(1024, 400, **presets.layer_options("released"))
    x = torch.randn(128, 1024)
    results = []
    for enabled in (True, False):
        native.set_enabled(enabled)
        layer.zero_grad(set_to_none=True)
        y = layer(x)
        y.square().mean().backward()
        results.append([y.detach()] + [p.grad.clone() for p in layer.parameters() if p.grad is not None])
    assert len(results[0]) == len(results[1])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("needs", [(0,), (1, 3), (4, 5, 6), (7, 8, 9, 10), (11,)])
def test_only_the_inputs_that_need_it_get_a_gradient(needs):
    inputs = _inputs(4, 8, 5, 6, 2, 3, "content", True, True)
    leaves = [inputs[n] for n in ("x", "head_weight", "head_bias", "u_values", "v_values", "s_values", "s_keys")]
    leaves += list(inputs["key_tensors"]) + [inputs["slot_bias"]]
    for i, leaf in enumerate(leaves):
        leaf.requires_grad_(i in needs)
    outputs_native, grads_native = _run(True, inputs, None)
    outputs_python, grads_python = _run(False, inputs, None)
    for got, want in zip(grads_native, grads_python):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_reused_buffers_never_overwrite_what_is_still_held():
    """Outputs kept across steps, gradients a parameter took over (``.grad`` set to None before
    the step, so autograd keeps the returned tensor) and an input gradient kept by a leaf stay
    as they were while later steps run."""
    torch.manual_seed(1)
    layer = NeurocoderLinear(32, 16, num_programs=8, rank=3, key_dim=4, sharpness=2.0, dtype=torch.float64)
    reference = NeurocoderLinear(32, 16, num_programs=8, rank=3, key_dim=4, sharpness=2.0, dtype=torch.float64)
    reference.load_state_dict(layer.state_dict())
    held = []
    for step in range(4):
        x = torch.randn(20, 32, dtype=torch.float64, requires_grad=True)
        layer.zero_grad(set_to_none=True)
        y = layer(x)
        y.square().sum().backward()
        held.append((y, x, {n: p.grad for n, p in layer.named_parameters()}, y.detach().clone(), x.grad.clone(),
                     {n: p.grad.clone() for n, p in layer.named_parameters()}))
    native.set_enabled(False)
    for y, x, grads, y_copy, x_grad_copy, grad_copies in held:
        torch.testing.assert_close(y.detach(), y_copy, rtol=0, atol=0)
        torch.testing.assert_close(x.grad, x_grad_copy, rtol=0, atol=0)
        for name in grads:
            torch.testing.assert_close(grads[name], grad_copies[name], rtol=0, atol=0)
        # and they are what the Python path computes (the layer's usage average aside)
        reference.zero_grad(set_to_none=True)
        x_again = x.detach().requires_grad_(True)
        y_python = reference(x_again)
        y_python.square().sum().backward()
        torch.testing.assert_close(y_copy, y_python.detach(), rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(x_grad_copy, x_again.grad, rtol=1e-9, atol=1e-11)


def test_switch_and_where_the_kernels_apply():
    inputs = _inputs(3, 6, 4, 5, 2, 2, "content", False, False)
    native.set_enabled(False)
    assert native.ops() is None
    assert _function_taken(inputs, 1.0) == "_FusedLayerBackward"
    native.set_enabled(True)
    assert native.available()
    assert _function_taken(inputs, 1.0) == "_NativeFusedLayerBackward"
    with pytest.raises(TypeError, match="set_enabled: expected True or False"):
        native.set_enabled("yes")


def test_other_dtypes_take_the_python_function():
    """bfloat16 (which the kernels do not cover) and inputs of mixed dtypes go to the Python Function."""
    inputs = _inputs(3, 6, 4, 5, 2, 2, "content", False, False, dtype=torch.bfloat16)
    assert _function_taken(inputs, 1.0) == "_FusedLayerBackward"
    inputs = _inputs(3, 6, 4, 5, 2, 2, "content", False, False, dtype=torch.float32)
    inputs["x"] = inputs["x"].detach().double().requires_grad_(True)
    with pytest.raises(RuntimeError):                     # the Python Function's own complaint
        _function_taken(inputs, 1.0)


def test_a_failed_build_warns_once_and_falls_back(monkeypatch):
    state = dict(native._state)
    monkeypatch.setitem(native._state, "ops", None)
    monkeypatch.setitem(native._state, "error", None)

    def failing_build(verbose=False):
        raise RuntimeError("Error building extension 'neurocoder_cpu_ops'\nc++: not found")

    monkeypatch.setattr(native, "build", failing_build)
    layer = NeurocoderLinear(6, 4, num_programs=5, rank=2, key_dim=3)
    x = torch.randn(3, 6)
    with pytest.warns(RuntimeWarning, match=r"C\+\+ CPU kernels could not be built .*c\+\+: not found.*Python path"):
        y = layer(x)
    y.sum().backward()                                    # the Python Function did the step
    assert type(layer(x).grad_fn).__name__ != "_NativeFusedLayerBackward"
    assert native.ops() is None                           # no second attempt, no second warning
    native._state.update(state)


def test_torch_compile_traces_the_python_function(monkeypatch):
    """Inside torch.compile the Python Function runs (the compiler traces its operations)."""
    calls, python_apply = [], fused_module._FusedLayer.apply
    monkeypatch.setattr(fused_module.torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(fused_module._FusedLayer, "apply", lambda *a: calls.append(1) or python_apply(*a))
    inputs = _inputs(3, 6, 4, 5, 2, 2, "content", False, False)
    _run(True, inputs, 1.0)
    assert calls


def test_a_build_about_to_compile_is_announced_and_a_cached_one_is_not(tmp_path, monkeypatch, capsys):
    import torch.utils.cpp_extension as cpp_extension
    monkeypatch.setattr(cpp_extension, "_get_build_directory", lambda name, verbose: str(tmp_path))
    native._announce_if_building("neurocoder_cpu_ops_test")
    assert "compiling the C++ CPU kernels, once" in capsys.readouterr().err
    (tmp_path / "neurocoder_cpu_ops_test.so").write_bytes(b"")
    native._announce_if_building("neurocoder_cpu_ops_test")
    assert capsys.readouterr().err == ""


def _record_kernel_calls(monkeypatch) -> list:
    """Patch neurocoder.native.ops so that each kernel called through it is named in the list returned."""
    calls, original = [], native.ops

    class Recorder:
        def __init__(self, kernels):
            self.kernels = kernels

        def __getattr__(self, name):
            calls.append(name)
            return getattr(self.kernels, name)

    monkeypatch.setattr(native, "ops", lambda: None if (kernels := original()) is None else Recorder(kernels))
    return calls


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("grown", [False, True])
@pytest.mark.parametrize("key_mode,sharpness,bias", [("content", "learned", True), ("content", 2.0, False),
                                                    ("learned", "learned", False), ("learned", 45.0, True)])
def test_inference_kernel_matches_the_python_inference_path(key_mode, sharpness, bias, grown, dtype, monkeypatch):
    """No-grad, eval-mode calls (an agent's rollout) run one C++ call (fused_layer_inference) with
    the constants reuse_programs keeps: the same outputs as the Python inference path, for every
    key mode, a fixed (also large: the max-subtracting softmax) or learned sharpness, with and
    without bias, slot offsets (a grown memory) and frozen slots; and the kept constants are
    refreshed after a parameter changes."""
    import neurocoder
    torch.manual_seed(0)
    layer = NeurocoderLinear(12, 7, num_programs=9, rank=4, key_dim=5, key_mode=key_mode, sharpness=sharpness,
                             bias=bias, dtype=dtype)
    if grown:
        layer.memory.grow(2)
        layer.memory.freeze([0, 3])
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    layer.eval()
    x = torch.randn(3, 5, 12, dtype=dtype)
    calls = _record_kernel_calls(monkeypatch)
    with torch.no_grad():
        native.set_enabled(False)
        expected = layer(x)
        native.set_enabled(True)
        with neurocoder.reuse_programs(layer):
            got = [layer(x) for _ in range(2)]
            layer.memory.v_values.mul_(1.5)
            changed = layer(x)
        native.set_enabled(False)
        expected_changed = layer(x)
    assert calls.count("fused_layer_inference") == 3 and all(y.dtype == dtype for y in got)
    tolerance = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    for y in got:
        torch.testing.assert_close(y, expected, **tolerance)
    torch.testing.assert_close(changed, expected_changed, **tolerance)
    assert not torch.allclose(changed, expected)


def test_inference_kernel_is_not_taken_for_a_separate_context_or_bfloat16(monkeypatch):
    """A composer reading a separate context, and dtypes the kernels lack, keep the Python
    inference path (which the fused-path tests check)."""
    calls = _record_kernel_calls(monkeypatch)
    with torch.no_grad():
        layer = NeurocoderLinear(12, 7, num_programs=9, rank=4, key_dim=5, context_features=6).eval()
        layer(torch.randn(4, 12), context=torch.randn(4, 6))
        NeurocoderLinear(12, 7, num_programs=9, rank=4, key_dim=5, dtype=torch.bfloat16).eval()(
            torch.randn(4, 12, dtype=torch.bfloat16))
    assert "fused_layer_inference" not in calls


def test_inference_kernel_names_a_composer_of_the_wrong_size():
    """Called directly with a composer whose rows do not match rank and key size, the kernel says
    what it expected instead of reading out of bounds."""
    J, P, R, k, d_in, d_out = 3, 6, 2, 4, 8, 5
    x = torch.randn(4, d_in)
    joined = torch.randn(J * R * k + 1 + P, d_in)
    with pytest.raises(RuntimeError, match="the composer has 25 rows, expected 24"):
        native.ops().fused_layer_inference(x, joined, torch.zeros(joined.shape[0]), torch.randn(J, P, k),
                                           torch.randn(P), torch.randn(P, d_out), None, None, R, k, 1.0)


def _read_inputs(B, T, rank, k, P, d_out, packed, learned, slot_bias, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def tensor(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=dtype) * scale).requires_grad_(True)

    Q, R = 3 * rank * k, T * rank
    C = Q + 5 + (P if packed else 0)                       # five columns the read does not use (gates)
    return dict(head_out=tensor(B, T, C), through_memory=None if packed else tensor(B, P), rank=rank, key_dim=k,
                keys=tensor(3, P, k), sharpness=(torch.rand(3, 1, R, B, generator=generator, dtype=dtype) * 3 + 0.2)
                .requires_grad_(True) if learned else None, slot_bias=tensor(3, P) if slot_bias else None,
                s_values=tensor(P), v_values=tensor(P, d_out))


def _read_run(enabled, inputs, fixed_sharpness):
    native.set_enabled(enabled)
    leaves = [v for v in inputs.values() if isinstance(v, torch.Tensor)]
    for leaf in leaves:
        leaf.grad = None
    sharpness = inputs["sharpness"] if inputs["sharpness"] is not None else fixed_sharpness
    y, sigma, usage = fused_module.fused_read_apply(inputs["head_out"], inputs["through_memory"], inputs["rank"],
                                                    inputs["key_dim"], inputs["keys"], sharpness,
                                                    inputs["slot_bias"], inputs["s_values"], inputs["v_values"])
    function = type(y.grad_fn).__name__
    weights = torch.linspace(-1, 1, y.shape[1], dtype=y.dtype)
    ((y * weights).square().sum() + sigma.log().sum()).backward()
    return function, [y.detach(), sigma.detach(), usage], [leaf.grad.clone() for leaf in leaves]


@pytest.mark.parametrize("steps,packed", [(1, True), (1, False), (3, False)])
@pytest.mark.parametrize("sharpness", [1.7, 45.0, "learned"])
@pytest.mark.parametrize("slot_bias", [False, True])
@pytest.mark.parametrize("batch,key_dim", [(1, 5), (6, 7), (70, 3)])
def test_read_kernels_match_the_python_read(steps, packed, sharpness, slot_bias, batch, key_dim):
    """The read alone (fused_read_apply: the recurrent composer's T steps, a separate context,
    frozen slots, a working program's gate) on the C++ kernels: the values and the gradient of
    every input as the Python Function's, in float64, for T = 1 (the head's output packed with
    x M_U^T, or given apart) and T = 3, fixed (also large: the max-subtracting softmax) and
    learned sharpness, with and without slot offsets, key sizes compiled in and not."""
    learned = sharpness == "learned"
    inputs = _read_inputs(batch, steps, 4, key_dim, 9, 6, packed, learned, slot_bias)
    fixed = None if learned else sharpness
    taken, outputs_native, grads_native = _read_run(True, inputs, fixed)
    python, outputs_python, grads_python = _read_run(False, inputs, fixed)
    assert (taken, python) == ("_NativeFusedReadApplyBackward", "_FusedReadApplyBackward")
    for got, want in zip(outputs_native, outputs_python):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads_native, grads_python):
        # Sharpness 45 makes gradients of ~1e5 beside near-zero ones: the absolute tolerance scales.
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-14 * max(1.0, want.abs().max().item()))


def test_read_kernels_in_float32_at_the_released_shape_with_four_steps():
    """float32, the released shape with the recurrent composer's T = 4 (R = 40 components)."""
    inputs = _read_inputs(128, 4, 10, 5, 50, 400, False, False, False, dtype=torch.float32)
    _, outputs_native, grads_native = _read_run(True, inputs, 1.0)
    _, outputs_python, grads_python = _read_run(False, inputs, 1.0)
    for got, want in zip(outputs_native + grads_native, outputs_python + grads_python):
        torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-5 * want.abs().max().item())


def test_layers_route_their_reads_to_the_kernels():
    """A recurrent composer, a separate context and frozen slots read through the kernels on a
    CPU (and through the Python Function with them off); gradients reach the context."""
    frozen = NeurocoderLinear(12, 7, num_programs=9, rank=4, key_dim=5)
    frozen.memory.freeze([0, 1])
    for options in (dict(composer="recurrent", steps=2), dict(context_features=6), None):
        layer = frozen if options is None else NeurocoderLinear(12, 7, num_programs=9, rank=4, key_dim=5, **options)
        options = options or {}
        context = torch.randn(3, 6, requires_grad=True) if "context_features" in options else None
        for enabled, name in ((True, "_NativeFusedReadApplyBackward"), (False, "_FusedReadApplyBackward")):
            native.set_enabled(enabled)
            y = layer(torch.randn(3, 12), context=context)
            assert name in functions_behind(y)              # the read is below the bias add
            if context is not None:
                y.sum().backward()
                assert context.grad is not None and context.grad.abs().sum() > 0
                context.grad = None


def _least_used_run(enabled, attention, gates, m, grad_weights, grad_usage):
    native.set_enabled(enabled)
    weights, usage = reading.read_with_least_used(attention, gates, m)
    taken = type(weights.grad_fn).__name__
    loss = 0
    if grad_weights is not None:
        loss = loss + (weights * grad_weights).sum()
    if grad_usage is not None:
        loss = loss + (usage * grad_usage).sum()
    grads = torch.autograd.grad(loss, (attention, gates))
    return taken, [weights.detach(), usage.detach(), *grads]


@pytest.mark.parametrize("m", [1, 3, 7])
@pytest.mark.parametrize("attention_kind", ["random", "uniform"])
@pytest.mark.parametrize("gate_kind", ["random", "one"])
@pytest.mark.parametrize("outputs", ["weights", "usage", "both"])
def test_least_used_kernel_matches_the_python_loop(m, attention_kind, gate_kind, outputs):
    """Least-used reading on the C++ kernel: weights, usage and the gradients of attention and
    gates as the Python loop's (autograd's rules included: torch.maximum splits a tie's gradient,
    and uniform attention makes ties; stable tie-breaking by slot index), in float64, for m = 1,
    some and all slots, gates at random and forced to 1, gradients from the weights, the usage or
    both."""
    generator = torch.Generator().manual_seed(m)
    J, B, R, P = 3, 4, 6, 7
    if attention_kind == "uniform" and m == P and gate_kind == "random":
        # Every weight is then 1/P up to its last bit, and which side of torch.maximum takes the
        # gradient turns on that bit: on the order in which the normaliser's P terms are summed,
        # which the two implementations do not share. (Their weights agree to 3e-17 there.)
        pytest.skip("ties decided by rounding: no single gradient to compare against")
    if attention_kind == "uniform":
        attention = torch.full((J, B, R, P), 1.0 / P, dtype=torch.float64)
    else:
        attention = torch.softmax(2 * torch.randn(J, B, R, P, generator=generator, dtype=torch.float64), -1)
    gates = (torch.ones(J, B, R, dtype=torch.float64) if gate_kind == "one" else
             torch.sigmoid(torch.randn(J, B, R, generator=generator, dtype=torch.float64)))
    attention.requires_grad_(True)
    gates.requires_grad_(True)
    grad_weights = torch.randn(J, B, R, P, generator=generator, dtype=torch.float64) if outputs != "usage" else None
    grad_usage = torch.randn(J, B, P, generator=generator, dtype=torch.float64) if outputs != "weights" else None
    taken, got = _least_used_run(True, attention, gates, m, grad_weights, grad_usage)
    python, want = _least_used_run(False, attention, gates, m, grad_weights, grad_usage)
    assert (taken, python) == ("_NativeLeastUsedReadBackward", "StackBackward0")
    for a, b, name in zip(got, want, ("weights", "usage", "grad attention", "grad gates")):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=name)
    if gate_kind == "one":
        # Each component reads only the m least-used slots, and no slot twice while unused remain.
        chosen = got[0] > 0
        assert (chosen.sum(-1) == m).all()


def test_least_used_kernel_in_float32_through_the_layer():
    """A layer with least-used reading gives the same outputs and gradients with the kernel on
    and off (float32, the released shape's read with m = 5)."""
    torch.manual_seed(0)
    layer = NeurocoderLinear(64, 30, num_programs=50, rank=10, key_dim=5, least_used=5)
    x = torch.randn(16, 64)
    results = []
    for enabled in (True, False):
        native.set_enabled(enabled)
        layer.zero_grad(set_to_none=True)
        y, trace = layer(x, return_trace=True)
        y.square().mean().backward()
        results.append([y.detach(), trace.usage["u"]] + [p.grad.clone() for p in layer.parameters() if p.grad is not None])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


LEAST_USED_LAYERS = [dict(), dict(sharpness=2.0), dict(composer="recurrent", steps=2), dict(context_features=6),
                     dict(key_mode="learned", bias=False), dict(residual=True)]


@pytest.mark.parametrize("options", LEAST_USED_LAYERS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("m", [1, 3, 9])
def test_least_used_layers_read_through_the_fused_kernels(options, m):
    """A least-used layer's training step runs the fused read with the mixing inside
    (fused_read_forward with gates): outputs and every gradient (parameters, and a separate
    context) as the composable path's, in float64, for every composer, fixed and learned
    sharpness, content and learned keys, the working program, m = 1, some and all slots."""
    torch.manual_seed(1)
    layer = NeurocoderLinear(12, 7, num_programs=9, rank=3, key_dim=5, least_used=m, dtype=torch.float64, **options)
    x = torch.randn(5, 12, dtype=torch.float64)
    context = torch.randn(5, 6, dtype=torch.float64, requires_grad=True) if "context_features" in options else None
    results = []
    for enabled in (True, False):
        native.set_enabled(enabled)
        layer.zero_grad(set_to_none=True)
        layer.memory.usage_average.zero_()      # each run folds this batch's usage into the same start
        y = layer(x, context=context)
        assert ("_NativeFusedReadApplyBackward" in functions_behind(y)) == enabled
        (y * torch.linspace(-1, 1, 7, dtype=torch.float64)).square().sum().backward()
        grads = [p.grad.clone() for p in layer.parameters() if p.grad is not None]
        if context is not None:
            grads.append(context.grad.clone())
            context.grad = None
        results.append([y.detach(), layer.memory.usage_average.clone()] + grads)
    assert len(results[0]) == len(results[1])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def test_least_used_in_the_fused_read_needs_the_kernels():
    from neurocoder.fused import fused_read_apply
    native.set_enabled(False)
    head_out = torch.randn(2, 1, 3 * 2 * 3)
    with pytest.raises(ValueError, match="least-used reading .* runs on the C\\+\\+ kernels only"):
        fused_read_apply(head_out, torch.randn(2, 4), 2, 3, torch.randn(3, 4, 3), 1.0, None, torch.randn(4),
                         torch.randn(4, 5), gates=torch.rand(6, 2), least_used=2)


def test_least_used_layer_breaks_usage_ties_by_slot_in_the_fused_read():
    """Gates of 1 and uniform attention make exact usage ties at non-zero usage: a slot pushed
    down by a smaller usage must still come before an equal usage of a higher slot (the stable
    sort's order), in the fused read as in the Python loop."""
    torch.manual_seed(0)
    layer = NeurocoderLinear(6, 4, num_programs=7, rank=4, key_dim=3, least_used=3, key_mode="learned",
                             sharpness=1e-6, dtype=torch.float64)
    with torch.no_grad():
        layer.composer.head.linear.bias[layer.composer.head.sizes[0]:sum(layer.composer.head.sizes[:2])] = 50.0
    x = torch.randn(2, 6, dtype=torch.float64)
    outputs = []
    for enabled in (True, False):
        native.set_enabled(enabled)
        y = layer(x)
        assert ("_NativeFusedReadApplyBackward" in functions_behind(y)) == enabled
        outputs.append(y.detach())
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ NeurocoderConv2d's read


# The autograd nodes of NeurocoderConv2d's C++ reads.
_CONV_READ_FUNCTIONS = {"_NativeConvReadBackward", "_NativeConvLayerReadBackward"}


def _conv_pair(seed=0, grow=0, **options):
    """A float64 NeurocoderConv2d on the kernels and a copy on its composable path (fused=False);
    ``grow`` new slots give the memory per-slot attention offsets."""
    torch.manual_seed(seed)
    layer = NeurocoderConv2d(3, 5, 3, num_programs=6, rank=4, key_dim=3, dtype=torch.float64, **options)
    if grow:
        layer.memory.grow(grow, attention_offset=-0.5)
    if layer.bias is not None:
        torch.nn.init.normal_(layer.bias)
    if layer.memory.slot_bias is not None:
        torch.nn.init.normal_(layer.memory.slot_bias)
    reference = copy.deepcopy(layer)
    reference.fused = False
    return layer, reference


def _conv_step(layer, x):
    """Output, the input's gradient and every parameter's gradient of one forward+backward."""
    for p in layer.parameters():
        p.grad = None
    y = layer(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).square().sum().backward()
    return y.detach(), None if x.grad is None else x.grad.clone(), [p.grad for p in layer.parameters()]


@pytest.mark.parametrize("composer,steps", [("feedforward", 1), ("recurrent", 2)])
@pytest.mark.parametrize("sharpness", ["learned", 3.0])
@pytest.mark.parametrize("options", [dict(), dict(key_mode="learned", bias=False, slot_bias=True),
                                     dict(stride=2, padding=1), dict(padding="same", dilation=2)])
def test_conv_kernels_equal_the_composable_path(composer, steps, sharpness, options):
    options = dict(options)
    slot_bias = options.pop("slot_bias", False)
    layer, reference = _conv_pair(composer=composer, steps=steps, sharpness=sharpness, grow=2 if slot_bias else 0,
                                  **options)
    x = torch.randn(4, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, grad_x, grads = _conv_step(layer, x)
    y_ref, grad_x_ref, grads_ref = _conv_step(reference, x_ref)
    # The feed-forward composer reads through the whole-read Function, the recurrent one through the read alone.
    read_function = "_NativeConvLayerReadBackward" if composer == "feedforward" else "_NativeConvReadBackward"
    assert read_function in functions_behind(layer(x))
    assert not _CONV_READ_FUNCTIONS & functions_behind(reference(x_ref))
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(grad_x, grad_x_ref)
    for name, g, g_ref in zip([n for n, _ in layer.named_parameters()], grads, grads_ref):
        assert (g is None) == (g_ref is None), name
        if g is not None:
            torch.testing.assert_close(g, g_ref, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(layer.memory.usage_average, reference.memory.usage_average)
    with torch.no_grad():                              # the no-grad call skips the Function
        torch.testing.assert_close(layer.eval()(x), reference.eval()(x_ref))


def test_conv_kernels_pass_gradcheck():
    layer, _ = _conv_pair(seed=1)
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inputs: layer(inputs), (x,))


@pytest.mark.parametrize("dedupe", [True, False])
def test_conv_reads_identical_contexts_once_with_the_same_values_gradients_and_usage(monkeypatch, dedupe):
    layer, reference = _conv_pair(seed=2)
    reads = []                                            # how many contexts each read took
    real_read = neurocoder.layers.conv_layer_read_mixing
    monkeypatch.setattr(neurocoder.layers, "conv_layer_read_mixing",
                        lambda context, *args, **kwargs: reads.append(context.shape[0]) or
                        real_read(context, *args, **kwargs))
    layer.dedupe_contexts = dedupe
    distinct = torch.randn(3, 3, 7, 6, dtype=torch.float64)
    batch = neurocoder.layers._DEDUPE_MIN_BATCH
    x = distinct[torch.arange(batch) % 3]                 # data: no gradient, 3 contexts in the batch
    y, _, grads = _conv_step(layer, x)
    y_ref, _, grads_ref = _conv_step(reference, x)
    torch.testing.assert_close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)
    torch.testing.assert_close(layer.memory.usage_average, reference.memory.usage_average)
    assert reads == [3 if dedupe else batch]


def test_unique_rows_groups_rows_by_their_exact_bits():
    generator = torch.Generator().manual_seed(3)
    for B, C, dtype in [(1, 1, torch.float32), (7, 3, torch.float64), (64, 4, torch.float32), (300, 10, torch.float32)]:
        rows = torch.randint(0, 3, (B, C), generator=generator).to(dtype)
        unique, inverse, counts = neurocoder.layers._unique_rows(rows)
        assert torch.equal(unique[inverse], rows) and counts.sum() == B
        assert unique.shape[0] == torch.unique(rows, dim=0).shape[0]
        assert torch.equal(counts, torch.bincount(inverse))
    rows = torch.tensor([[0.0, float("nan")], [0.0, float("nan")], [1.0, 2.0], [-0.0, float("nan")]])
    unique, inverse, counts = neurocoder.layers._unique_rows(rows)
    assert inverse.tolist() == [0, 0, 1, 2] and counts.tolist() == [2, 1, 1]   # bits, first appearance
    native.set_enabled(False)                             # without the kernels: torch.unique (values)
    try:
        unique, inverse, counts = neurocoder.layers._unique_rows(torch.tensor([[1.0], [0.0], [-0.0]]))
        assert unique.tolist() == [[0.0], [1.0]] and inverse.tolist() == [1, 0, 0]
    finally:
        native.set_enabled(True)


def test_pixel_means_equal_the_mean_over_pixels():
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(5, 4, 9, 7, dtype=dtype).transpose(2, 3)          # not contiguous
        torch.testing.assert_close(native.ops().pixel_means(x), x.mean(dim=(2, 3)))
    with pytest.raises(RuntimeError, match="expected a floating"):
        native.ops().pixel_means(torch.zeros(2, 3, 4, dtype=torch.int64))


def test_conv_rollout_remembers_mixings_until_a_parameter_changes():
    layer, reference = _conv_pair(seed=4)
    layer.eval(), reference.eval()
    distinct = torch.randn(5, 3, 7, 6, dtype=torch.float64)
    batches = [distinct[torch.randint(0, 5, (6,), generator=torch.Generator().manual_seed(i))] for i in range(12)]
    with torch.no_grad(), neurocoder.reuse_programs(layer):
        for batch in batches:
            torch.testing.assert_close(layer(batch), reference(batch))
        held, met, read = layer._reused["rollout"]["counts"].tolist()
        assert (held, met, read) == (5, 72, 5)                            # each context read once
        for m in (layer, reference):                                     # an optimiser step, in place
            m.memory.v_values.add_(0.1)
        torch.testing.assert_close(layer(batches[0]), reference(batches[0]))
        assert layer._reused["rollout"]["counts"][1] == 6                # what was kept was dropped
    assert layer._reused is None


def test_conv_rollout_table_starts_over_when_full_with_the_same_outputs(monkeypatch):
    monkeypatch.setattr(neurocoder.layers, "_REMEMBERED_CONTEXTS", 100)
    layer, reference = _conv_pair(seed=8)
    layer.eval(), reference.eval()
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad(), neurocoder.reuse_programs(layer):
        held = []
        for size in [40, 40, 40, 101, 3]:                                # new contexts each call
            batch = torch.randn(size, 3, 7, 6, dtype=torch.float64, generator=generator)
            torch.testing.assert_close(layer(batch), reference(batch))
            held.append(layer._reused["rollout"]["counts"][0].item())
        assert layer._reused["rollout"]["rows"].shape[0] == 100
        assert held == [40, 80, 40, 40, 43]      # the third call started over; the fourth, too large, read directly
        assert layer._reused["rollout"]["counts"][1:].tolist() == [224, 224]   # every context met was read


@pytest.mark.parametrize("composer,steps", [("feedforward", 1), ("recurrent", 2)])
@pytest.mark.parametrize("sharpness", ["learned", 3.0])
@pytest.mark.parametrize("options", [dict(), dict(key_mode="learned", bias=False, slot_bias=True),
                                     dict(stride=2, padding=1), dict(padding="same", dilation=2),
                                     dict(context_features=4)])
def test_conv_rollout_equals_the_composable_path(monkeypatch, composer, steps, sharpness,
                                                                          options):
    options = dict(options)
    slot_bias = options.pop("slot_bias", False)
    layer, reference = _conv_pair(composer=composer, steps=steps, sharpness=sharpness, grow=2 if slot_bias else 0,
                                  **options)
    layer.eval(), reference.eval()
    one_op_calls = []
    real_ops = native.ops()

    class CountingOps:                      # counts the one-op rollout calls, passes everything through
        def __getattr__(self, name):
            if name == "conv_layer_inference":
                return lambda *args: one_op_calls.append(1) or real_ops.conv_layer_inference(*args)
            return getattr(real_ops, name)

    monkeypatch.setattr(neurocoder.layers._native, "ops", lambda: CountingOps())
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad(), neurocoder.reuse_programs(layer):
        for i in range(12):                                              # every batch new contexts
            batch = torch.randn(4, 3, 7, 6, dtype=torch.float64, generator=generator)
            context = torch.randn(4, 4, dtype=torch.float64, generator=generator) if "context_features" in options \
                else None
            torch.testing.assert_close(layer(batch, context), reference(batch, context))
        kept = layer._reused["rollout"]
        one_op = composer == "feedforward"
        assert kept["one_op"] == one_op and len(one_op_calls) == (12 if one_op else 0)
        with pytest.raises(ValueError, match="expected input of shape"):   # the general path still checks
            layer(torch.randn(4, 2, 7, 6, dtype=torch.float64))


def test_conv_takes_its_composable_path_with_the_kernels_off_or_a_trace():
    layer, _ = _conv_pair(seed=6)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    assert "_NativeConvLayerReadBackward" in functions_behind(layer(x))
    y, trace = layer(x, return_trace=True)                 # traces come from the composable path
    assert not _CONV_READ_FUNCTIONS & functions_behind(y) and trace.sigma.shape == (2, 4)
    native.set_enabled(False)
    assert not _CONV_READ_FUNCTIONS & functions_behind(layer(x))
    native.set_enabled(True)
    layer.fused = False
    assert not _CONV_READ_FUNCTIONS & functions_behind(layer(x))


def test_conv_read_mixing_names_what_it_needs_when_the_kernels_cannot_run():
    layer, _ = _conv_pair(seed=7)
    memory = layer.memory
    queries = torch.randn(3 * 4 * 3, 2, dtype=torch.float64)
    native.set_enabled(False)
    with pytest.raises(ValueError, match="C\\+\\+ kernels only"):
        fused_module.conv_read_mixing(queries, memory.keys(), 1.0, None, memory.s, memory.v)
