"""The fused read-and-apply (neurocoder.fused) against the composable path and the explicit
per-sample composition: same values, same gradients, taken exactly when it should be."""

import copy

import pytest
import torch

import neurocoder.layers as layers_module
from neurocoder import NeurocoderLinear, native, presets, record
from neurocoder.fused import fused_layer_apply, fused_read_apply

from conftest import OPTION_GRID, option_id

FUSABLE = [o for o in OPTION_GRID if o["least_used"] == 0]


def _perturb(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def _gradients(layer, x, context=None):
    """Output and d(loss)/d(every parameter and the inputs) of one forward+backward."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    inputs = [x]
    if context is not None:
        context = context.detach().requires_grad_(True)
        inputs.append(context)
    y = layer(x, context=context)
    (y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype, device=y.device)).square().sum().backward()
    grads = {name: p.grad for name, p in layer.named_parameters() if p.requires_grad}
    grads.update({f"input{i}": t.grad for i, t in enumerate(inputs)})
    return y.detach(), grads


def _assert_paths_agree(layer, x, context=None):
    composable = copy.deepcopy(layer)
    composable.fused = False
    y_fused, g_fused = _gradients(layer, x, context)
    y_plain, g_plain = _gradients(composable, x, context)
    torch.testing.assert_close(y_fused, y_plain, rtol=1e-9, atol=1e-10)
    assert g_fused.keys() == g_plain.keys()
    for name in g_plain:
        assert (g_fused[name] is None) == (g_plain[name] is None), name
        if g_plain[name] is not None:
            torch.testing.assert_close(g_fused[name], g_plain[name], rtol=1e-7, atol=1e-9, msg=name)
    torch.testing.assert_close(layer.memory.usage_average, composable.memory.usage_average)
    return y_fused


@pytest.mark.parametrize("options", FUSABLE, ids=option_id)
def test_fused_path_matches_composable_path_and_explicit_weight(options):
    layer = NeurocoderLinear(12, 7, num_programs=9, rank=4, key_dim=5, dtype=torch.float64, **options)
    _perturb(layer)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    y = _assert_paths_agree(layer, x)
    torch.testing.assert_close(y, layer.forward_explicit(x).detach(), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("composer,steps", [("feedforward", 1), ("recurrent", 2)])
def test_fused_path_with_separate_context(composer, steps):
    layer = NeurocoderLinear(6, 5, num_programs=7, rank=3, key_dim=4, composer=composer, steps=steps,
                             context_features=9, dtype=torch.float64)
    _perturb(layer)
    _assert_paths_agree(layer, torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 9, dtype=torch.float64))


def test_fused_path_with_grown_memory_and_frozen_slots():
    layer = NeurocoderLinear(10, 6, num_programs=8, rank=3, key_dim=4, sharpness="learned", dtype=torch.float64)
    _perturb(layer)
    layer.memory.freeze([0, 2, 5])
    layer.memory.grow(4)
    _perturb(layer)
    assert layer.memory.slot_bias is not None
    _assert_paths_agree(layer, torch.randn(16, 10, dtype=torch.float64))


def test_fused_path_at_the_released_preset_in_float32():
    layer = NeurocoderLinear(64, 32, **presets.layer_options("released"))
    x = torch.randn(32, 64)
    composable = copy.deepcopy(layer)
    composable.fused = False
    y, g = _gradients(layer, x)
    y_plain, g_plain = _gradients(composable, x)
    torch.testing.assert_close(y, y_plain, rtol=1e-5, atol=1e-6)
    for name in g_plain:
        torch.testing.assert_close(g[name], g_plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_path_is_taken_exactly_where_it_applies(monkeypatch):
    calls = []

    for name, function in (("fused_read_apply", fused_read_apply), ("fused_layer_apply", fused_layer_apply)):
        monkeypatch.setattr(layers_module, name,
                            lambda *a, function=function, **k: calls.append(1) or function(*a, **k))
    x = torch.randn(4, 12)
    layer = NeurocoderLinear(12, 5, num_programs=6, rank=2, key_dim=3)
    layer(x)
    assert len(calls) == 1
    layer(x, return_trace=True)                   # traces need the composable path's tensors
    with record(layer):                           # nor does recording
        layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    off = copy.deepcopy(layer)
    off.fused = False
    off(x)
    NeurocoderLinear(12, 5, num_programs=6, rank=2, key_dim=3, fused=False)(x)
    assert len(calls) == 1
    # Least-used reading: fused on the C++ kernels only (its mixing runs inside them).
    least_used = NeurocoderLinear(12, 5, num_programs=6, rank=2, key_dim=3, least_used=2)
    native.set_enabled(False)
    try:
        least_used(x)
        assert len(calls) == 1
    finally:
        native.set_enabled(True)
    least_used(x)
    assert len(calls) == (2 if native.available() else 1)


def test_whole_layer_function_is_taken_exactly_where_it_applies(monkeypatch):
    """A training step of a feed-forward layer reading its own input, without least-used gates,
    residual gate or frozen slots, runs as one Function (fused_layer_apply); everything else keeps
    the read-only one."""
    whole, read = [], []
    monkeypatch.setattr(layers_module, "fused_layer_apply",
                        lambda *a, **k: whole.append(1) or fused_layer_apply(*a, **k))
    monkeypatch.setattr(layers_module, "fused_read_apply",
                        lambda *a, **k: read.append(1) or fused_read_apply(*a, **k))
    x = torch.randn(4, 12)
    options = dict(num_programs=6, rank=2, key_dim=3, sharpness=2.0)
    for key_mode in ("content", "learned"):
        NeurocoderLinear(12, 5, key_mode=key_mode, **options)(x)
    NeurocoderLinear(12, 5, num_programs=6, rank=2, key_dim=3, sharpness="learned")(x)
    assert (len(whole), len(read)) == (3, 0)
    NeurocoderLinear(12, 5, residual=True, **options)(x)                                    # residual gate
    NeurocoderLinear(12, 5, composer="recurrent", steps=2, **options)(x)
    NeurocoderLinear(12, 5, context_features=3, **options)(x, context=torch.randn(4, 3))
    frozen = NeurocoderLinear(12, 5, **options)
    frozen.memory.freeze([1])
    frozen(x)
    with torch.no_grad():                                                                    # no backward to fuse
        NeurocoderLinear(12, 5, **options)(x)
    assert (len(whole), len(read)) == (3, 5)


@pytest.mark.parametrize("key_mode", ["content", "learned"])
@pytest.mark.parametrize("slot_bias", [False, True])
@pytest.mark.parametrize("learned_sharpness", [False, True])
def test_whole_layer_function_gradcheck(key_mode, slot_bias, learned_sharpness):
    torch.manual_seed(2)
    B, d_in, d_out, P, rank, k = 3, 4, 3, 5, 2, 2
    f64 = dict(dtype=torch.float64, requires_grad=True)
    C = 3 * rank * k + (3 * rank if learned_sharpness else 0)
    sharpness = None if learned_sharpness else 1.3
    x = torch.randn(B, d_in, **f64)
    head_weight, head_bias = torch.randn(C, d_in, **f64), torch.randn(C, **f64)
    u, v, s, s_keys = (torch.randn(P, d_in, **f64), torch.randn(P, d_out, **f64), torch.randn(P, **f64),
                       torch.randn(P, k, **f64))
    if key_mode == "content":
        key_tensors = (torch.randn(k, d_in, **f64), torch.randn(k, **f64), torch.randn(k, d_out, **f64),
                       torch.randn(k, **f64))
    else:
        key_tensors = (torch.randn(P, k, **f64), torch.randn(P, k, **f64))
    bias = torch.randn(3, P, **f64) if slot_bias else None

    def run(x, head_weight, head_bias, u, v, s, s_keys, bias, *key_tensors):
        y, sigma, _ = fused_layer_apply(x, head_weight, head_bias, u, v, s, s_keys, key_tensors, bias, rank, k,
                                        sharpness)
        return y, sigma

    assert torch.autograd.gradcheck(run, (x, head_weight, head_bias, u, v, s, s_keys, bias, *key_tensors))


@pytest.mark.parametrize("key_mode", ["content", "learned"])
def test_whole_layer_function_with_parameters_that_do_not_learn(key_mode):
    """Parameters switched off with requires_grad_(False) get no gradient; the others get the
    composable path's."""
    layer = NeurocoderLinear(10, 6, num_programs=7, rank=3, key_dim=4, sharpness=3.0, key_mode=key_mode,
                             dtype=torch.float64)
    _perturb(layer)
    off = ["composer.head.linear.weight", "memory.u_values", "memory.s_keys"]
    off += ["memory.u_key_map.bias"] if key_mode == "content" else ["memory.v_keys"]
    for name, p in layer.named_parameters():
        if name in off:
            p.requires_grad_(False)
    _assert_paths_agree(layer, torch.randn(9, 10, dtype=torch.float64))
    assert all(dict(layer.named_parameters())[name].grad is None for name in off)


def test_whole_layer_function_with_a_grown_memory_and_after_unfreezing():
    layer = NeurocoderLinear(10, 6, num_programs=8, rank=3, key_dim=4, sharpness=2.0, dtype=torch.float64)
    _perturb(layer)
    layer.memory.freeze([0, 2])
    _assert_paths_agree(layer, torch.randn(5, 10, dtype=torch.float64))     # frozen: the read-only Function
    layer.memory.grow(3)
    layer.memory.unfreeze([0, 2])
    _perturb(layer)
    assert layer.memory.slot_bias is not None
    _assert_paths_agree(layer, torch.randn(5, 10, dtype=torch.float64))     # the whole-layer Function


def test_fused_option_is_validated():
    with pytest.raises(TypeError, match="fused must be True or False"):
        NeurocoderLinear(4, 3, fused="yes")


@pytest.mark.parametrize("learned_sharpness", [False, True])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("slot_bias", [False, True])
def test_fused_function_gradcheck(learned_sharpness, packed, slot_bias):
    torch.manual_seed(1)
    B, T, rank, k, P, d_out = 3, 1 if packed else 2, 2, 3, 5, 4
    J = 3
    C = J * rank * k + 2 + (P if packed else 0)        # two extra columns the read ignores
    f64 = dict(dtype=torch.float64, requires_grad=True)
    head_out = torch.randn(B, T, C, **f64)
    through_memory = None if packed else torch.randn(B, P, **f64)
    keys = torch.randn(J, P, k, **f64)
    sharpness = torch.rand(J, 1, T * rank, B, **f64) + 0.5 if learned_sharpness else 1.7
    bias = torch.randn(J, P, **f64) if slot_bias else None
    s_values = torch.randn(P, **f64)
    v_values = torch.randn(P, d_out, **f64)

    def run(head_out, through_memory, keys, sharpness, bias, s_values, v_values):
        y, sigma, _ = fused_read_apply(head_out, through_memory, rank, k, keys, sharpness, bias, s_values,
                                       v_values)
        return y, sigma

    assert torch.autograd.gradcheck(run, (head_out, through_memory, keys, sharpness, bias, s_values, v_values))


def test_recurrent_composer_steps_equal_nn_lstmcell():
    """The composer computes the context's share of the gates once; the steps must still be
    exactly nn.LSTMCell's."""
    from neurocoder.composer import RecurrentComposer
    composer = RecurrentComposer(7, key_dim=3, rank=2, steps=3, hidden_size=5, dtype=torch.float64)
    _perturb(composer)
    context = torch.randn(4, 7, dtype=torch.float64)
    hidden = composer.initial_hidden.expand(4, -1)
    cell = composer.initial_cell.expand(4, -1)
    states = []
    for _ in range(3):
        hidden, cell = composer.cell(context, (hidden, cell))
        states.append(hidden)
    torch.testing.assert_close(composer.raw(context), composer.head.linear(torch.stack(states, dim=1)))


@pytest.mark.parametrize("options", [{}, {"sharpness": 2.0}], ids=["read-function", "whole-layer-function"])
def test_double_backward_refuses_on_the_fused_path_and_works_on_the_composable_one(options):
    """A gradient penalty (create_graph=True) differentiates a backward pass. The fused backward
    cannot be differentiated correctly, so autograd must refuse rather than return wrong numbers;
    fused=False gives the second derivative."""
    layer = NeurocoderLinear(6, 4, num_programs=5, rank=2, key_dim=3, dtype=torch.float64, **options)
    x = torch.randn(7, 6, dtype=torch.float64).requires_grad_(True)
    (grad_x,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_x.square().sum().backward()
    layer.fused = False
    (grad_x,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    grad_x.square().sum().backward()
    assert layer.memory.u_values.grad is not None and layer.memory.u_values.grad.abs().sum() > 0


@pytest.mark.parametrize("key_mode", ["content", "learned"])
def test_reuse_programs_computes_parameter_constants_once_and_changes_nothing(key_mode, monkeypatch):
    import neurocoder
    torch.manual_seed(0)
    model = torch.nn.Sequential(NeurocoderLinear(12, 9, num_programs=6, rank=3, key_dim=4, key_mode=key_mode),
                                torch.nn.ReLU(), NeurocoderLinear(9, 5, num_programs=6, rank=2, key_dim=4,
                                                                  composer="recurrent", steps=2))
    _perturb(model)
    model.eval()
    x = torch.randn(7, 12)
    with torch.no_grad():
        expected = model(x)
    calls = []
    original = neurocoder.ProgramMemory.keys
    monkeypatch.setattr(neurocoder.ProgramMemory, "keys", lambda self: calls.append(self) or original(self))
    with torch.no_grad(), neurocoder.reuse_programs(model):
        outputs = [model(x) for _ in range(4)]
    assert len(calls) == 2                       # once per layer, not once per call
    for y in outputs:
        assert torch.equal(y, expected)
    assert all(layer._reused is None for layer in model if isinstance(layer, NeurocoderLinear))
    # With gradients on, nothing is reused (the parameters may change between calls) and they flow.
    calls.clear()
    with neurocoder.reuse_programs(model):
        model(x).sum().backward()
        model(x)
    # The recurrent layer's keys are computed on each call (the feed-forward layer's training step
    # makes its keys inside the whole-layer Function, without memory.keys()).
    assert sum(memory is model[2].memory for memory in calls) == 2
    assert model[0].memory.u_values.grad is not None and model[0].memory.u_values.grad.abs().sum() > 0
    # A parameter changed after the block is seen by the next block.
    with torch.no_grad():
        model[2].memory.v_values.mul_(2.0)
        with neurocoder.reuse_programs(model):
            changed = model(x)
    assert not torch.allclose(changed, expected)
    # A parameter changed inside the block (an optimiser step, freeze, load_state_dict) is seen
    # too: version counters mark what was kept as stale, and it is computed once more.
    calls.clear()
    with torch.no_grad(), neurocoder.reuse_programs(model):
        before = model(x)
        model[0].memory.u_values.add_(0.5)
        model[0].composer.head.linear.weight.mul_(1.5)
        after = [model(x) for _ in range(3)]
        model[2].memory.freeze([0, 1])
        frozen = model(x)
    assert len(calls) == 2 + 1 + 1                # both layers at first, then only the one that changed
    with torch.no_grad():
        torch.testing.assert_close(frozen, model(x))
        assert not torch.allclose(after[0], before)
        for y in after:
            assert torch.equal(y, after[0])


def test_reuse_programs_also_reuses_in_training_mode(monkeypatch):
    """An agent's rollout runs no-grad calls in training mode, where every call updates the
    running usage average in place: that must not mark the kept keys as stale."""
    import neurocoder
    torch.manual_seed(0)
    model = torch.nn.Sequential(NeurocoderLinear(12, 9, num_programs=6, rank=3, key_dim=4), torch.nn.ReLU(),
                                NeurocoderLinear(9, 5, num_programs=6, rank=2, key_dim=4))
    _perturb(model)
    model.train()
    x = torch.randn(7, 12)
    with torch.no_grad():
        expected = model(x)
    usage_before = model[0].memory.usage_average.clone()
    calls = []
    original = neurocoder.ProgramMemory.keys
    monkeypatch.setattr(neurocoder.ProgramMemory, "keys", lambda self: calls.append(self) or original(self))
    with torch.no_grad(), neurocoder.reuse_programs(model):
        outputs = [model(x) for _ in range(5)]
        assert len(calls) == 2                   # once per layer, although usage changed every call
        model[0].memory.v_values.mul_(2.0)       # a parameter change is still seen
        changed = model(x)
    assert len(calls) == 3
    assert not torch.equal(model[0].memory.usage_average, usage_before)     # usage kept counting
    for y in outputs:
        assert torch.equal(y, expected)
    assert not torch.allclose(changed, expected)


INFERENCE = [o for o in FUSABLE if o["composer"] == "feedforward" and not o["residual"]]


@pytest.mark.parametrize("separate_context", [False, True])
@pytest.mark.parametrize("options", INFERENCE, ids=option_id)
def test_inference_path_matches_fused_path(options, separate_context, monkeypatch):
    """No-grad eval-mode calls (an agent's rollout) take the lean inference path: same values as
    the fused path, with and without reuse_programs, also after the memory grew (slot offsets)."""
    import neurocoder
    layer = NeurocoderLinear(12, 7, num_programs=9, rank=4, key_dim=5, dtype=torch.float64,
                             context_features=6 if separate_context else None, **options)
    layer.memory.grow(2)
    _perturb(layer)
    layer.eval()
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    context = torch.randn(3, 5, 6, dtype=torch.float64) if separate_context else None
    expected = layer(x, context=context).detach()                 # gradients on: the fused path
    taken = []
    original = NeurocoderLinear._inference_forward
    monkeypatch.setattr(NeurocoderLinear, "_inference_forward",
                        lambda self, *a: taken.append(1) or original(self, *a))
    with torch.no_grad():
        y = layer(x, context=context)
        with neurocoder.reuse_programs(layer):
            kept = [layer(x, context=context) for _ in range(2)]
    assert len(taken) == 3
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    for z in kept:
        assert torch.equal(z, y)


def test_inference_path_is_not_taken_when_it_would_lose_something(monkeypatch):
    """Training mode (the usage average must count), gradients on, a trace, least-used reading,
    the recurrent composer and the working program all keep their own paths."""
    monkeypatch.setattr(NeurocoderLinear, "_inference_forward",
                        lambda *a: (_ for _ in ()).throw(AssertionError("inference path taken")))
    x = torch.randn(4, 12)
    layer = NeurocoderLinear(12, 7, num_programs=9, rank=4, key_dim=5)
    before = layer.memory.usage_average.clone()
    with torch.no_grad():
        layer(x)                                                  # training mode
    assert not torch.equal(layer.memory.usage_average, before)
    layer.eval()
    layer(x).sum().backward()
    with torch.no_grad():
        layer(x, return_trace=True)
        for options in (dict(least_used=3), dict(composer="recurrent", steps=2), dict(residual=True)):
            NeurocoderLinear(12, 7, num_programs=9, rank=4, key_dim=5, **options).eval()(x)


@pytest.mark.parametrize("length", [10, 64, 100, 257])
def test_split_long_inner_product_equals_bmm(length):
    """The hand-made split-K of the keys' gradient (taken on CUDA) equals the plain product,
    also when the chunk does not divide the length."""
    from neurocoder.fused import _bmm_long_inner
    a = torch.randn(3, 7, length, dtype=torch.float64)
    b = torch.randn(3, 5, length, dtype=torch.float64).transpose(1, 2)
    torch.testing.assert_close(_bmm_long_inner(a, b, chunk=16, always_split=True), torch.bmm(a, b))


@pytest.mark.parametrize("sharpness", ["learned", 2.0])
def test_whole_layer_function_takes_non_contiguous_inputs(sharpness):
    layer = NeurocoderLinear(12, 7, num_programs=9, rank=4, key_dim=5, sharpness=sharpness, dtype=torch.float64)
    _perturb(layer)
    _assert_paths_agree(layer, torch.randn(12, 10, dtype=torch.float64).T)                     # (10, 12), transposed
    _assert_paths_agree(layer, torch.randn(4, 12, 5, dtype=torch.float64).transpose(1, 2))     # (4, 5, 12)
