"""A fused read-and-apply for NeurocoderLinear: content attention, singular values and the
low-rank apply in one autograd Function with a hand-written backward.

Why: at the released shape the arithmetic of a Neurocoder layer is about half a dense layer's,
but the eager autograd version spends most of its time in ~60 small operations and their
bookkeeping. This Function runs the same maths in about 15 forward and 25 backward operations,
on a slot-first, component-major layout ``(bank, slot, component x batch)`` so that the
softmax and every reduction run over contiguous rows of the batch instead of short rows of P
or R.

It covers the common case: no trace requested, outside torch.func transforms and autocast, and
least-used reading only through the C++ kernels (CPU; its sequential mixing runs between their
attention and compose loops; elsewhere it stays in :mod:`neurocoder.reading`).
:class:`~neurocoder.layers.NeurocoderLinear` falls back to the composable path otherwise, and
tests check both paths agree in value and gradient.

Shapes:
    J  banks (3: U, V, S)   P  slots   k  key size   B  batch   R  components   N = B x R
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import native as _native

__all__ = ["fused_read_apply", "fused_layer_apply", "conv_read_mixing", "conv_layer_read_mixing",
           "functions_behind"]

_EPS = 1e-8
# Largest fixed sharpness whose logits (bounded by it) take the max-free softmax: exp(30) x P
# stays far inside float32, and exp(-30) far above its smallest normal number.
_BOUNDED_LOGITS = 30.0


def _read_forward(ctx, head_out, through_memory, rank, key_dim, keys, sharpness, slot_bias, s_values, v_values,
                  want_usage):
    """The read's forward (see :func:`fused_read_apply`). Sets the layout on ``ctx`` and returns
    ``(y, sigma, usage)`` and the tensors its backward needs (for ``ctx.save_for_backward``)."""
    B, T, C = head_out.shape
    J, P, k = keys.shape
    R, N, Q = T * rank, T * rank * B, J * rank * key_dim
    queries = head_out[..., :Q].unflatten(-1, (J, rank, k)).permute(2, 4, 1, 3, 0)    # (J, k, T, r, B)
    packed = through_memory is None
    if packed:
        through_memory = head_out[:, 0, C - P:]                          # (B, P)
    # Not linalg.vector_norm: over this strided middle axis it ran ~15x slower than square-sum-sqrt
    # when the queries come transposed (_FusedLayer's layout): 0.9 ms against 0.03 ms.
    query_norm = queries.square().sum(1, keepdim=True).sqrt_().clamp_min_(_EPS)
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
    if not learned_sharpness and slot_bias is None and abs(sharpness) <= _BOUNDED_LOGITS and \
            not torch.compiler.is_compiling():
        # Cosines times a fixed sharpness: |logit| <= sharpness, so exp cannot overflow and the
        # softmax needs no max subtracted; in place, exp / sum is 4-8% of the training step
        # cheaper than torch.softmax at the released shape (session 24, paired rounds).
        weights = logits.exp_()
        weights.div_(weights.sum(1, keepdim=True))
    else:
        weights = torch.softmax(logits, dim=1)                               # (J, P, N)
    read_u, read_v, read_s = weights.view(J, P, R, B).unbind(0)          # (P, R, B) each

    raw_sigma = (s_values @ read_s.reshape(P, N)).view(R, B)
    reverse_cumsum = _reverse_cumsum(R, keys)
    sigma = torch.mm(reverse_cumsum, F.softplus(raw_sigma))                  # (R, B), descending in R
    memory_by_slot = through_memory.T.contiguous()                      # (P, B)
    projected = (read_u * memory_by_slot.unsqueeze(1)).sum(0)             # (R, B): u_n . x
    per_component = projected * sigma
    mixed = (read_v * per_component).sum(1)                               # (P, B)
    y = torch.mm(mixed.T, v_values)                                          # (B, d_out)

    saved = (unit_queries, query_norm, unit_keys, key_norm, weights, memory_by_slot,
             s_values, v_values, raw_sigma, sigma, projected, per_component, mixed,
             reverse_cumsum, sharpness if learned_sharpness else None)
    ctx.fixed_sharpness = None if learned_sharpness else float(sharpness)
    ctx.has_slot_bias = slot_bias is not None
    ctx.layout = (B, T, C, rank, packed)
    # _FusedLayer hands the head's output transposed ((C, B) storage); its gradient is made alike.
    ctx.head_columns_first = T == 1 and head_out.stride(-1) != 1
    ctx.set_materialize_grads(False)
    if want_usage:
        # Each slot's largest weight in a composition, batch-averaged: the usage signal.
        usage = weights.view(J, P, R, B).amax(dim=2).mean(dim=2)         # (J, P)
    else:
        usage = weights.new_zeros(J, P)
    return (y, sigma.T, usage), saved


def _read_backward(ctx, saved, grad_y, grad_sigma):
    """The read's backward: gradients of (head_out, through_memory, keys, sharpness, slot_bias,
    s_values, v_values), None where there is none."""
    (unit_queries, query_norm, unit_keys, key_norm, weights, memory_by_slot, s_values, v_values,
     raw_sigma, sigma, projected, per_component, mixed, reverse_cumsum, sharpness) = saved
    B, T, C, rank, packed = ctx.layout
    J, k, N = unit_queries.shape
    P = unit_keys.shape[1]
    R = T * rank
    read_u, read_v, read_s = weights.reshape(J, P, R, B).unbind(0)
    if grad_y is None:
        grad_y = mixed.new_zeros(B, v_values.shape[1])

    grad_v_values = torch.mm(mixed, grad_y)                                  # (P, d_out)
    grad_mixed = torch.mm(v_values, grad_y.T)                                # (P, B)
    grad_per_component = (read_v * grad_mixed.unsqueeze(1)).sum(0)        # (R, B)
    grad_projected = grad_per_component * sigma
    grad_sigma_total = grad_per_component * projected
    if grad_sigma is not None:
        grad_sigma_total = grad_sigma_total + grad_sigma.T
    grad_through_memory = (read_u * grad_projected).sum(1).T              # (B, P)
    grad_raw_sigma = torch.mm(reverse_cumsum.T, grad_sigma_total) * torch.sigmoid(raw_sigma)
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
        make = torch.empty if filled else torch.zeros
        if ctx.head_columns_first:
            grad_head_out = make((C, B), device=grad_queries.device, dtype=grad_queries.dtype).T.unsqueeze(1)
        else:
            grad_head_out = make((B, T, C), device=grad_queries.device, dtype=grad_queries.dtype)
        torch.div(grad_queries, query_norm,
                  out=grad_head_out[..., :Q].unflatten(-1, (J, rank, k)).permute(2, 4, 1, 3, 0))
        if packed:
            grad_head_out[:, 0, C - P:] = grad_through_memory
    return (grad_head_out, None if packed else grad_through_memory, grad_keys, grad_sharpness,
            grad_slot_bias, grad_s_values, grad_v_values)


class _FusedReadApply(torch.autograd.Function):
    @staticmethod
    def forward(ctx, head_out, through_memory, rank, key_dim, keys, sharpness, slot_bias, s_values, v_values,
                want_usage):
        """See :func:`fused_read_apply`."""
        outputs, saved = _read_forward(ctx, head_out, through_memory, rank, key_dim, keys, sharpness, slot_bias,
                                       s_values, v_values, want_usage)
        ctx.save_for_backward(*saved)
        ctx.mark_non_differentiable(outputs[2])
        return outputs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_sigma, _grad_usage):
        # once_differentiable: the tensors saved in the forward were computed without a graph, so
        # a second differentiation through this backward would silently miss their dependence on
        # the inputs. Higher-order gradients need the composable path (fused=False); autograd then
        # says so instead of returning wrong numbers.
        (grad_head_out, grad_through_memory, grad_keys, grad_sharpness, grad_slot_bias, grad_s_values,
         grad_v_values) = _read_backward(ctx, ctx.saved_tensors, grad_y, grad_sigma)
        return (grad_head_out, grad_through_memory, None, None, grad_keys, grad_sharpness, grad_slot_bias,
                grad_s_values, grad_v_values, None)



class _NativeFusedReadApply(torch.autograd.Function):
    """:class:`_FusedReadApply`'s maths through the C++ kernels of :mod:`neurocoder.native` (CPU):
    the read of every composer that is not the layer's own feed-forward map of its input (the
    recurrent composer's T steps, a separate context, frozen slots, a working program's gate).
    The queries are laid out for the kernels here, (J R k, B) with components n = t x rank + r;
    the kernels do the rest. Tests (tests/test_native.py) check it against :class:`_FusedReadApply`."""

    @staticmethod
    def forward(ctx, head_out, through_memory, rank, key_dim, keys, sharpness, slot_bias, s_values, v_values,
                want_usage, gates=None, least_used=0):
        B, T, C = head_out.shape
        J, P, k = keys.shape
        R, Q = T * rank, J * rank * key_dim
        queries = head_out[..., :Q].reshape(B, T, J, rank, k).permute(2, 1, 3, 4, 0).reshape(J * R * k, B)
        packed = through_memory is None
        memory_by_slot = (head_out[:, 0, C - P:] if packed else through_memory).T           # (P, B)
        learned = isinstance(sharpness, torch.Tensor)
        scale = sharpness.reshape(J * R, B) if learned else None
        fixed = None if learned else float(sharpness)
        y, sigma, usage, *saved = _native.ops().fused_read_forward(
            queries, scale, fixed, memory_by_slot, keys, slot_bias, s_values, v_values, R, want_usage, gates,
            least_used if gates is not None else 0)
        ctx.save_for_backward(*saved, scale, memory_by_slot, s_values, v_values)
        ctx.least_used = least_used if gates is not None else 0
        ctx.fixed, ctx.has_slot_bias, ctx.layout = fixed, slot_bias is not None, (B, T, C, rank, k, P, packed)
        ctx.sharpness_shape = sharpness.shape if learned else None
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(usage)
        return y, sigma, usage

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_sigma, _grad_usage):
        # once_differentiable: as _FusedReadApply's.
        *saved, scale, memory_by_slot, s_values, v_values = ctx.saved_tensors
        B, T, C, rank, k, P, packed = ctx.layout
        J, Q = 3, 3 * rank * k
        (grad_queries, grad_scale, grad_by_slot, grad_keys, grad_slot_bias, grad_s_values, grad_v_values,
         grad_gates) = _native.ops().fused_read_backward(grad_y, grad_sigma, saved, scale, ctx.fixed, memory_by_slot,
                                                         s_values, v_values, ctx.has_slot_bias, ctx.least_used)
        filled = Q + (P if packed else 0) == C
        grad_head_out = (torch.empty if filled else torch.zeros)((B, T, C), dtype=grad_queries.dtype,
                                                                 device=grad_queries.device)
        grad_head_out[..., :Q] = grad_queries.view(J, T, rank, k, B).permute(4, 1, 0, 2, 3).reshape(B, T, Q)
        if packed:
            grad_head_out[:, 0, C - P:] = grad_by_slot.T
        return (grad_head_out, None if packed else grad_by_slot.T, None, None, grad_keys,
                None if ctx.sharpness_shape is None else grad_scale.view(ctx.sharpness_shape),
                grad_slot_bias if ctx.has_slot_bias else None, grad_s_values, grad_v_values, None,
                grad_gates if ctx.least_used else None, None)


def _conv_read_forward(queries, keys, sharpness, slot_bias, s_values, v_values, want_usage, usage_weights, expand):
    """The C++ op ``conv_read_forward`` on :func:`conv_read_mixing`'s arguments: a learned
    sharpness tensor or a fixed float, and R = (J R k) / (J k) components."""
    learned = isinstance(sharpness, torch.Tensor)
    return _native.ops().conv_read_forward(
        queries, sharpness if learned else None, None if learned else float(sharpness), keys, slot_bias, s_values,
        v_values, queries.shape[0] // (keys.shape[0] * keys.shape[2]), want_usage, usage_weights, expand)


def _keep_for_conv_backward(ctx, tensors, fixed_sharpness, slot_bias, usage):
    """What a conv read Function's forward keeps for its backward: the tensors, the fixed
    sharpness (None when learned), whether there is a slot bias; no gradient materialised for an
    output that did not reach the loss, none for the usage."""
    ctx.save_for_backward(*tensors)
    ctx.fixed, ctx.has_slot_bias = fixed_sharpness, slot_bias is not None
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(usage)


def _mixing_gradient(grad_mixing, per_read, expand, v_values, s_values):
    """The conv reads' gradient as their backward ops take it: zeros (reads, C_out, P) where
    autograd gave None (the mixing did not reach the loss). per_read: a saved tensor with one row
    per read; with ``expand`` there is one per expanded sample instead."""
    if grad_mixing is not None:
        return grad_mixing
    reads = per_read.shape[0] if expand is None else expand.shape[0]
    return per_read.new_zeros(reads, v_values.shape[1], s_values.shape[0])


class _NativeConvRead(torch.autograd.Function):
    """:class:`~neurocoder.layers.NeurocoderConv2d`'s read through the C++ kernels of
    :mod:`neurocoder.native` (CPU): the fused read's attention and singular values, then each
    composition's (C_out, P) mixing matrix, in one Function with a hand-written backward. See
    :func:`conv_read_mixing`. Tests (tests/test_native.py) check the layer built on it against
    its composable path."""

    @staticmethod
    def forward(ctx, queries, keys, sharpness, slot_bias, s_values, v_values, want_usage, usage_weights, expand):
        mixing, _, usage, *saved = _conv_read_forward(queries, keys, sharpness, slot_bias, s_values, v_values,
                                                      want_usage, usage_weights, expand)
        learned = isinstance(sharpness, torch.Tensor)
        _keep_for_conv_backward(ctx, (*saved, sharpness if learned else None, s_values, v_values, expand),
                                None if learned else float(sharpness), slot_bias, usage)
        return mixing, usage

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_mixing, _grad_usage):
        # once_differentiable: as _FusedReadApply's.
        *saved, sharpness, s_values, v_values, expand = ctx.saved_tensors
        grad_mixing = _mixing_gradient(grad_mixing, saved[7], expand, v_values, s_values)
        grad_queries, grad_sharpness, grad_keys, grad_slot_bias, grad_s_values, grad_v_values = \
            _native.ops().conv_read_backward(grad_mixing, saved, sharpness, ctx.fixed, s_values, v_values,
                                             ctx.has_slot_bias, expand)
        return (grad_queries, grad_keys, grad_sharpness if sharpness is not None else None,
                grad_slot_bias if ctx.has_slot_bias else None, grad_s_values, grad_v_values, None, None, None)


class _NativeConvLayerRead(torch.autograd.Function):
    """:class:`~neurocoder.layers.NeurocoderConv2d`'s read with the feed-forward composer, from
    its parameters, in one Function (C++: ``conv_layer_read_forward`` / ``_backward``): the
    composer's rows, the keys and :class:`_NativeConvRead`'s read, with one hand-written backward
    instead of a dozen small autograd nodes. See :func:`conv_layer_read_mixing`."""

    @staticmethod
    def forward(ctx, context, head_weight, head_bias, u_values, v_values, s_values, s_keys, a, b, c, d, slot_bias,
                rank, sharpness, want_usage, usage_weights, expand):
        mixing, _, usage, *saved = _native.ops().conv_layer_read_forward(
            context, head_weight, head_bias, u_values, v_values, s_values, s_keys, a, b, c, d, slot_bias, rank,
            sharpness, want_usage, usage_weights, expand)
        _keep_for_conv_backward(ctx, (*saved, context, head_weight, u_values, v_values, s_values, a, c, expand),
                                sharpness, slot_bias, usage)
        return mixing, usage

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_mixing, _grad_usage):
        *saved, context, head_weight, u_values, v_values, s_values, a, c, expand = ctx.saved_tensors
        grad_mixing = _mixing_gradient(grad_mixing, context, expand, v_values, s_values)
        needs = sum(1 << i for i, need in enumerate(ctx.needs_input_grad[:12]) if need)
        grads = _native.ops().conv_layer_read_backward(grad_mixing, saved, context, head_weight, u_values, v_values,
                                                       s_values, a, c, ctx.has_slot_bias, ctx.fixed, expand, needs)
        return (*(g if need and g.numel() else None for g, need in zip(grads, ctx.needs_input_grad[:12])),
                None, None, None, None, None)


class _FusedLayer(torch.autograd.Function):
    """The whole feed-forward layer in one Function: the composer's linear map and ``x M_U^T``
    (two products into one buffer), the keys (content maps or learned), then the read.

    Why: the read alone left about a fifth of a training step at the released shape to what
    surrounds it: the joined weight's concatenation, the keys' maps and stack, and the autograd
    nodes and gradient copies of each (measured in session 24, scratch, by replacing them with leaves:
    1.43x nn.Linear against 1.83x). Here they are a few products on tensors this Function owns.
    """

    @staticmethod
    def forward(ctx, x, head_weight, head_bias, u_values, v_values, s_values, s_keys, key_a, key_b, key_c, key_d,
                slot_bias, rank, key_dim, sharpness, want_usage):
        """See :func:`fused_layer_apply`."""
        B = x.shape[0]
        C, P = head_weight.shape[0], u_values.shape[0]
        # Rows of the composer's output then x M_U^T, written transposed ((C + P, B): each product
        # fills contiguous rows); the read takes the (B, 1, C + P) view.
        head_t = x.new_empty(C + P, B)
        torch.addmm(head_bias.unsqueeze(1), head_weight, x.T, out=head_t[:C])
        torch.mm(u_values, x.T, out=head_t[C:])
        head_out = head_t.T.unsqueeze(1)
        content = key_c is not None
        keys = x.new_empty(3, P, key_dim)
        if content:
            torch.addmm(key_b, u_values, key_a.T, out=keys[0])
            torch.addmm(key_d, v_values, key_c.T, out=keys[1])
        else:
            keys[0].copy_(key_a)
            keys[1].copy_(key_b)
        keys[2].copy_(s_keys)
        learned = sharpness is None
        if learned:
            # The head's rows after the queries, (3 x rank, B), bank-major: softplus gives the
            # (3, 1, R, B) layout the read takes, as the composer's component_major_sharpness does.
            queries_end = 3 * rank * key_dim
            sharpness = F.softplus(head_t[queries_end:queries_end + 3 * rank]).view(3, 1, rank, B)
        outputs, saved = _read_forward(ctx, head_out, None, rank, key_dim, keys, sharpness, slot_bias, s_values,
                                       v_values, want_usage)
        ctx.save_for_backward(x, head_weight, u_values, key_a, key_c, *saved)
        ctx.content, ctx.learned_sharpness = content, learned
        ctx.mark_non_differentiable(outputs[2])
        return outputs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_sigma, _grad_usage):
        # once_differentiable: as _FusedReadApply's.
        x, head_weight, u_values, key_a, key_c, *saved = ctx.saved_tensors
        v_values = saved[7]
        (grad_head_out, _, grad_keys, grad_sharpness, grad_slot_bias, grad_s_values,
         grad_v_values) = _read_backward(ctx, saved, grad_y, grad_sigma)
        need = ctx.needs_input_grad
        C = head_weight.shape[0]
        grad_head = grad_head_out.squeeze(1)                                  # (B, C + P)
        if ctx.learned_sharpness:
            # d softplus(a) / da = sigmoid(a) = 1 - exp(-softplus(a)): from the saved sharpness.
            sharpness = saved[-1]                                             # (3, 1, R, B)
            rows = sharpness.shape[0] * sharpness.shape[2]
            queries_end = C - rows
            torch.mul(grad_sharpness, torch.expm1(-sharpness).neg_(),
                      out=grad_head.T[queries_end:C].view(sharpness.shape))
        grad_x = grad_head_weight = grad_head_bias = grad_u = None
        if need[0]:
            grad_x = torch.mm(grad_head[:, :C], head_weight).addmm_(grad_head[:, C:], u_values)
        if need[1] or need[3]:
            # One product gives both weights' gradients; each takes its rows (no copy).
            grad_joined = torch.mm(grad_head.T, x)                           # (C + P, d_in)
            grad_head_weight, grad_u = grad_joined[:C], grad_joined[C:]
        if need[2]:
            grad_head_bias = grad_head[:, :C].sum(0)
        grad_a = grad_b = grad_c = grad_d = None
        if ctx.content:
            grad_u_keys, grad_v_keys = grad_keys[0], grad_keys[1]             # (P, k) each
            if need[3]:
                grad_u.addmm_(grad_u_keys, key_a)
            if need[4]:
                grad_v_values.addmm_(grad_v_keys, key_c)
            if need[7]:
                grad_a = torch.mm(grad_u_keys.T, u_values)
            if need[8]:
                grad_b = grad_u_keys.sum(0)
            if need[9]:
                grad_c = torch.mm(grad_v_keys.T, v_values)
            if need[10]:
                grad_d = grad_v_keys.sum(0)
        else:
            grad_a, grad_b = grad_keys[0], grad_keys[1]
        return (grad_x, grad_head_weight if need[1] else None, grad_head_bias, grad_u if need[3] else None,
                grad_v_values if need[4] else None, grad_s_values if need[5] else None,
                grad_keys[2] if need[6] else None, grad_a if need[7] else None, grad_b if need[8] else None,
                grad_c, grad_d, grad_slot_bias, None, None, None, None)


class _NativeFusedLayer(torch.autograd.Function):
    """:class:`_FusedLayer`'s maths through the C++ kernels of :mod:`neurocoder.native` (CPU).

    Same inputs and outputs; the forward and backward each run as one C++ call (a few loops and
    the GEMMs) instead of ~70 Python-issued operations. Tests (tests/test_native.py) check both
    Functions agree in value and gradient.
    """

    @staticmethod
    def forward(ctx, x, head_weight, head_bias, u_values, v_values, s_values, s_keys, key_a, key_b, key_c, key_d,
                slot_bias, rank, key_dim, sharpness, want_usage):
        y, sigma, usage, *saved = _native.ops().fused_layer_forward(
            x, head_weight, head_bias, u_values, v_values, s_values, s_keys, key_a, key_b, key_c, key_d, slot_bias,
            rank, key_dim, sharpness, want_usage)
        ctx.save_for_backward(x, head_weight, u_values, v_values, s_values, key_a, key_c, *saved)
        ctx.rank, ctx.sharpness, ctx.has_slot_bias = rank, sharpness, slot_bias is not None
        ctx.content = key_c is not None
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(usage)
        return y, sigma, usage

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_sigma, _grad_usage):
        # once_differentiable: as _FusedReadApply's.
        x, head_weight, u_values, v_values, s_values, key_a, key_c, *saved = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = sum(1 << i for i in range(12) if need[i])
        grads = _native.ops().fused_layer_backward(
            grad_y, grad_sigma, x, head_weight, u_values, v_values, s_values, key_a, key_c, saved, ctx.rank,
            ctx.sharpness, ctx.has_slot_bias, mask)
        exists = (True,) * 9 + (ctx.content, ctx.content, ctx.has_slot_bias)
        return (*(g if need[i] and exists[i] else None for i, g in enumerate(grads)), None, None, None, None)


def functions_behind(tensor: torch.Tensor) -> set[str]:
    """Names of every autograd node behind ``tensor``: which path a layer took, for tests and
    benchmarks (e.g. ``"_NativeFusedLayerBackward" in functions_behind(layer(x))``). The layers'
    Functions sit below a reshape or a bias add, so the whole graph is walked."""
    seen, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack += [parent for parent, _ in node.next_functions]
    return {type(node).__name__ for node in seen}


def _native_applies(x: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether this call can take the C++ kernels: CPU tensors of one dtype, float32 or float64,
    outside torch.compile, kernels built. (Anything else takes the Python Function, which also
    reports mismatched inputs in its own words.)"""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and all(t is None or (t.dtype == x.dtype and t.device.type == "cpu") for t in others)
            and not torch.compiler.is_compiling() and _native.ops() is not None)


def fused_layer_apply(x: torch.Tensor, head_weight: torch.Tensor, head_bias: torch.Tensor, u_values: torch.Tensor,
                      v_values: torch.Tensor, s_values: torch.Tensor, s_keys: torch.Tensor,
                      key_tensors: tuple, slot_bias: torch.Tensor | None, rank: int, key_dim: int,
                      sharpness: float | None, want_usage: bool = True):
    """A feed-forward Neurocoder layer whose composer reads its input, from its parameters.

    The maths of ``fused_read_apply(addmm(bias, x, cat([W, M_U]).T), None, ..., keys, ...)`` with
    the keys made here, in one autograd Function (:class:`_FusedLayer`). For a composer that
    makes queries and, when it is learned, the sharpness (no least-used gates, no residual gate).

    Args:
        x: (B, d_in).
        head_weight, head_bias: (C, d_in), (C,) the composer's linear map: C = 3 x rank x key_dim
            query rows, then (learned sharpness) 3 x rank sharpness rows, bank-major.
        u_values, v_values, s_values: (P, d_in), (P, d_out), (P,) the programs.
        s_keys: (P, k) the S bank's keys.
        key_tensors: content keys: (W_u, b_u, W_v, b_v), the maps (k, d_in), (k,), (k, d_out),
            (k,) from each U and V program to its key; learned keys: (keys_u, keys_v), (P, k) each.
        slot_bias: optional (3, P) logit offsets.
        sharpness: the fixed sharpness, or None: learned, softplus of the head's sharpness rows.
        want_usage: as :func:`fused_read_apply`.

    Returns:
        As :func:`fused_read_apply`: y (B, d_out), sigma (B, R), usage (3, P).
    """
    a, b, c, d = (tuple(key_tensors) + (None, None))[:4]
    native = _native_applies(x, head_weight, head_bias, u_values, v_values, s_values, s_keys, a, b, c, d, slot_bias)
    function = _NativeFusedLayer if native else _FusedLayer
    if x.is_cuda:
        # Imported here: Triton (optional) loads only for CUDA tensors.
        from . import triton_layer
        if triton_layer.applies(x, slot_bias, head_weight, head_bias, u_values, v_values, s_values, s_keys, a, b, c,
                                d):
            function = triton_layer.TritonFusedLayer
    return function.apply(x, head_weight, head_bias, u_values, v_values, s_values, s_keys, a, b, c, d, slot_bias,
                          rank, key_dim, None if sharpness is None else float(sharpness), want_usage)


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
                     s_values: torch.Tensor, v_values: torch.Tensor, want_usage: bool = True,
                     gates: torch.Tensor | None = None, least_used: int = 0):
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
        gates, least_used: least-used reading (:func:`neurocoder.reading.read_with_least_used`):
            the interpolating gates laid out (J x R, B), component-major, and m. Only on the C++
            kernels (CPU, float32 / float64): elsewhere a ValueError (the layer then takes its
            composable path).

    Returns:
        y: (B, d_out) ``sum_n sigma_n (u_n . x) v_n``;
        sigma: (B, R) singular values, descending;
        usage: (J, P) each slot's largest weight per composition, averaged over the batch (no grad).
    """
    tensors = (keys, slot_bias, s_values, v_values, through_memory, gates) + \
        ((sharpness,) if isinstance(sharpness, torch.Tensor) else ())
    native = _native_applies(head_out, *tensors)
    if gates is not None:
        if not native:
            raise ValueError("fused_read_apply: least-used reading (gates) runs on the C++ kernels only: CPU tensors "
                             "of one dtype, float32 or float64, outside torch.compile, kernels built; use the "
                             "layer's composable path (neurocoder.reading.read_with_least_used) otherwise")
        return _NativeFusedReadApply.apply(head_out, through_memory, rank, key_dim, keys, sharpness, slot_bias,
                                           s_values, v_values, want_usage, gates, least_used)
    function = _NativeFusedReadApply if native else _FusedReadApply
    return function.apply(head_out, through_memory, rank, key_dim, keys, sharpness, slot_bias, s_values, v_values,
                          want_usage)


def conv_layer_read_mixing(context: torch.Tensor, head_weight: torch.Tensor, head_bias: torch.Tensor,
                           u_values: torch.Tensor, v_values: torch.Tensor, s_values: torch.Tensor,
                           s_keys: torch.Tensor, key_tensors: tuple, slot_bias: torch.Tensor | None, rank: int,
                           sharpness: float | None, want_usage: bool = True,
                           usage_weights: torch.Tensor | None = None, expand: torch.Tensor | None = None):
    """:func:`conv_read_mixing` with the feed-forward composer's rows and the keys made from the
    parameters, in one autograd Function (C++, CPU): the maths of
    ``conv_read_mixing(addmm(head_bias, context, head_weight.T).T[:Q], keys, softplus(...), ...)``.

    Args:
        context: (B, context_features) what the composer reads.
        head_weight, head_bias: (C, context_features), (C,) the composer's rows: 3 x rank x
            key_dim query rows, then (learned sharpness) 3 x rank sharpness rows, bank-major.
        u_values, v_values, s_values, s_keys, key_tensors, slot_bias: as
            :func:`fused_layer_apply`.
        rank: components per composition; sharpness: the fixed sharpness, or None (learned).
        want_usage, usage_weights, expand: as :func:`conv_read_mixing`.

    Returns:
        As :func:`conv_read_mixing`: mixing (B, C_out, P) and usage (3, P).
    """
    a, b, c, d = (tuple(key_tensors) + (None, None))[:4]
    if not _native_applies(context, head_weight, head_bias, u_values, v_values, s_values, s_keys, a, b, c, d,
                           slot_bias):
        raise ValueError("conv_layer_read_mixing runs on the C++ kernels only: CPU tensors of one dtype, float32 or "
                         f"float64 (got {context.dtype} on {context.device}), outside torch.compile, kernels built "
                         f"(neurocoder.native: {_native.describe()})")
    return _NativeConvLayerRead.apply(context, head_weight, head_bias, u_values, v_values, s_values, s_keys, a, b, c,
                                      d, slot_bias, rank, None if sharpness is None else float(sharpness), want_usage,
                                      usage_weights, expand)


def conv_read_mixing(queries: torch.Tensor, keys: torch.Tensor, sharpness: torch.Tensor | float,
                     slot_bias: torch.Tensor | None, s_values: torch.Tensor, v_values: torch.Tensor,
                     want_usage: bool = True, usage_weights: torch.Tensor | None = None,
                     expand: torch.Tensor | None = None):
    """Read the memory by content attention and compose each read's mixing matrix, in C++.

    :class:`~neurocoder.layers.NeurocoderConv2d` convolves its input with the P program filters
    (responses (B, P, N)) and mixes them per sample: ``y[b] = mixing[b] @ responses[b]``, with
    ``mixing[b] = sum_n sigma_n (read_v_n M_V)^T (read_u_n)`` (C_out, P). For CPU tensors of one
    dtype, float32 or float64, with the kernels built (:func:`_native_applies`); the layer takes
    its composable path otherwise.

    Args:
        queries: (J R k, B) raw queries, rows (bank, component, key entry); R = T x rank
            components, n = t x rank + r (normalised here).
        keys: (J, P, k) raw keys.
        sharpness: a float, or a (J R, B) positive tensor, rows (bank, component).
        slot_bias: optional (J, P) logit offsets.
        s_values, v_values: (P,) and (P, C_out) programs.
        want_usage: as :func:`fused_read_apply`.
        usage_weights: optional (B,): each read's weight in the usage average (the number of
            samples that share it, when identical contexts were read once).
        expand: optional (B',) int64 indices into the B reads: the mixing returned is then
            ``mixing[expand]`` (B', C_out, P), copied in C++ and its gradient summed back there
            (the samples of a batch that share contexts, each read once).

    Returns:
        mixing: (B, C_out, P) (or (B', C_out, P) with ``expand``); usage: (J, P), as
        :func:`fused_read_apply`.
    """
    tensors = (queries, keys, sharpness, slot_bias, s_values, v_values)
    if not _native_applies(queries, *(t for t in tensors[1:] if isinstance(t, torch.Tensor))):
        raise ValueError("conv_read_mixing runs on the C++ kernels only: CPU tensors of one dtype, float32 or "
                         f"float64 (got {queries.dtype} on {queries.device}), outside torch.compile, kernels built "
                         f"(neurocoder.native: {_native.describe()}); NeurocoderConv2d takes its composable path "
                         "otherwise")
    if not torch.is_grad_enabled() or not any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        # No graph to record (an agent's rollout): the op alone, without the Function's bookkeeping.
        mixing, _, usage, *_ = _conv_read_forward(queries, keys, sharpness, slot_bias, s_values, v_values,
                                                  want_usage, usage_weights, expand)
        return mixing, usage
    return _NativeConvRead.apply(*tensors, want_usage, usage_weights, expand)
