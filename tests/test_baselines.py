import pytest
import torch

from neurocoder import MoELinear, NSMLinear, load_balancing_loss


def test_nsm_is_attention_mixture_of_whole_matrices():
    layer = NSMLinear(6, 4, num_programs=3, key_dim=5, dtype=torch.float64)
    x = torch.randn(5, 6, dtype=torch.float64)
    y, weights = layer(x, return_attention=True)
    torch.testing.assert_close(weights.sum(-1), torch.ones(5, dtype=torch.float64))
    composed = torch.einsum("bp,pio->bio", weights, layer.programs)
    torch.testing.assert_close(y, torch.bmm(x[:, None], composed)[:, 0] + layer.bias)
    assert sum(p.numel() for p in layer.parameters()) == 3 * 24 + 3 * 5 + (6 * 5 + 5) + 4


def test_nsm_shapes_and_errors():
    layer = NSMLinear(6, 4)
    assert layer(torch.randn(2, 3, 6)).shape == (2, 3, 4)
    with pytest.raises(ValueError, match=r"expected input of shape \(\.\.\., 6\), got \(2, 5\)"):
        layer(torch.randn(2, 5))
    with pytest.raises(ValueError, match="num_programs must be an integer >= 1"):
        NSMLinear(6, 4, num_programs=0)


def test_moe_routes_to_top_k_and_balances():
    torch.manual_seed(0)
    layer = MoELinear(8, 3, num_experts=4, top_k=2, dtype=torch.float64)
    with torch.no_grad():
        layer.gate.weight.normal_()
    layer.eval()
    x = torch.randn(10, 8, dtype=torch.float64)
    y, gates = layer(x, return_gates=True)
    assert ((gates > 0).sum(-1) == 2).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(10, dtype=torch.float64))
    dense = torch.einsum("bi,eio->beo", x, layer.experts) + layer.expert_bias
    torch.testing.assert_close(y, torch.einsum("be,beo->bo", gates, dense))
    # Balanced routing gives a balance loss of 1; it is differentiable through the gate.
    loss = load_balancing_loss(torch.nn.Sequential(layer))
    assert 0 < loss.item() <= layer.num_experts
    loss.backward()
    assert layer.gate.weight.grad is not None and layer.gate.weight.grad.abs().sum() > 0


def test_moe_balance_loss_is_one_when_uniform():
    layer = MoELinear(8, 3, num_experts=4, top_k=1, noisy_gating=False)
    layer.eval()
    # Zero gate weights: uniform probabilities 1/4; top-1 picks expert 0 for all -> f = (1,0,0,0)
    layer(torch.randn(16, 8))
    torch.testing.assert_close(layer.balance_loss, torch.tensor(1.0))


def test_moe_dense_and_sparse_dispatch_agree():
    """The dense dispatch (every expert on every row, zero gates drop the rest) gives the sparse
    dispatch's output and gradients."""
    torch.manual_seed(0)
    sparse = MoELinear(8, 3, num_experts=5, top_k=2, noisy_gating=False, dispatch="sparse", dtype=torch.float64)
    dense = MoELinear(8, 3, num_experts=5, top_k=2, noisy_gating=False, dispatch="dense", dtype=torch.float64)
    dense.load_state_dict(sparse.state_dict())
    with torch.no_grad():
        sparse.gate.weight.normal_()
        dense.gate.weight.copy_(sparse.gate.weight)
    x = torch.randn(6, 8, dtype=torch.float64)
    y_sparse, y_dense = sparse(x), dense(x)
    torch.testing.assert_close(y_dense, y_sparse)
    y_sparse.square().sum().backward()
    y_dense.square().sum().backward()
    torch.testing.assert_close(dense.experts.grad, sparse.experts.grad)
    torch.testing.assert_close(dense.gate.weight.grad, sparse.gate.weight.grad)
    assert sparse.experts.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="dispatch"):
        MoELinear(8, 3, dispatch="fast")


def test_moe_errors():
    with pytest.raises(ValueError, match="top_k=5 exceeds num_experts=4"):
        MoELinear(8, 3, num_experts=4, top_k=5)
    with pytest.raises(TypeError, match="floating-point"):
        MoELinear(8, 3)(torch.ones(2, 8, dtype=torch.long))


def test_baselines_read_a_separate_context():
    """NSM's query and MoE's gate can read a context of their own, as NeurocoderLinear's composer."""
    x, cue = torch.randn(6, 8), torch.randn(6, 3)
    nsm = NSMLinear(8, 4, num_programs=5, context_features=3)
    moe = MoELinear(8, 4, num_experts=5, top_k=2, context_features=3).eval()
    torch.nn.init.normal_(moe.gate.weight, std=3.0)   # zero at init (balanced routing): give it a say
    for layer in (nsm, moe):
        y = layer(x, cue)
        assert y.shape == (6, 4)
        # The mixture follows the context: another cue, another output for the same x.
        assert not torch.allclose(layer(x, -cue), y)
        with pytest.raises(ValueError, match="context_features=3; pass forward"):
            layer(x)
        with pytest.raises(ValueError, match="must have 3 features"):
            layer(x, torch.randn(6, 2))
    _, weights = nsm(x, cue, return_attention=True)
    assert torch.allclose(weights.sum(-1), torch.ones(6), atol=1e-6)
    with pytest.raises(ValueError, match="built without context_features"):
        NSMLinear(8, 4)(x, cue)


@pytest.mark.parametrize("dispatch", ["sparse", "dense"])
def test_baselines_take_an_empty_batch(dispatch):
    moe = MoELinear(8, 4, num_experts=4, top_k=2, dispatch=dispatch)
    x = torch.randn(0, 8, requires_grad=True)
    y = moe(x)
    assert y.shape == (0, 4) and moe.balance_loss.item() == 0.0
    (y.sum() + load_balancing_loss(moe)).backward()
    assert x.grad.shape == (0, 8)
    nsm = NSMLinear(8, 4, num_programs=3)
    y = nsm(x)
    assert y.shape == (0, 4)
    y.sum().backward()
