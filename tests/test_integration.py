"""torch.compile, torch.func, presets and traces over a loader."""

import pytest
import torch
import torch.nn as nn

import neurocoder
from neurocoder import NeurocoderConv2d, NeurocoderLinear, presets


def test_torch_func_grad_and_vmap():
    layer = NeurocoderLinear(10, 4, num_programs=6, rank=3).eval()
    params = {name: p.detach() for name, p in layer.named_parameters()}
    buffers = {name: b for name, b in layer.named_buffers()}
    x = torch.randn(5, 10)

    def loss(p, inputs):
        return torch.func.functional_call(layer, (p, buffers), (inputs,)).square().sum()

    grads = torch.func.grad(loss)(params, x)
    loss(dict(layer.named_parameters()), x).backward()
    for name, p in layer.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6)
    # Per-sample gradients: vmap over the batch.
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x.unsqueeze(1))
    torch.testing.assert_close(per_sample["memory.u_values"].sum(0), grads["memory.u_values"], rtol=1e-4, atol=1e-5)


def test_torch_func_in_training_mode_does_not_break_on_usage_update():
    layer = NeurocoderLinear(10, 4, num_programs=6, rank=3)
    params = {name: p.detach() for name, p in layer.named_parameters()}
    out = torch.func.grad(lambda p: torch.func.functional_call(layer, p, (torch.randn(3, 10),)).sum())(params)
    assert out["memory.u_values"].shape == (6, 10)


@pytest.mark.slow
@pytest.mark.parametrize("options", [dict(), dict(least_used=3, residual=True)])
def test_torch_compile_fullgraph_feedforward(options):
    layer = NeurocoderLinear(24, 8, num_programs=10, rank=4, **options)
    x = torch.randn(16, 24)
    expected = layer(x)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
    compiled(x).sum().backward()
    assert layer.memory.u_values.grad is not None


@pytest.mark.slow
def test_torch_compile_conv_and_recurrent():
    for layer, x in ((NeurocoderConv2d(3, 6, 3, padding=1, num_programs=8, rank=3), torch.randn(2, 3, 8, 8)),
                     (NeurocoderLinear(12, 5, composer="recurrent", steps=3), torch.randn(4, 12))):
        expected = layer(x)
        torch.testing.assert_close(torch.compile(layer)(x), expected, rtol=1e-5, atol=1e-5)


def _mlp400(out=2, output_bias=True):
    return nn.Sequential(nn.Flatten(), nn.Linear(1024, 400, bias=False), nn.ReLU(),
                         nn.Linear(400, 400, bias=False), nn.ReLU(), nn.Linear(400, out, bias=output_bias))


def test_released_preset_parameter_count():
    plain = _mlp400()
    assert sum(p.numel() for p in plain.parameters()) == 570_402          # METHOD.md
    # In the released Neurocoder MLP no layer applies a bias, the output layer included.
    model = neurocoder.convert(_mlp400(output_bias=False), ["1", "3", "5"], **presets.layer_options("released"))
    ours = sum(p.numel() for p in model.parameters())
    # The released code counts 423,539: 4,129 of those never reach the output (see presets.py).
    assert ours == 419_410
    assert ours + presets.RELEASED_INERT_PARAMETERS == 423_539
    layer = model[1]
    assert layer.num_programs == 50 and layer.rank == 10 and layer.key_dim == 5 and layer.sharpness == 1.0
    assert layer.memory.key_mode == "content" and layer.least_used == 0 and layer.bias is None
    with pytest.raises(ValueError, match="unknown preset 'paper'"):
        presets.layer_options("paper")


def test_usage_by_label_separates_classes():
    torch.manual_seed(0)
    # Two well-separated classes; after training, their reads should differ.
    x = torch.cat([torch.randn(64, 6) + 3, torch.randn(64, 6) - 3])
    y = torch.cat([torch.zeros(64), torch.ones(64)]).long()
    model = nn.Sequential(NeurocoderLinear(6, 8, num_programs=10, rank=2), nn.ReLU(), nn.Linear(8, 2))
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 128, 32)]
    matrices = neurocoder.usage_by_label(model, batches, num_labels=3)
    usage = matrices["0"]
    assert usage.shape == (3, 10)
    torch.testing.assert_close(usage[:2].sum(-1), torch.ones(2))
    assert (usage[2] == 0).all()  # label 2 never seen
    # Computed by hand for class 0:
    _, trace = model[0](x[:64], return_trace=True)
    torch.testing.assert_close(usage[0], trace.slot_usage("u").mean(0).detach())
    with pytest.raises(ValueError, match="holds no Neurocoder layer"):
        neurocoder.usage_by_label(nn.Linear(3, 2), batches, 2)
    # A summary builds no autograd graph (the model runs under no_grad).
    grad_modes = []
    hook = model[0].register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    neurocoder.usage_by_label(model, batches, num_labels=3)
    hook.remove()
    assert grad_modes and not any(grad_modes)
    # Labels it cannot count are errors that name them, not silent truncation or an index error.
    for labels, message in ((torch.tensor([0, 1, 7]), r"label 7 lies outside \[0, 3\)"),
                            (torch.tensor([0, -1, 2]), r"label -1 lies outside \[0, 3\)"),
                            (torch.tensor([0.0, 0.5, 1.0]), "labels must be whole numbers .*got 0.5")):
        with pytest.raises(ValueError, match=message):
            neurocoder.usage_by_label(model, [(x[:3], labels)], num_labels=3)
    with pytest.raises(ValueError, match="num_labels must be an integer >= 1, got 0"):
        neurocoder.usage_by_label(model, batches, num_labels=0)
    floats = neurocoder.usage_by_label(model, [(x[:64], y[:64].float())], num_labels=3)     # 0.0, 1.0 are fine
    torch.testing.assert_close(floats["0"][0], usage[0])
