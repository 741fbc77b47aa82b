"""CUDA checks: skipped on machines without a GPU (CI here has none); run by scripts/device_check.sh."""

import copy

import pytest
import torch

import neurocoder
from neurocoder import NeurocoderConv2d, NeurocoderLinear

from conftest import OPTION_GRID, option_id
from test_fused import FUSABLE, _assert_paths_agree, _gradients, _perturb

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("options", OPTION_GRID, ids=option_id)
def test_linear_and_conv_on_cuda_match_cpu(options):
    for layer, x in ((NeurocoderLinear(24, 12, num_programs=9, rank=4, key_dim=5, **options), torch.randn(16, 24)),
                     (NeurocoderConv2d(3, 6, 3, padding=1, num_programs=8, rank=3, **options), torch.randn(4, 3, 9, 9))):
        layer.eval()
        expected = layer(x)
        gpu = layer.cuda()
        y = gpu(x.cuda())
        assert y.device.type == "cuda"
        torch.testing.assert_close(y.cpu(), expected, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(gpu.forward_explicit(x.cuda()), y, rtol=1e-3, atol=1e-4)
        (y.square().mean() + neurocoder.regularization(gpu)).backward()
        assert all(p.grad is not None and p.grad.is_cuda for p in gpu.parameters())


def test_cuda_bf16_autocast_compile_and_save(tmp_path):
    layer = NeurocoderLinear(64, 32).cuda()
    x = torch.randn(32, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-4, atol=1e-4)
    path = layer.save_programs(tmp_path / "p.safetensors")
    assert neurocoder.ProgramMemory.from_file(path, device="cuda").u.is_cuda
    with pytest.raises(ValueError, match="is on cpu but the layer's parameters are on cuda"):
        layer(torch.randn(2, 64))


@pytest.mark.parametrize("options", FUSABLE, ids=option_id)
def test_fused_path_on_cuda_matches_composable_path_and_cpu(options):
    """The fused Function's hand-written backward on the GPU: the same values and gradients as
    the composable path on the GPU, and as the fused path on the CPU (float64)."""
    layer = NeurocoderLinear(12, 7, num_programs=9, rank=4, key_dim=5, dtype=torch.float64, **options)
    _perturb(layer)
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    cpu_layer = copy.deepcopy(layer)
    y_cpu, g_cpu = _gradients(cpu_layer, x)
    gpu_layer = layer.cuda()
    y_gpu = _assert_paths_agree(gpu_layer, x.cuda())
    _, g_gpu = _gradients(copy.deepcopy(gpu_layer), x.cuda())
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-9, atol=1e-10)
    for name, grad in g_cpu.items():
        if grad is not None:
            torch.testing.assert_close(g_gpu[name].cpu(), grad, rtol=1e-7, atol=1e-9, msg=name)


def test_fused_path_compiles_on_cuda():
    layer = NeurocoderLinear(64, 32).cuda()
    x = torch.randn(16, 64, device="cuda")
    assert layer._can_fuse(x, return_trace=False)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-4, atol=1e-4)


def test_fused_keys_gradient_split_on_cuda_matches_composable_path():
    """A batch long enough (R x B >= 8192) that the keys' gradient takes the split product."""
    layer = NeurocoderLinear(12, 7, num_programs=9, rank=4, key_dim=5, dtype=torch.float64).cuda()
    _perturb(layer)
    _assert_paths_agree(layer, torch.randn(2100, 12, dtype=torch.float64, device="cuda"))


@pytest.mark.parametrize("key_mode", ["content", "learned"])
def test_released_mlp_with_orthogonality_over_keys_trains_on_cuda_as_on_cpu(key_mode):
    """The continual-learning model with the released loss (keys and values together): the same
    output, loss and gradients on the GPU as on the CPU (float64), the key columns included."""
    from neurocoder.experiments.models import build_mlp

    torch.manual_seed(0)
    model = build_mlp("neurocoder-released", 64, 1, 2, hidden=32,
                      layer_options={"orthogonality_over_keys": True, "key_mode": key_mode}).double()
    x = torch.randn(16, 64, dtype=torch.float64)

    def loss_and_grads(m, inputs):
        loss = m(inputs).square().mean() + neurocoder.regularization(m)
        grads = torch.autograd.grad(loss, list(m.parameters()))
        return loss, dict(zip([n for n, _ in m.named_parameters()], grads))

    loss_cpu, grads_cpu = loss_and_grads(model, x)
    gpu = copy.deepcopy(model).cuda()
    loss_gpu, grads_gpu = loss_and_grads(gpu, x.cuda())
    torch.testing.assert_close(loss_gpu.cpu(), loss_cpu, rtol=1e-9, atol=1e-10)
    assert any("key_columns" in n for n in grads_cpu) == (key_mode == "content")
    for name, grad in grads_cpu.items():
        assert grads_gpu[name].is_cuda
        torch.testing.assert_close(grads_gpu[name].cpu(), grad, rtol=1e-7, atol=1e-9, msg=name)
