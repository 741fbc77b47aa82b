import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neurocoder.reading import content_attention, least_used_weights, read_with_least_used


def test_content_attention_is_softmax_of_scaled_cosine():
    torch.manual_seed(0)
    q = torch.randn(3, 2, 4, 5, dtype=torch.float64)                 # (J, B, R, k)
    k = torch.randn(3, 7, 5, dtype=torch.float64)                    # (J, P, k)
    a = content_attention(q, k, 2.5)
    cos = torch.nn.functional.cosine_similarity(q[:, :, :, None, :], k[:, None, None, :, :], dim=-1)
    torch.testing.assert_close(a, torch.softmax(2.5 * cos, dim=-1))
    torch.testing.assert_close(a.sum(-1), torch.ones(3, 2, 4, dtype=torch.float64))
    bias = torch.randn(3, 7, dtype=torch.float64)
    torch.testing.assert_close(content_attention(q, k, 2.5, bias), torch.softmax(2.5 * cos + bias[:, None, None], -1))


def test_content_attention_prefers_matching_key():
    keys = torch.eye(4)[None]                                # one bank, 4 slots, k = 4
    q = torch.tensor([0.0, 0.0, 1.0, 0.0])[None, None, None]
    a = content_attention(q, keys, 20.0)
    assert a.argmax().item() == 2 and a[0, 0, 0, 2] > 0.99


def test_least_used_weights_pick_m_smallest_proportional_to_one_minus_usage():
    usage = torch.tensor([[0.9, 0.1, 0.5, 0.0, 0.3]])
    w = least_used_weights(usage, 2)
    # slots 3 (usage 0) and 1 (usage 0.1): weights 1/(1.9) and 0.9/1.9
    expected = torch.tensor([[0.0, 0.9 / 1.9, 0.0, 1.0 / 1.9, 0.0]])
    torch.testing.assert_close(w, expected)


def test_least_used_ties_break_by_slot_index():
    w = least_used_weights(torch.zeros(1, 6), 3)
    torch.testing.assert_close(w, torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0, 0, 0]]))


@settings(max_examples=40, deadline=None)
@given(P=st.integers(2, 12), R=st.integers(1, 8), m_frac=st.floats(0.01, 1.0), seed=st.integers(0, 2**16))
def test_read_weights_sum_to_one_and_gate_one_reads_only_least_used(P, R, m_frac, seed):
    m = max(1, int(round(m_frac * P)))
    g = torch.Generator().manual_seed(seed)
    attention = torch.softmax(torch.randn(3, 2, R, P, generator=g, dtype=torch.float64) * 3, dim=-1)
    gates = torch.rand(3, 2, R, generator=g, dtype=torch.float64)
    weights, usage = read_with_least_used(attention, gates, m)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 2, R, dtype=torch.float64))
    assert (weights >= 0).all()
    torch.testing.assert_close(usage, weights.amax(dim=2))

    # Gate forced to 1: component n reads only the m slots least used by components < n.
    ones = torch.ones_like(gates)
    weights, _ = read_with_least_used(attention, ones, m)
    usage = torch.zeros(3, 2, P, dtype=torch.float64)
    for n in range(R):
        support = weights[:, :, n] > 0
        assert (support.sum(-1) <= m).all()
        allowed = torch.sort(usage, dim=-1, stable=True).indices[..., :m]
        mask = torch.zeros_like(support).scatter(-1, allowed, True)
        assert not (support & ~mask).any()
        usage = torch.maximum(usage, weights[:, :, n])


def test_successive_components_avoid_used_slots():
    # P = 6, m = 2, gate 1: the components must walk over fresh slots (0,1), (2,3), (4,5).
    attention = torch.full((1, 1, 3, 6), 1 / 6)
    weights, usage = read_with_least_used(attention, torch.ones(1, 1, 3), 2)
    support = [set(weights[0, 0, n].nonzero().flatten().tolist()) for n in range(3)]
    assert support == [{0, 1}, {2, 3}, {4, 5}]
    torch.testing.assert_close(usage, torch.full((1, 1, 6), 0.5))


def test_gate_zero_keeps_content_attention():
    attention = torch.softmax(torch.randn(2, 3, 4, 9), dim=-1)
    weights, _ = read_with_least_used(attention, torch.zeros(2, 3, 4), 3)
    torch.testing.assert_close(weights, attention)


def _reference_attention(q, k, sharpness, bias):
    logits = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(k, dim=-1).transpose(-1, -2)
    logits = logits[:, :, :, :] * sharpness
    if bias is not None:
        logits = logits + bias[:, None, None, :]
    return torch.softmax(logits, -1)


def test_content_attention_gradients():
    torch.manual_seed(3)
    q = torch.randn(3, 4, 2, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 6, 5, dtype=torch.float64, requires_grad=True)
    beta = (torch.rand(3, 4, 2, 1, dtype=torch.float64) * 4 + 0.5).requires_grad_()
    bias = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: content_attention(*a), (q, k, beta, bias))
    assert torch.autograd.gradcheck(lambda a, b: content_attention(a, b, 2.0), (q, k))
    g = torch.randn(3, 4, 2, 6, dtype=torch.float64)
    ours = torch.autograd.grad((content_attention(q, k[:, None].squeeze(1), beta, bias) * g).sum(), (q, k, beta, bias))
    ref = torch.autograd.grad((_reference_attention(q, k[:, None], beta, bias) * g).sum(), (q, k, beta, bias))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)
