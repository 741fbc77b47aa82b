"""A fused read-and-apply for NeurocoderLinear: content attention, singular values and the
low-rank apply in one autograd Function with a hand-written backward.

Why: at the released shape the arithmetic of a Neurocoder layer is about half a dense layer's,
but the eager autograd version spends most of its time in ~60 small operations and their
bookkeeping. This Function runs the same maths in about 15 forward and 25 backward operations,
on a slot-first, component-major layout ``(bank, slot, component x batch)`` so that the
softmax and every reduction run over contiguous rows of the batch instead of short rows of P
or R.

It covers the common case: no least-used reading (whose sequential usage bookkeeping stays in
:mod:`neurocoder.reading`), no trace requested, outside torch.func transforms and autocast.
:class:`~neurocoder.layers.NeurocoderLinear` falls back to the composable path otherwise, and
tests check both paths agree in value and gradient.

Shapes:
    J  banks (3: U, V, S)   P  slots   k  key size   B  batch   R  components   N = B x R
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["fused_read_apply"]

_EPS = 1e-8


class _FusedReadApply(torch.autograd.Function):
    @staticmethod
    def forward(ctx, head_out, through_memory, rank, key_dim, keys, sharpness, slot_bias, s_values, v_values,
                want_usage):
        """See :func:`fused_read_apply`."""
        B, T, C = head_out.shape
        J, P, k = keys.shape
        R, N, Q = T * rank, T * rank * B, J * rank * key_dim
        queries = head_out[..., :Q].unflatten(-1, (J, rank, k)).permute(2, 4, 1, 3, 0)    # (J, k, T, r, B)
        packed = through_memory is None
        if packed:
            through_memory = head_out[:, 0, C - P:]                          # (B, P)
        query_norm = torch.linalg.vector_norm(queries, dim=1, keepdim=True).clamp_min_(_EPS)
        if torch.compiler.is_compiling():
            unit_queries = (queries / query_norm).reshape(J, k, N)
        else:
            # Written into a contiguous buffer: the queries arrive as a permuted view.
            unit_queries = torch.empty((J, k, T, rank, B), device=queries.device, dtype=queries.dtype)
            torch.div(queries, query_norm, out=unit_queries)
            unit_queries = unit_queries.view(J, k, N)                        # (J, k, N)
        key_norm = torch.linalg.vector_norm(keys, dim=2, keepdim=True).clamp_min_(_EPS)
        unit_keys = keys / key_norm                                          # (J, P, k)
        learned_sharpness = isinstance(sharpness, torch.Tensor)
        scaled_queries = _scale(unit_queries, sharpness, J, N)
        if slot_bias is None:
            logits = torch.bmm(unit_keys, scaled_queries)                    # (J, P, N)
        else:
            logits = torch.baddbmm(slot_bias.unsqueeze(-1), unit_keys, scaled_queries)
        weights = torch.softmax(logits, dim=1)                               # (J, P, N)
        read_u, read_v, read_s = weights.view(J, P, R, B).unbind(0)          # (P, R, B) each

        raw_sigma = (s_values @ read_s.reshape(P, N)).view(R, B)
        reverse_cumsum = _reverse_cumsum(R, keys)
        sigma = reverse_cumsum @ F.softplus(raw_sigma)                       # (R, B), descending in R
        memory_by_slot = through_memory.T.contiguous()                      # (P, B)
        projected = (read_u * memory_by_slot.unsqueeze(1)).sum(0)             # (R, B): u_n . x
        per_component = projected * sigma
        mixed = (read_v * per_component).sum(1)                               # (P, B)
        y = mixed.T @ v_values                                               # (B, d_out)

        ctx.save_for_backward(unit_queries, query_norm, unit_keys, key_norm, weights, memory_by_slot,
                              s_values, v_values, raw_sigma, sigma, projected, per_component, mixed,
                              reverse_cumsum, sharpness if learned_sharpness else None)
        ctx.fixed_sharpness = None if learned_sharpness else float(sharpness)
        ctx.has_slot_bias = slot_bias is not None
        ctx.layout = (B, T, C, rank, packed)
        ctx.set_materialize_grads(False)
        if want_usage:
            # Each slot's largest weight in a composition, batch-averaged: the usage signal.
            usage = weights.view(J, P, R, B).amax(dim=2).mean(dim=2)         # (J, P)
        else:
            usage = weights.new_zeros(J, P)
        ctx.mark_non_differentiable(usage)
        return y, sigma.T, usage

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_sigma, _grad_usage):
        # once_differentiable: the tensors saved above were computed without a graph, so a second
        # differentiation through this backward would silently miss their dependence on the
        # inputs. Higher-order gradients need the composable path (fused=False); autograd then
        # says so instead of returning wrong numbers.
        (unit_queries, query_norm, unit_keys, key_norm, weights, memory_by_slot, s_values, v_values,
         raw_sigma, sigma, projected, per_component, mixed, reverse_cumsum, sharpness) = ctx.saved_tensors
        B, T, C, rank, packed = ctx.layout
        J, k, N = unit_queries.shape
        P = unit_keys.shape[1]
        R = T * rank
        read_u, read_v, read_s = weights.reshape(J, P, R, B).unbind(0)
        if grad_y is None:
            grad_y = mixed.new_zeros(B, v_values.shape[1])

        grad_v_values = mixed @ grad_y                                        # (P, d_out)
        grad_mixed = v_values @ grad_y.T                                      # (P, B)
        grad_per_component = (read_v * grad_mixed.unsqueeze(1)).sum(0)        # (R, B)
        grad_projected = grad_per_component * sigma
        grad_sigma_total = grad_per_component * projected
        if grad_sigma is not None:
            grad_sigma_total = grad_sigma_total + grad_sigma.T
        grad_through_memory = (read_u * grad_projected).sum(1).T              # (B, P)
        grad_raw_sigma = (reverse_cumsum.T @ grad_sigma_total) * torch.sigmoid(raw_sigma)
        grad_s_values = read_s.reshape(P, N) @ grad_raw_sigma.reshape(N)

        # d loss / d read weights, bank by bank, in one (J, P, N) buffer for the softmax.
        grad_u = (memory_by_slot.unsqueeze(1), grad_projected)
        grad_v = (grad_mixed.unsqueeze(1), per_component)
        grad_s = (s_values.unsqueeze(-1), grad_raw_sigma.reshape(1, N))
        # Writes into preallocated views (out=) save copies; the compiler's functional graphs
        # reject them.
        functional = torch.compiler.is_compiling()
        if functional:
            grad_read = torch.stack([(a * b).reshape(P, N) for a, b in (grad_u, grad_v, grad_s)])
        else:
            # Writing each product into its slice saves a copy of the whole buffer.
            grad_read = torch.empty((J, P, N), device=weights.device, dtype=weights.dtype)
            for j, (a, b) in enumerate((grad_u, grad_v, grad_s)):
                torch.mul(a, b, out=grad_read[j].view(P, R, B) if j < 2 else grad_read[j])
        grad_logits = torch._softmax_backward_data(grad_read, weights, 1, weights.dtype)   # (J, P, N)

        grad_slot_bias = grad_logits.sum(2) if ctx.has_slot_bias else None
        sharpness_or_fixed = sharpness if sharpness is not None else ctx.fixed_sharpness
        scaled_queries = _scale(unit_queries, sharpness_or_fixed, J, N)
        grad_unit_keys = _bmm_long_inner(grad_logits, scaled_queries.transpose(1, 2))   # (J, P, k)
        grad_scaled_queries = torch.bmm(unit_keys.transpose(1, 2), grad_logits)   # (J, k, N)
        grad_sharpness = None
        if sharpness is not None:
            grad_sharpness = (grad_scaled_queries * unit_queries).sum(1, keepdim=True).reshape(sharpness.shape)
        grad_unit_queries = _scale(grad_scaled_queries, sharpness_or_fixed, J, N)
        grad_keys = (grad_unit_keys - unit_keys * (grad_unit_keys * unit_keys).sum(2, keepdim=True)) / key_norm
        # Backward of x / |x|: (g - x_hat (g . x_hat)) / |x|, written straight into the gradient of
        # the head's raw output (B, T, C), whose query columns are laid out (J, r, k).
        grad_queries = (grad_unit_queries - unit_queries * (grad_unit_queries * unit_queries).sum(1, keepdim=True))
        grad_queries = grad_queries.view(J, k, T, rank, B) / query_norm if functional else \
            grad_queries.view(J, k, T, rank, B)
        Q = J * rank * k
        if functional:
            pieces = [grad_queries.permute(4, 2, 0, 3, 1).reshape(B, T, Q)]
            if C > Q + (P if packed else 0):
                pieces.append(grad_queries.new_zeros(B, T, C - Q - (P if packed else 0)))
            if packed:
                pieces.append(grad_through_memory.unsqueeze(1))
            grad_head_out = torch.cat(pieces, dim=-1)
        else:
            filled = Q + (P if packed else 0) == C
            grad_head_out = (torch.empty if filled else torch.zeros)((B, T, C), device=grad_queries.device,
                                                                     dtype=grad_queries.dtype)
            torch.div(grad_queries, query_norm,
                      out=grad_head_out[..., :Q].unflatten(-1, (J, rank, k)).permute(2, 4, 1, 3, 0))
            if packed:
                grad_head_out[:, 0, C - P:] = grad_through_memory
        return (grad_head_out, None if packed else grad_through_memory, None, None, grad_keys, grad_sharpness,
                grad_slot_bias, grad_s_values, grad_v_values, None)


_REVERSE_CUMSUMS: dict = {}


def _bmm_long_inner(a: torch.Tensor, b: torch.Tensor, chunk: int = 4096, always_split: bool = False) -> torch.Tensor:
    """``torch.bmm(a, b)`` for (J, P, N) @ (J, N, k) with a long inner N (R x batch) and a tiny output.

    cuBLAS runs such a product with a few small tiles, each walking all of N (measured on an H200 at
    batch 16,384: 5.2 ms, three quarters of the layer's training step). Cut N into chunks, multiply
    them as one batch and sum the partial products (a split-K by hand). CPU BLAS handles the plain
    product well, so the CPU keeps it. ``always_split`` is for tests.
    """
    J, P, N = a.shape
    if not (always_split or a.is_cuda) or N < 2 * chunk:
        return torch.bmm(a, b)
    pieces = N // chunk
    head = pieces * chunk
    a_chunks = a[:, :, :head].reshape(J, P, pieces, chunk).transpose(1, 2)     # (J, S, P, chunk)
    b_chunks = b[:, :head].reshape(J, pieces, chunk, b.shape[2])              # (J, S, chunk, k)
    out = torch.matmul(a_chunks, b_chunks).sum(1)                             # (J, P, k)
    if head < N:
        out = out + torch.bmm(a[:, :, head:], b[:, head:])
    return out


def _reverse_cumsum(R: int, like: torch.Tensor) -> torch.Tensor:
    """(R, R) upper-triangular ones: ``M @ a`` sums each entry of ``a`` with those after it.
    Kept per (R, device, dtype) and never written to; built afresh under torch.compile."""
    if torch.compiler.is_compiling():
        return torch.ones(R, R, device=like.device, dtype=like.dtype).triu()
    key = (R, like.device, like.dtype)
    matrix = _REVERSE_CUMSUMS.get(key)
    if matrix is None:
        matrix = _REVERSE_CUMSUMS[key] = torch.ones(R, R, device=like.device, dtype=like.dtype).triu()
    return matrix


def _scale(tensor: torch.Tensor, sharpness: torch.Tensor | float, J: int, N: int) -> torch.Tensor:
    """(J, k, N) times the sharpness: a float, or a (J, 1, R, B) tensor, one per query.
    Scaling the k-vector of a query costs k multiplies instead of P on its logits."""
    if isinstance(sharpness, torch.Tensor):
        return tensor * sharpness.reshape(J, 1, N)
    return tensor if sharpness == 1.0 else tensor * sharpness


def fused_read_apply(head_out: torch.Tensor, through_memory: torch.Tensor | None, rank: int, key_dim: int,
                     keys: torch.Tensor, sharpness: torch.Tensor | float, slot_bias: torch.Tensor | None,
                     s_values: torch.Tensor, v_values: torch.Tensor, want_usage: bool = True):
    """Read the memory by content attention and apply the composed low-rank weight.

    Args:
        head_out: (B, T, C) the composer head's raw output at each of T steps; its first
            J x rank x key_dim columns are the raw queries, laid out (J, rank, k) (normalised here).
        through_memory: (B, P) the input pushed through the U programs, ``x M_U^T``; or None when
            it is packed as the last P columns of ``head_out`` (T = 1: one GEMM made both).
        rank: r, components per step (R = T x r).
        key_dim: k.
        keys: (J, P, k) raw keys.
        sharpness: a float, or a (J, 1, R, B) tensor (component-major).
        slot_bias: optional (J, P) logit offsets.
        s_values: (P,) singular-value programs.
        v_values: (P, d_out) V programs.
        want_usage: compute the usage (else zeros): it costs a reduction over every read weight.

    Returns:
        y: (B, d_out) ``sum_n sigma_n (u_n . x) v_n``;
        sigma: (B, R) singular values, descending;
        usage: (J, P) each slot's largest weight per composition, averaged over the batch (no grad).
    """
    return _FusedReadApply.apply(head_out, through_memory, rank, key_dim, keys, sharpness, slot_bias, s_values,
                                 v_values, want_usage)
