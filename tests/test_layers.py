import pytest
import torch
import torch.nn as nn

import neurocoder
from neurocoder import NeurocoderConv2d, NeurocoderLinear

from conftest import OPTION_GRID, option_id


def _perturb(module: nn.Module) -> None:
    """Move every parameter off its initial value, so zero-initialised parts (bias) matter."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)


@pytest.mark.parametrize("options", OPTION_GRID, ids=option_id)
def test_linear_fast_path_equals_explicit_composition(options):
    layer = NeurocoderLinear(12, 7, num_programs=9, rank=4, key_dim=5, dtype=torch.float64, **options)
    _perturb(layer)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    y, trace = layer(x, return_trace=True)
    assert y.shape == (2, 5, 7)
    torch.testing.assert_close(y, layer.forward_explicit(x), rtol=1e-5, atol=1e-5)
    R = options["steps"] * 4
    assert trace.sigma.shape == (10, R)
    for bank in ("u", "v", "s"):
        assert trace.read_weights[bank].shape == (10, options["steps"], 4, 9)
        assert trace.attention[bank].shape == (10, options["steps"], 4, 9)
        assert trace.usage[bank].shape == (10, 9)
        torch.testing.assert_close(trace.read_weights[bank].sum(-1), torch.ones(10, options["steps"], 4,
                                                                              dtype=torch.float64))
    assert (trace.gates is not None) == (options["least_used"] > 0)
    assert (trace.residual_gate is not None) == options["residual"]
    assert trace.sharpness.shape == (10, 3, R) and (trace.sharpness > 0).all()


@pytest.mark.parametrize("options", OPTION_GRID, ids=option_id)
def test_conv_fast_path_equals_explicit_composition(options):
    layer = NeurocoderConv2d(3, 5, 3, stride=2, padding=1, num_programs=6, rank=2, key_dim=4,
                             dtype=torch.float64, **options)
    _perturb(layer)
    x = torch.randn(3, 3, 9, 8, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (3, 5, 5, 4)
    torch.testing.assert_close(y, layer.forward_explicit(x), rtol=1e-5, atol=1e-5)


def test_conv_matches_nn_conv2d_geometry():
    for kwargs in (dict(kernel_size=3, padding=1), dict(kernel_size=(3, 5), stride=(2, 1), padding=(0, 2)),
                   dict(kernel_size=3, dilation=2, padding="same"), dict(kernel_size=1)):
        ref = nn.Conv2d(4, 6, **kwargs)
        layer = NeurocoderConv2d(4, 6, **kwargs)
        x = torch.randn(2, 4, 11, 10)
        assert layer(x).shape == ref(x).shape


def test_float32_fast_path_close_to_explicit():
    layer = NeurocoderLinear(64, 32, least_used=4, residual=True)
    x = torch.randn(16, 64)
    torch.testing.assert_close(layer(x), layer.forward_explicit(x), rtol=1e-4, atol=1e-5)


def test_separate_context():
    layer = NeurocoderLinear(10, 4, context_features=3, dtype=torch.float64)
    x, c = torch.randn(6, 10, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    y = layer(x, context=c)
    torch.testing.assert_close(y, layer.forward_explicit(x, context=c))
    # The weight depends on the context alone: the same context gives the same weight.
    w = layer.compose_weight(x, context=c[:1].expand(6, 3))
    torch.testing.assert_close(w[0], w[5])
    conv = NeurocoderConv2d(2, 3, 3, context_features=5, dtype=torch.float64)
    xi, ci = torch.randn(4, 2, 6, 6, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(conv(xi, context=ci), conv.forward_explicit(xi, context=ci))


def test_composed_weight_differs_by_input():
    layer = NeurocoderLinear(16, 8)
    w = layer.compose_weight(torch.randn(2, 16))
    assert (w[0] - w[1]).abs().max() > 1e-4


@pytest.mark.parametrize("composer,steps", [("feedforward", 1), ("recurrent", 4)])
def test_sigma_positive_and_descending(composer, steps):
    layer = NeurocoderLinear(20, 10, rank=5, composer=composer, steps=steps)
    _perturb(layer)
    _, trace = layer(torch.randn(32, 20) * 3, return_trace=True)
    assert trace.sigma.shape == (32, 5 * steps)
    assert (trace.sigma > 0).all()
    assert (trace.sigma[:, :-1] > trace.sigma[:, 1:]).all()


def test_singular_values_formula():
    raw = torch.tensor([[0.3, -1.0, 2.0]], dtype=torch.float64)
    sp = torch.nn.functional.softplus(raw)
    expected = torch.stack([sp[0].sum(), sp[0, 1:].sum(), sp[0, 2]])[None]
    torch.testing.assert_close(neurocoder.singular_values(raw), expected)


@pytest.mark.parametrize("layer_factory,shape", [
    (lambda **o: NeurocoderLinear(8, 5, num_programs=6, rank=3, **o), (4, 8)),
    (lambda **o: NeurocoderConv2d(2, 3, 3, num_programs=6, rank=3, **o), (4, 2, 5, 5)),
])
@pytest.mark.parametrize("options", [
    dict(), dict(composer="recurrent", steps=2, least_used=2, residual=True, key_mode="learned"),
])
def test_gradients_reach_every_learnable_parameter(layer_factory, shape, options):
    layer = layer_factory(**options)
    _perturb(layer)
    y = layer(torch.randn(*shape))
    (y.square().mean() + neurocoder.regularization(layer)).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_frozen_slots_get_no_gradient():
    layer = NeurocoderLinear(8, 5, num_programs=6, rank=3, key_mode="learned")
    layer.memory.freeze([0, 2])
    y = layer(torch.randn(4, 8))
    (y.square().mean() + neurocoder.regularization(layer)).backward()
    mem = layer.memory
    for name in ("u_values", "v_values", "s_values", "u_keys", "v_keys", "s_keys"):
        grad = getattr(mem, name).grad
        assert grad[[0, 2]].abs().sum() == 0, name
        assert grad[[1, 3, 4, 5]].abs().sum() > 0, name


def test_running_usage_average_updates_only_in_training():
    layer = NeurocoderLinear(8, 5, num_programs=6, rank=3)
    layer.eval()
    layer(torch.randn(4, 8))
    assert layer.memory.usage_average.abs().sum() == 0
    layer.train()
    layer(torch.randn(4, 8))
    avg = layer.memory.usage_average
    assert avg.shape == (3, 6) and (avg > 0).all()


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("kind", ["fused", "composable", "least-used", "conv"])
def test_activation_checkpointing_counts_a_batch_once_in_the_usage_average(kind, reentrant):
    """torch.utils.checkpoint runs a training-mode forward again inside backward: the running
    usage average must move as for one plain step, and the gradients must be the plain ones."""
    from torch.utils.checkpoint import checkpoint

    def make():
        torch.manual_seed(3)
        if kind == "conv":
            return NeurocoderConv2d(3, 4, 3, num_programs=6, rank=2), torch.randn(5, 3, 8, 8)
        layer = NeurocoderLinear(8, 5, num_programs=6, rank=3, least_used=2 if kind == "least-used" else 0)
        layer.fused = kind == "fused"
        return layer, torch.randn(5, 8)

    plain, x = make()
    plain(x.requires_grad_()).square().sum().backward()
    checkpointed, x2 = make()
    checkpoint(checkpointed, x2.requires_grad_(), use_reentrant=reentrant).square().sum().backward()
    assert plain.memory.usage_average.abs().sum() > 0
    torch.testing.assert_close(checkpointed.memory.usage_average, plain.memory.usage_average)
    torch.testing.assert_close(x2.grad, x.grad)
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)


@pytest.mark.parametrize("options", OPTION_GRID, ids=option_id)
def test_an_empty_batch_gives_an_empty_output_as_nn_linear(options):
    """(0, d_in) -> (0, d_out) on both paths, in training and evaluation, with a backward pass;
    the running usage average takes nothing from it (its mean over no rows would be NaN)."""
    for fused in (True, False):
        layer = NeurocoderLinear(12, 7, num_programs=9, rank=4, key_dim=5, **options)
        layer.fused = fused
        layer(torch.randn(3, 12))
        before = layer.memory.usage_average.clone()
        for training in (True, False):
            layer.train(training)
            x = torch.randn(0, 12, requires_grad=True)
            y = layer(x)
            assert y.shape == (0, 7)
            y.sum().backward()
            assert x.grad.shape == (0, 12)
            assert layer(torch.randn(2, 0, 12), return_trace=True)[0].shape == (2, 0, 7)
        torch.testing.assert_close(layer.memory.usage_average, before)
    conv = NeurocoderConv2d(3, 4, 3, num_programs=6, rank=2, **{k: v for k, v in options.items() if k != "bias"})
    y = conv(torch.randn(0, 3, 8, 8, requires_grad=True))
    assert y.shape == (0, 4, 6, 6)
    y.sum().backward()
    assert torch.isfinite(conv.memory.usage_average).all()


def test_conv_takes_an_unbatched_input_as_nn_conv2d():
    conv = NeurocoderConv2d(3, 4, 3, padding=1, num_programs=6, rank=2, context_features=2)
    conv.eval()
    x, context = torch.randn(3, 8, 8), torch.randn(2)
    y, trace = conv(x, context, return_trace=True)
    assert y.shape == (4, 8, 8) and trace.sigma.shape == (1, 2)
    torch.testing.assert_close(y, conv(x[None], context[None])[0])
    with pytest.raises(ValueError, match=r"expected input of shape \(B, 3, H, W\), got \(5, 8, 8\)"):
        conv(torch.randn(5, 8, 8), context)


def test_extra_repr_names_options():
    text = repr(NeurocoderLinear(8, 5, least_used=2))
    assert "in_features=8" in text and "least_used=2" in text and "num_programs=50" in text


def test_state_dict_round_trip():
    a = NeurocoderLinear(12, 6, composer="recurrent", steps=2, least_used=2, residual=True)
    a.memory.freeze([1])
    b = NeurocoderLinear(12, 6, composer="recurrent", steps=2, least_used=2, residual=True)
    b.load_state_dict(a.state_dict())
    assert b.memory.frozen_slots == [1]
    x = torch.randn(5, 12)
    a.eval(), b.eval()
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_bfloat16_autocast():
    for layer, x in ((NeurocoderLinear(32, 16, residual=True), torch.randn(8, 32)),
                     (NeurocoderLinear(32, 16, composer="recurrent", steps=2), torch.randn(8, 32)),
                     (NeurocoderConv2d(4, 8, 3, padding=1), torch.randn(2, 4, 8, 8))):
        reference = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()
        rel = (y.float() - reference).norm() / reference.norm()
        assert rel < 0.05, rel


def test_bfloat16_autocast_with_least_used():
    # Least-used reading picks the m slots of smallest usage: a discrete choice that bfloat16
    # rounding of the composer's queries can flip between near-equal slots, so the output is not
    # compared to float32 here, only checked to be finite with finite gradients.
    layer = NeurocoderLinear(32, 16, least_used=3, residual=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, trace = layer(torch.randn(8, 32), return_trace=True)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    assert trace.read_weights["u"].dtype == torch.float32  # reading runs in float32
    y.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)


def test_bfloat16_parameters():
    layer = NeurocoderLinear(32, 16, dtype=torch.bfloat16)
    y = layer(torch.randn(4, 32, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


def test_device_follows_parameters():
    layer = NeurocoderLinear(8, 4, device="meta")
    assert layer.memory.u.device.type == "meta"
    y = layer(torch.randn(3, 8, device="meta"))
    assert y.shape == (3, 4) and y.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    layer = NeurocoderLinear(32, 16, least_used=3)
    x = torch.randn(8, 32)
    expected = layer(x)
    torch.testing.assert_close(layer.cuda()(x.cuda()).cpu(), expected, rtol=1e-4, atol=1e-4)
