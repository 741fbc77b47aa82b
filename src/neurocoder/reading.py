"""Reading a program memory: cosine content attention and least-used mixing.

Everything here works on all three banks at once. A bank axis of size 3 (U, V, S, in that
order) comes first, so one batched matrix product attends every bank and each bank's weights
are a contiguous slice.

Shapes used below:
    B  batch            J  banks (3)        R  components read (steps x rank)
    P  program slots    k  key size
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["content_attention", "least_used_weights", "read_with_least_used"]

_EPS = 1e-8


def content_attention(queries: torch.Tensor, keys: torch.Tensor, sharpness: torch.Tensor | float,
                      slot_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over slots of ``sharpness * cos(query, key) (+ slot_bias)``.

    Args:
        queries: (J, B, R, k).
        keys: (J, P, k), one key matrix per bank.
        sharpness: a float, or a tensor broadcastable to (J, B, R, 1).
        slot_bias: optional (J, P) offsets added to the logits (a grown memory's).

    Returns:
        (J, B, R, P): attention weights, each row sums to 1.
    """
    J, B, R, _ = queries.shape
    # Scaling the unit queries by the sharpness costs k multiplies per query instead of P.
    q = F.normalize(queries, dim=-1, eps=_EPS)
    if isinstance(sharpness, torch.Tensor) or sharpness != 1.0:
        q = q * sharpness
    k = F.normalize(keys, dim=-1, eps=_EPS)
    if slot_bias is None:
        logits = torch.bmm(q.reshape(J, B * R, q.shape[-1]), k.transpose(1, 2))
    else:
        logits = torch.baddbmm(slot_bias[:, None, :], q.reshape(J, B * R, q.shape[-1]), k.transpose(1, 2))
    return torch.softmax(logits, dim=-1).view(J, B, R, keys.shape[1])


def least_used_weights(usage: torch.Tensor, least_used: int) -> torch.Tensor:
    """The least-used read weight for a given usage.

    Mass goes to the ``least_used`` slots of smallest usage, proportional to ``1 - usage``
    and normalised to sum to 1. Ties are broken by slot index (lower index first), so the
    result is deterministic.

    Args:
        usage: (..., P), values in [0, 1].
        least_used: m, the number of slots that share the weight (1 <= m <= P).

    Returns:
        (..., P): non-negative, zero outside the m chosen slots, sums to 1.
    """
    # A stable sort makes tie-breaking independent of the backend.
    order = torch.sort(usage, dim=-1, stable=True).indices[..., :least_used]
    chosen = torch.zeros_like(usage).scatter(-1, order, 1.0)
    # The floor keeps the weight defined when every chosen slot is fully used (usage 1).
    raw = chosen * (1.0 - usage).clamp_min(_EPS)
    return raw / raw.sum(dim=-1, keepdim=True)


def read_with_least_used(
    attention: torch.Tensor, gates: torch.Tensor, least_used: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix content attention with least-used weights, one component after another.

    Usage within one composition is the largest final weight a slot has received from the
    components read so far (earlier steps, and earlier components of the same step). Each
    component n reads ``w_n = (1 - g_n) a_n + g_n l_n`` where ``l_n`` is the least-used weight
    of the usage before n. Successive components are thus pushed onto different slots.

    Args:
        attention: (J, B, R, P) content attention, components in reading order.
        gates: (J, B, R), interpolating gates in (0, 1).
        least_used: m, see :func:`least_used_weights`.

    Returns:
        weights: (J, B, R, P), each row sums to 1.
        usage: (J, B, P), the usage after the last component.
    """
    if _native_applies(attention, gates):
        return _NativeLeastUsedRead.apply(attention, gates, least_used)
    usage = torch.zeros_like(attention[:, :, 0])
    rows = []
    for n in range(attention.shape[2]):
        gate = gates[:, :, n, None]
        weight = (1.0 - gate) * attention[:, :, n] + gate * least_used_weights(usage, least_used)
        usage = torch.maximum(usage, weight)
        rows.append(weight)
    return torch.stack(rows, dim=2), usage


def _native_applies(attention: torch.Tensor, gates: torch.Tensor) -> bool:
    """Whether the C++ kernel can run this read: CPU tensors of one dtype (float32 or float64),
    outside torch.compile and torch.func transforms, kernels built."""
    if attention.device.type != "cpu" or attention.dtype not in (torch.float32, torch.float64) \
            or gates.dtype != attention.dtype or gates.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    if wrapped is not None and (wrapped(attention) or wrapped(gates)):
        return False
    from . import native
    return native.ops() is not None


class _NativeLeastUsedRead(torch.autograd.Function):
    """:func:`read_with_least_used` through the C++ kernels of :mod:`neurocoder.native` (CPU): one
    pass per (bank, sample) row instead of ~10 operations per component forward and ~20 backward.
    Tests (tests/test_native.py) check it against the Python loop, values and gradients."""

    @staticmethod
    def forward(ctx, attention, gates, least_used):
        from . import native
        weights, usage, usage_before, least = native.ops().least_used_read_forward(attention, gates, least_used)
        ctx.save_for_backward(attention, gates, weights, usage_before, least)
        ctx.set_materialize_grads(False)
        return weights, usage

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_weights, grad_usage):
        # once_differentiable: the saved tensors were computed without a graph (as fused.py's).
        from . import native
        if grad_weights is None and grad_usage is None:
            return None, None, None
        grad_attention, grad_gates = native.ops().least_used_read_backward(grad_weights, grad_usage,
                                                                          *ctx.saved_tensors)
        return grad_attention, grad_gates, None
