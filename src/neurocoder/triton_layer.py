"""Triton kernels for the fused feed-forward layer on a GPU: the read in two kernels, the keys in two.

Why: on a GPU at the released shape (batch 128, 1024 -> 400) every contender is bound by kernel
launches, not arithmetic. :class:`~neurocoder.fused._FusedLayer` issues ~77 kernels per training
step (session 27, H200: 4.74x nn.Linear); nn.Linear issues about six. Here the step is 9
(11 when the input needs its gradient): the forward is the composer's and the U programs' GEMMs,
one kernel for the keys, one for the read (attention, singular values, the input mixed for V and
its product with V) and the usage's sum; the backward is the V programs' gradient GEMM, one
read-backward kernel (which starts from grad_y V^T), the head's gradient GEMM (and the input's
two) and one kernel for the keys' gradients (which also adds up the per-block partial sums, so
nothing needs atomics and every result is deterministic). With the products with V as GEMMs
(:func:`set_fold_output_products`) it is 11 (13).

Status: **opt-in and not yet timed on a GPU.** The kernels are tested against the Python Function
in float64 with Triton's interpreter on the CPU (``TRITON_INTERPRET=1``, tests/test_triton.py);
a GPU run (``scripts/device_check.sh``) checks them on CUDA and times them. Until one has, the layer uses
them only when asked: ``NEUROCODER_TRITON=1`` or :func:`set_enabled`.

Covers what :func:`~neurocoder.fused.fused_layer_apply` covers (a feed-forward composer reading
the layer's input; content or learned keys; fixed or learned sharpness) except a grown memory's
slot offsets (``slot_bias``), for CUDA tensors in float32 or float64.

Layout, as the C++ kernels: the composer's output and ``x M_U^T`` transposed in one (C + P, B)
buffer, rows ``j r k + r k + c`` the queries of bank j, component r; rows ``Q + j r + r`` the learned
sharpness; rows ``C + p`` the input through program p. Each program instance takes a block of
BLOCK_B samples and holds the P slots of one (bank, component) in registers.
"""

from __future__ import annotations

import os

import torch

try:                                     # optional: `pip install neurocoder[gpu]`
    import triton
    import triton.language as tl
except ImportError:                      # pragma: no cover - depends on the environment
    triton = None

__all__ = ["available", "enabled", "set_enabled", "set_fold_output_products", "applies", "TritonFusedLayer"]

# fold_output_products: the products with V (y = mixed V forward, grad_y V^T backward) inside the
# read kernels (tl.dot) rather than as two GEMM launches; a switch so that a GPU run can time both.
_state = {"enabled": os.environ.get("NEUROCODER_TRITON", "0") == "1", "fold_output_products": True}
# Samples per program instance. Small: at batch 128 the grid is 8-16 instances either way, and
# each instance holds a (BLOCK_B, P, k) product in registers.
_BLOCK_B = 16
# Warps per instance of the read kernels: at 4 the backward's (BLOCK_B, P, k) products spill
# registers when compiled for sm_90 (255 registers and 112 bytes of stack), at 8 it takes 207 and
# none (scripts/compile_triton_kernels.py prints these).
_READ_WARPS = 8
# Output columns per tl.dot in the folded V products.
_BLOCK_O = 64
# Above this many sample blocks, their partial sums are added by one torch.sum before the keys'
# backward kernel (which otherwise re-reads them in every program instance).
_MAX_UNREDUCED_BLOCKS = 32


def available() -> bool:
    """Whether Triton is installed."""
    return triton is not None


def enabled() -> bool:
    return _state["enabled"]


def set_enabled(value: bool) -> None:
    """Use the Triton kernels for CUDA tensors where they apply (True) or never (False, the default
    until a GPU run has timed them; ``NEUROCODER_TRITON=1`` sets True at import)."""
    if not isinstance(value, bool):
        raise TypeError(f"neurocoder.triton_layer.set_enabled: expected True or False, got {value!r}")
    _state["enabled"] = value


def set_fold_output_products(value: bool) -> None:
    """Compute the products with V (``y = mixed V`` forward, ``grad_y V^T`` backward) inside the read
    kernels (True, the default: two launches fewer) or as two GEMMs (False), for timing both."""
    if not isinstance(value, bool):
        raise TypeError(f"neurocoder.triton_layer.set_fold_output_products: expected True or False, got {value!r}")
    _state["fold_output_products"] = value


def applies(x: torch.Tensor, slot_bias, *others) -> bool:
    """Whether a call of the fused layer can take these kernels: switched on, Triton installed,
    CUDA tensors of one dtype (float32 or float64), no slot offsets, a non-empty batch, outside
    torch.compile."""
    return (_state["enabled"] and triton is not None and x.is_cuda and slot_bias is None
            and x.dtype in (torch.float32, torch.float64) and x.shape[0] > 0
            and all(t is None or (t.is_cuda and t.dtype == x.dtype) for t in others)
            and not torch.compiler.is_compiling())


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


if triton is not None:

    @triton.jit
    def _softplus(x):
        # As F.softplus (threshold 20).
        return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))

    @triton.jit
    def _attend(head_ptr, B, offs_b, mask_b, keys_ptr, key_base, offs_p, mask_p, offs_k, mask_k, K,
                query_row, sharpness_row, fixed_sharpness, LEARNED: tl.constexpr):
        """One (bank, component)'s read weights for a block of samples.
        Returns w (BB, BP), the unit queries (BB, BK), their norms (BB), the sharpness (BB), its
        raw row (BB; zeros when fixed) and the unit keys (BP, BK)."""
        q = tl.load(head_ptr + (query_row + offs_k)[None, :] * B + offs_b[:, None],
                    mask=mask_b[:, None] & mask_k[None, :], other=0.0)
        norm = tl.maximum(tl.sqrt(tl.sum(q * q, axis=1)), 1e-8)
        unit_q = q / norm[:, None]
        if LEARNED:
            raw = tl.load(head_ptr + sharpness_row * B + offs_b, mask=mask_b, other=0.0)
            scale = _softplus(raw)
        else:
            raw = norm * 0.0
            scale = raw + fixed_sharpness
        unit_keys = tl.load(keys_ptr + key_base + offs_p[:, None] * K + offs_k[None, :],
                            mask=mask_p[:, None] & mask_k[None, :], other=0.0)
        scaled = unit_q * scale[:, None]
        logits = tl.sum(scaled[:, None, :] * unit_keys[None, :, :], axis=2)            # (BB, BP)
        logits = tl.where(mask_p[None, :], logits, float("-inf"))
        top = tl.max(logits, axis=1)
        e = tl.exp(logits - top[:, None])
        w = e / tl.sum(e, axis=1)[:, None]
        return w, unit_q, norm, scale, raw, unit_keys

    @triton.jit
    def _block_offsets(pid, B, P, K, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_R: tl.constexpr):
        """The read kernels' indices for sample block ``pid``: samples, slots, key entries (each
        with its mask) and components."""
        offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
        offs_p = tl.arange(0, BLOCK_P)
        offs_k = tl.arange(0, BLOCK_K)
        return offs_b, offs_b < B, offs_p, offs_p < P, offs_k, offs_k < K, tl.arange(0, BLOCK_R)

    @triton.jit
    def _column(tile, offs_r, r):
        """Column r of a (BB, BR) tile."""
        return tl.sum(tl.where(offs_r[None, :] == r, tile, 0.0), axis=1)

    @triton.jit
    def _raw_sigma_and_projected(head_ptr, keys_ptr, s_values, memory, B, P, K, offs_b, mask_b, offs_p, mask_p,
                                 offs_k, mask_k, offs_r, fixed_sharpness, RANK: tl.constexpr, LEARNED: tl.constexpr,
                                 BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr):
        """Pass 1 over the components: s . read_s (raw sigma) and x M_U^T . read_u (projected),
        (BB, BR) each; also the largest U and S weight each slot received, (BB, BP) each."""
        Q = 3 * RANK * K
        raw_sigma = tl.zeros((BLOCK_B, BLOCK_R), dtype=memory.dtype)
        projected = tl.zeros((BLOCK_B, BLOCK_R), dtype=memory.dtype)
        top_u = memory * 0.0
        top_s = memory * 0.0
        for r in range(RANK):
            w_s, _q, _n, _s, _raw, _k = _attend(head_ptr, B, offs_b, mask_b, keys_ptr, 2 * P * K, offs_p, mask_p,
                                                offs_k, mask_k, K, 2 * RANK * K + r * K, Q + 2 * RANK + r,
                                                fixed_sharpness, LEARNED)
            w_u, _q, _n, _s, _raw, _k = _attend(head_ptr, B, offs_b, mask_b, keys_ptr, 0, offs_p, mask_p,
                                                offs_k, mask_k, K, r * K, Q + r, fixed_sharpness, LEARNED)
            chosen = offs_r[None, :] == r
            raw_sigma = tl.where(chosen, tl.sum(w_s * s_values[None, :], axis=1)[:, None], raw_sigma)
            projected = tl.where(chosen, tl.sum(w_u * memory, axis=1)[:, None], projected)
            top_u = tl.maximum(top_u, w_u)
            top_s = tl.maximum(top_s, w_s)
        return raw_sigma, projected, top_u, top_s

    @triton.jit
    def _keys_kernel(u_ptr, a_ptr, b_ptr, v_ptr, c_ptr, d_ptr, s_keys_ptr, unit_keys_ptr, key_norm_ptr,
                     P, K, D_IN, D_OUT, CONTENT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_D: tl.constexpr):
        """Grid (3,): bank j's keys (content: its programs through the key map; learned: as given),
        written as unit keys (3, P, K) and norms (3, P)."""
        j = tl.program_id(0)
        offs_p = tl.arange(0, BLOCK_P)
        offs_k = tl.arange(0, BLOCK_K)
        mask_pk = (offs_p[:, None] < P) & (offs_k[None, :] < K)
        pk = offs_p[:, None] * K + offs_k[None, :]
        if j == 2:
            keys = tl.load(s_keys_ptr + pk, mask=mask_pk, other=0.0)
        elif CONTENT:
            if j == 0:
                keys = _key_map(u_ptr, a_ptr, b_ptr, P, K, D_IN, offs_p, offs_k, BLOCK_P, BLOCK_K, BLOCK_D)
            else:
                keys = _key_map(v_ptr, c_ptr, d_ptr, P, K, D_OUT, offs_p, offs_k, BLOCK_P, BLOCK_K, BLOCK_D)
        else:
            if j == 0:
                keys = tl.load(a_ptr + pk, mask=mask_pk, other=0.0)
            else:
                keys = tl.load(b_ptr + pk, mask=mask_pk, other=0.0)
        norm = tl.maximum(tl.sqrt(tl.sum(keys * keys, axis=1)), 1e-8)
        tl.store(unit_keys_ptr + j * P * K + pk, keys / norm[:, None], mask=mask_pk)
        tl.store(key_norm_ptr + j * P + offs_p, norm, mask=offs_p < P)

    @triton.jit
    def _key_map(values_ptr, map_ptr, bias_ptr, P, K, D, offs_p, offs_k, BLOCK_P: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        """values (P, D) @ map (K, D)^T + bias (K,): (BP, BK)."""
        acc = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.load(bias_ptr).dtype)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            values = tl.load(values_ptr + offs_p[:, None] * D + offs_d[None, :],
                             mask=(offs_p[:, None] < P) & (offs_d[None, :] < D), other=0.0)
            key_map = tl.load(map_ptr + offs_k[:, None] * D + offs_d[None, :],
                              mask=(offs_k[:, None] < K) & (offs_d[None, :] < D), other=0.0)
            acc += tl.sum(values[:, None, :] * key_map[None, :, :], axis=2)
        bias = tl.load(bias_ptr + offs_k, mask=offs_k < K, other=0.0)
        return tl.where((offs_p[:, None] < P) & (offs_k[None, :] < K), acc + bias[None, :], 0.0)

    @triton.jit
    def _read_forward_kernel(head_ptr, keys_ptr, s_ptr, mixed_ptr, sigma_ptr, usage_ptr, v_ptr, y_ptr, B, P, K, C,
                             D_OUT, fixed_sharpness, RANK: tl.constexpr, LEARNED: tl.constexpr,
                             WANT_USAGE: tl.constexpr, WITH_OUTPUT: tl.constexpr, BLOCK_B: tl.constexpr,
                             BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                             BLOCK_O: tl.constexpr):
        """Grid (cdiv(B, BLOCK_B),). Writes mixed (B, P) = sum_n sigma_n (u_n . x) read_v[n], sigma
        (B, R) and, when asked, each block's usage (3, P): the largest weight a slot received in a
        composition, summed over the block's samples and divided by B."""
        pid = tl.program_id(0)
        offs_b, mask_b, offs_p, mask_p, offs_k, mask_k, offs_r = _block_offsets(pid, B, P, K, BLOCK_B, BLOCK_P,
                                                                                BLOCK_K, BLOCK_R)
        Q = 3 * RANK * K
        memory = tl.load(head_ptr + (C + offs_p)[None, :] * B + offs_b[:, None],
                         mask=mask_b[:, None] & mask_p[None, :], other=0.0)                 # (BB, BP)
        s_values = tl.load(s_ptr + offs_p, mask=mask_p, other=0.0)
        raw_sigma, projected, top_u, top_s = _raw_sigma_and_projected(
            head_ptr, keys_ptr, s_values, memory, B, P, K, offs_b, mask_b, offs_p, mask_p, offs_k, mask_k, offs_r,
            fixed_sharpness, RANK, LEARNED, BLOCK_B, BLOCK_R)
        # sigma_n = sum_{m >= n} softplus(raw_m): positive and descending.
        positive = tl.where(offs_r[None, :] < RANK, _softplus(raw_sigma), 0.0)
        upper = (offs_r[:, None] <= offs_r[None, :]).to(positive.dtype)                     # [n <= m]
        sigma = tl.sum(positive[:, None, :] * upper[None, :, :], axis=2)                    # (BB, BR)
        per_component = projected * sigma
        mixed = memory * 0.0
        top_v = memory * 0.0
        for r in range(RANK):
            w_v, _q, _n, _s, _raw, _k = _attend(head_ptr, B, offs_b, mask_b, keys_ptr, P * K, offs_p, mask_p,
                                                offs_k, mask_k, K, RANK * K + r * K, Q + RANK + r,
                                                fixed_sharpness, LEARNED)
            mixed += w_v * _column(per_component, offs_r, r)[:, None]
            top_v = tl.maximum(top_v, w_v)
        mask_bp = mask_b[:, None] & mask_p[None, :]
        tl.store(mixed_ptr + offs_b[:, None] * P + offs_p[None, :], mixed, mask=mask_bp)
        if WITH_OUTPUT:
            # y = mixed V here, block by block of outputs: one GEMM launch fewer.
            mixed_in = tl.where(mask_bp, mixed, 0.0)
            for o0 in range(0, D_OUT, BLOCK_O):
                offs_o = o0 + tl.arange(0, BLOCK_O)
                mask_o = offs_o < D_OUT
                v = tl.load(v_ptr + offs_p[:, None] * D_OUT + offs_o[None, :], mask=mask_p[:, None] & mask_o[None, :],
                            other=0.0)                                                  # (BP, BO)
                y = tl.dot(mixed_in, v, input_precision="ieee")
                tl.store(y_ptr + offs_b[:, None] * D_OUT + offs_o[None, :], y, mask=mask_b[:, None] & mask_o[None, :])
        tl.store(sigma_ptr + offs_b[:, None] * RANK + offs_r[None, :], sigma,
                 mask=mask_b[:, None] & (offs_r[None, :] < RANK))
        if WANT_USAGE:
            base = usage_ptr + pid * 3 * P + offs_p
            tl.store(base, tl.sum(tl.where(mask_bp, top_u, 0.0), axis=0) / B, mask=mask_p)
            tl.store(base + P, tl.sum(tl.where(mask_bp, top_v, 0.0), axis=0) / B, mask=mask_p)
            tl.store(base + 2 * P, tl.sum(tl.where(mask_bp, top_s, 0.0), axis=0) / B, mask=mask_p)

    @triton.jit
    def _read_backward_kernel(head_ptr, keys_ptr, s_ptr, grad_mixed_ptr, grad_sigma_ptr, grad_head_ptr, partial_ptr,
                              v_ptr, grad_y_ptr, B, P, K, C, D_OUT, fixed_sharpness, RANK: tl.constexpr,
                              LEARNED: tl.constexpr, HAS_GRAD_SIGMA: tl.constexpr, FROM_GRAD_Y: tl.constexpr,
                              BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
                              BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr):
        """Grid (cdiv(B, BLOCK_B),). From grad_mixed (B, P) = dL/dy V^T (and dL/dsigma (B, R)):
        writes every row of the head's gradient (C + P, B), and one row of partial sums per block:
        the unit keys' gradient (3, P, K), the S programs' (P) and the head bias's (C)."""
        pid = tl.program_id(0)
        offs_b, mask_b, offs_p, mask_p, offs_k, mask_k, offs_r = _block_offsets(pid, B, P, K, BLOCK_B, BLOCK_P,
                                                                                BLOCK_K, BLOCK_R)
        mask_bp = mask_b[:, None] & mask_p[None, :]
        Q = 3 * RANK * K
        row_length = 3 * P * K + P + C
        partial = partial_ptr + pid * row_length
        memory = tl.load(head_ptr + (C + offs_p)[None, :] * B + offs_b[:, None], mask=mask_bp, other=0.0)
        s_values = tl.load(s_ptr + offs_p, mask=mask_p, other=0.0)
        if FROM_GRAD_Y:
            # grad_mixed = grad_y V^T here, block by block of outputs: one GEMM launch fewer.
            grad_mixed = tl.zeros((BLOCK_B, BLOCK_P), dtype=s_values.dtype)
            for o0 in range(0, D_OUT, BLOCK_O):
                offs_o = o0 + tl.arange(0, BLOCK_O)
                mask_o = offs_o < D_OUT
                grad_y = tl.load(grad_y_ptr + offs_b[:, None] * D_OUT + offs_o[None, :],
                                 mask=mask_b[:, None] & mask_o[None, :], other=0.0)          # (BB, BO)
                v_t = tl.load(v_ptr + offs_p[None, :] * D_OUT + offs_o[:, None],
                              mask=mask_p[None, :] & mask_o[:, None], other=0.0)             # (BO, BP)
                grad_mixed += tl.dot(grad_y, v_t, input_precision="ieee")
        else:
            grad_mixed = tl.load(grad_mixed_ptr + offs_b[:, None] * P + offs_p[None, :], mask=mask_bp, other=0.0)
        raw_sigma, projected, _top_u, _top_s = _raw_sigma_and_projected(
            head_ptr, keys_ptr, s_values, memory, B, P, K, offs_b, mask_b, offs_p, mask_p, offs_k, mask_k, offs_r,
            fixed_sharpness, RANK, LEARNED, BLOCK_B, BLOCK_R)
        in_rank = offs_r[None, :] < RANK
        positive = tl.where(in_rank, _softplus(raw_sigma), 0.0)
        upper = (offs_r[:, None] <= offs_r[None, :]).to(positive.dtype)                     # [n <= m]
        sigma = tl.sum(positive[:, None, :] * upper[None, :, :], axis=2)
        # d loss / d per_component_n = read_v[n] . grad_mixed
        grad_per_component = raw_sigma * 0.0
        for r in range(RANK):
            w_v, _q, _n, _s, _raw, _k = _attend(head_ptr, B, offs_b, mask_b, keys_ptr, P * K, offs_p, mask_p,
                                                offs_k, mask_k, K, RANK * K + r * K, Q + RANK + r,
                                                fixed_sharpness, LEARNED)
            grad_per_component = tl.where(offs_r[None, :] == r, tl.sum(w_v * grad_mixed, axis=1)[:, None],
                                          grad_per_component)
        grad_projected = grad_per_component * sigma
        grad_sigma_total = grad_per_component * projected
        if HAS_GRAD_SIGMA:
            grad_sigma_total += tl.load(grad_sigma_ptr + offs_b[:, None] * RANK + offs_r[None, :],
                                        mask=mask_b[:, None] & in_rank, other=0.0)
        # The sum's transpose: d sigma_m / d softplus_n = [n <= m]; then softplus' = sigmoid.
        grad_raw_sigma = tl.sum(grad_sigma_total[:, None, :] * tl.trans(upper)[None, :, :], axis=2)
        grad_raw_sigma = tl.where(in_rank, grad_raw_sigma * tl.sigmoid(raw_sigma), 0.0)
        per_component = projected * sigma
        grad_memory = memory * 0.0
        grad_s_values = s_values * 0.0
        grad_keys_u = tl.zeros((BLOCK_P, BLOCK_K), dtype=memory.dtype)
        grad_keys_v = tl.zeros((BLOCK_P, BLOCK_K), dtype=memory.dtype)
        grad_keys_s = tl.zeros((BLOCK_P, BLOCK_K), dtype=memory.dtype)
        for r in range(RANK):
            grad_projected_r = _column(grad_projected, offs_r, r)
            per_component_r = _column(per_component, offs_r, r)
            grad_raw_sigma_r = _column(grad_raw_sigma, offs_r, r)
            for j in tl.static_range(3):
                query_row = j * RANK * K + r * K
                sharpness_row = Q + j * RANK + r
                w, unit_q, norm, scale, raw, unit_keys = _attend(
                    head_ptr, B, offs_b, mask_b, keys_ptr, j * P * K, offs_p, mask_p, offs_k, mask_k, K, query_row,
                    sharpness_row, fixed_sharpness, LEARNED)
                # d loss / d read weights of this bank
                if j == 0:
                    grad_w = memory * grad_projected_r[:, None]
                    grad_memory += w * grad_projected_r[:, None]
                elif j == 1:
                    grad_w = grad_mixed * per_component_r[:, None]
                else:
                    grad_w = s_values[None, :] * grad_raw_sigma_r[:, None]
                    grad_s_values += tl.sum(tl.where(mask_bp, w * grad_raw_sigma_r[:, None], 0.0), axis=0)
                grad_logits = w * (grad_w - tl.sum(w * grad_w, axis=1)[:, None])
                grad_logits = tl.where(mask_bp, grad_logits, 0.0)
                scaled = unit_q * scale[:, None]
                grad_unit_keys = tl.sum(grad_logits[:, :, None] * scaled[:, None, :], axis=0)      # (BP, BK)
                if j == 0:
                    grad_keys_u += grad_unit_keys
                elif j == 1:
                    grad_keys_v += grad_unit_keys
                else:
                    grad_keys_s += grad_unit_keys
                grad_scaled = tl.sum(grad_logits[:, :, None] * unit_keys[None, :, :], axis=1)     # (BB, BK)
                grad_unit_q = grad_scaled * scale[:, None]
                # Backward of q / |q|: (g - q_hat (g . q_hat)) / |q|.
                grad_q = (grad_unit_q - unit_q * tl.sum(grad_unit_q * unit_q, axis=1)[:, None]) / norm[:, None]
                grad_q = tl.where(mask_b[:, None] & mask_k[None, :], grad_q, 0.0)
                tl.store(grad_head_ptr + (query_row + offs_k)[None, :] * B + offs_b[:, None], grad_q,
                         mask=mask_b[:, None] & mask_k[None, :])
                tl.store(partial + 3 * P * K + P + query_row + offs_k, tl.sum(grad_q, axis=0), mask=mask_k)
                if LEARNED:
                    grad_raw = tl.sum(grad_scaled * unit_q, axis=1) * tl.sigmoid(raw)
                    grad_raw = tl.where(mask_b, grad_raw, 0.0)
                    tl.store(grad_head_ptr + sharpness_row * B + offs_b, grad_raw, mask=mask_b)
                    tl.store(partial + 3 * P * K + P + sharpness_row, tl.sum(grad_raw, axis=0))
        tl.store(grad_head_ptr + (C + offs_p)[None, :] * B + offs_b[:, None], grad_memory, mask=mask_bp)
        pk = offs_p[:, None] * K + offs_k[None, :]
        mask_pk = mask_p[:, None] & mask_k[None, :]
        tl.store(partial + pk, grad_keys_u, mask=mask_pk)
        tl.store(partial + P * K + pk, grad_keys_v, mask=mask_pk)
        tl.store(partial + 2 * P * K + pk, grad_keys_s, mask=mask_pk)
        tl.store(partial + 3 * P * K + offs_p, grad_s_values, mask=mask_p)

    @triton.jit
    def _grad_keys(partial_ptr, n_blocks, row_length, unit_keys_ptr, key_norm_ptr, j, P, K, offs_p, offs_k,
                   BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
        """Bank j's raw keys' gradient (BP, BK): the blocks' unit-key gradients summed, through
        k / |k|."""
        pk = offs_p[:, None] * K + offs_k[None, :]
        mask_pk = (offs_p[:, None] < P) & (offs_k[None, :] < K)
        unit_keys = tl.load(unit_keys_ptr + j * P * K + pk, mask=mask_pk, other=0.0)
        grad = unit_keys * 0.0
        for block in range(n_blocks):
            grad += tl.load(partial_ptr + block * row_length + j * P * K + pk, mask=mask_pk, other=0.0)
        norm = tl.load(key_norm_ptr + j * P + offs_p, mask=offs_p < P, other=1.0)
        return (grad - unit_keys * tl.sum(grad * unit_keys, axis=1)[:, None]) / norm[:, None]

    @triton.jit
    def _key_map_backward(grad_keys, values_ptr, map_ptr, grad_values_ptr, grad_map_ptr, grad_bias_ptr, P, K, D,
                          block, offs_p, offs_k, BLOCK_D: tl.constexpr):
        """For keys = values @ map^T + bias: map's gradient grad_keys^T values for one block of D
        columns, grad_keys @ map added into the values' gradient there, and (block 0) the bias's."""
        offs_d = block * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_pd = (offs_p[:, None] < P) & (offs_d[None, :] < D)
        mask_kd = (offs_k[:, None] < K) & (offs_d[None, :] < D)
        values = tl.load(values_ptr + offs_p[:, None] * D + offs_d[None, :], mask=mask_pd, other=0.0)   # (BP, BD)
        key_map = tl.load(map_ptr + offs_k[:, None] * D + offs_d[None, :], mask=mask_kd, other=0.0)     # (BK, BD)
        grad_map = tl.sum(grad_keys[:, :, None] * values[:, None, :], axis=0)                          # (BK, BD)
        tl.store(grad_map_ptr + offs_k[:, None] * D + offs_d[None, :], grad_map, mask=mask_kd)
        grad_values_at = grad_values_ptr + offs_p[:, None] * D + offs_d[None, :]
        grad_values = tl.load(grad_values_at, mask=mask_pd, other=0.0)
        grad_values += tl.sum(grad_keys[:, :, None] * key_map[None, :, :], axis=1)                     # (BP, BD)
        tl.store(grad_values_at, grad_values, mask=mask_pd)
        if block == 0:
            tl.store(grad_bias_ptr + offs_k, tl.sum(grad_keys, axis=0), mask=offs_k < K)

    @triton.jit
    def _keys_backward_kernel(partial_ptr, n_blocks, unit_keys_ptr, key_norm_ptr, grad_keys_ptr, grad_s_ptr,
                              grad_bias_ptr, u_ptr, a_ptr, grad_u_ptr, grad_a_ptr, grad_b_ptr,
                              v_ptr, c_ptr, grad_v_ptr, grad_c_ptr, grad_d_ptr, P, K, C, D_IN, D_OUT, BLOCKS_IN,
                              CONTENT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
                              BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr):
        """Grid (1,) with learned keys, else (cdiv(D_IN, BLOCK_D) + cdiv(D_OUT, BLOCK_D),).
        Instance 0 reduces the blocks' partial sums into the keys' (3, P, K), the S programs' (P)
        and the head bias's (C) gradients. With content keys each instance then takes a block of
        the U (first BLOCKS_IN instances) or V columns: the key map's gradient there, and the
        programs' gradient through their keys added into grad_u / grad_v."""
        pid = tl.program_id(0)
        offs_p = tl.arange(0, BLOCK_P)
        offs_k = tl.arange(0, BLOCK_K)
        row_length = 3 * P * K + P + C
        if pid == 0:
            pk = offs_p[:, None] * K + offs_k[None, :]
            mask_pk = (offs_p[:, None] < P) & (offs_k[None, :] < K)
            for j in tl.static_range(3):
                grad = _grad_keys(partial_ptr, n_blocks, row_length, unit_keys_ptr, key_norm_ptr, j, P, K,
                                  offs_p, offs_k, BLOCK_P, BLOCK_K)
                tl.store(grad_keys_ptr + j * P * K + pk, grad, mask=mask_pk)
            grad_s = tl.zeros((BLOCK_P,), dtype=tl.load(unit_keys_ptr).dtype)
            for block in range(n_blocks):
                grad_s += tl.load(partial_ptr + block * row_length + 3 * P * K + offs_p, mask=offs_p < P, other=0.0)
            tl.store(grad_s_ptr + offs_p, grad_s, mask=offs_p < P)
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                grad_bias = tl.zeros((BLOCK_C,), dtype=tl.load(unit_keys_ptr).dtype)
                for block in range(n_blocks):
                    grad_bias += tl.load(partial_ptr + block * row_length + 3 * P * K + P + offs_c,
                                         mask=offs_c < C, other=0.0)
                tl.store(grad_bias_ptr + offs_c, grad_bias, mask=offs_c < C)
        if CONTENT:
            if pid < BLOCKS_IN:
                grad = _grad_keys(partial_ptr, n_blocks, row_length, unit_keys_ptr, key_norm_ptr, 0, P, K,
                                  offs_p, offs_k, BLOCK_P, BLOCK_K)
                _key_map_backward(grad, u_ptr, a_ptr, grad_u_ptr, grad_a_ptr, grad_b_ptr, P, K, D_IN, pid,
                                  offs_p, offs_k, BLOCK_D)
            else:
                grad = _grad_keys(partial_ptr, n_blocks, row_length, unit_keys_ptr, key_norm_ptr, 1, P, K,
                                  offs_p, offs_k, BLOCK_P, BLOCK_K)
                _key_map_backward(grad, v_ptr, c_ptr, grad_v_ptr, grad_c_ptr, grad_d_ptr, P, K, D_OUT,
                                  pid - BLOCKS_IN, offs_p, offs_k, BLOCK_D)


def _blocks(P: int, K: int, rank: int) -> dict:
    return dict(BLOCK_P=max(16, _next_power_of_2(P)), BLOCK_K=max(2, _next_power_of_2(K)),
                BLOCK_R=max(2, _next_power_of_2(rank)))


class TritonFusedLayer(torch.autograd.Function):
    """:class:`~neurocoder.fused._FusedLayer`'s maths on the Triton kernels above: same inputs and
    outputs (``slot_bias`` must be None). tests/test_triton.py checks both agree in value and in
    every gradient."""

    @staticmethod
    def forward(ctx, x, head_weight, head_bias, u_values, v_values, s_values, s_keys, key_a, key_b, key_c, key_d,
                slot_bias, rank, key_dim, sharpness, want_usage):
        if slot_bias is not None:
            raise ValueError("TritonFusedLayer: a grown memory's slot offsets (slot_bias) are not supported; "
                             "the layer takes neurocoder.fused._FusedLayer for it")
        x, u_values, v_values = x.contiguous(), u_values.contiguous(), v_values.contiguous()
        B, d_in = x.shape
        C, P, K, d_out = head_weight.shape[0], u_values.shape[0], key_dim, v_values.shape[1]
        content, learned = key_c is not None, sharpness is None
        expected = 3 * rank * K + (3 * rank if learned else 0)
        if C != expected:
            raise ValueError(f"TritonFusedLayer: the composer has {C} rows, expected {expected} "
                             f"(queries{' and sharpness' if learned else ''} only)")
        blocks = _blocks(P, K, rank)
        # The composer's rows then x M_U^T, transposed: each GEMM fills contiguous rows.
        head_t = x.new_empty(C + P, B)
        torch.addmm(head_bias.unsqueeze(1), head_weight, x.T, out=head_t[:C])
        torch.mm(u_values, x.T, out=head_t[C:])
        unit_keys, key_norm = x.new_empty(3, P, K), x.new_empty(3, P)
        a, b = key_a.contiguous(), key_b.contiguous()
        c, d = (key_c.contiguous(), key_d.contiguous()) if content else (None, None)
        _keys_kernel[(3,)](u_values, a, b, v_values if content else None, c, d, s_keys.contiguous(), unit_keys,
                           key_norm, P, K, d_in, d_out, CONTENT=content, BLOCK_P=blocks["BLOCK_P"],
                           BLOCK_K=blocks["BLOCK_K"], BLOCK_D=16)
        n_blocks = triton.cdiv(B, _BLOCK_B)
        mixed, sigma = x.new_empty(B, P), x.new_empty(B, rank)
        usage_parts = x.new_empty(n_blocks, 3, P) if want_usage else mixed
        fixed = 0.0 if learned else float(sharpness)
        fold = _state["fold_output_products"]
        y = x.new_empty(B, d_out) if fold else None
        _read_forward_kernel[(n_blocks,)](head_t, unit_keys, s_values.contiguous(), mixed, sigma, usage_parts,
                                          v_values, y if fold else mixed, B, P, K, C, d_out, fixed, RANK=rank,
                                          LEARNED=learned, WANT_USAGE=want_usage, WITH_OUTPUT=fold,
                                          BLOCK_B=_BLOCK_B, BLOCK_O=_BLOCK_O, num_warps=_READ_WARPS, **blocks)
        if not fold:
            y = torch.mm(mixed, v_values)
        usage = usage_parts.sum(0) if want_usage else x.new_zeros(3, P)
        ctx.save_for_backward(x, head_weight, u_values, v_values, s_values, a, b, c, d, head_t, unit_keys, key_norm,
                              mixed)
        ctx.layout = (rank, K, fixed, learned, content, fold)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(usage)
        return y, sigma, usage

    @staticmethod
    def backward(ctx, grad_y, grad_sigma, _grad_usage):
        x, head_weight, u_values, v_values, s_values, a, b, c, d, head_t, unit_keys, key_norm, mixed = \
            ctx.saved_tensors
        rank, K, fixed, learned, content, fold = ctx.layout
        need = ctx.needs_input_grad
        B, d_in = x.shape
        C, P, d_out = head_weight.shape[0], u_values.shape[0], v_values.shape[1]
        blocks = _blocks(P, K, rank)
        if grad_y is None:
            grad_y = x.new_zeros(B, d_out)
        grad_y = grad_y.contiguous()
        # (B, P); folded into the read backward when its products are
        grad_mixed = None if fold else torch.mm(grad_y, v_values.T)
        grad_v_values = torch.mm(mixed.T, grad_y)                          # (P, d_out)
        grad_head = x.new_empty(C + P, B)
        n_blocks = triton.cdiv(B, _BLOCK_B)
        row_length = 3 * P * K + P + C
        partial = x.new_empty(n_blocks, row_length)
        has_grad_sigma = grad_sigma is not None
        _read_backward_kernel[(n_blocks,)](head_t, unit_keys, s_values, grad_y if fold else grad_mixed,
                                           grad_sigma.contiguous() if has_grad_sigma else grad_y, grad_head,
                                           partial, v_values, grad_y, B, P, K, C, d_out, fixed, RANK=rank,
                                           LEARNED=learned, HAS_GRAD_SIGMA=has_grad_sigma, FROM_GRAD_Y=fold,
                                           BLOCK_B=_BLOCK_B, BLOCK_O=_BLOCK_O, num_warps=_READ_WARPS, **blocks)
        grad_x = None
        if need[0]:
            grad_x = torch.mm(grad_head[:C].T, head_weight).addmm_(grad_head[C:].T, u_values)
        grad_joined = torch.mm(grad_head, x)                               # (C + P, d_in): W's then U's
        if n_blocks > _MAX_UNREDUCED_BLOCKS:
            partial, n_blocks = partial.sum(0, keepdim=True), 1
        grad_keys, grad_s_values, grad_head_bias = x.new_empty(3, P, K), x.new_empty(P), x.new_empty(C)
        grad_u = grad_joined[C:]
        if content:
            grad_a, grad_b, grad_c, grad_d = a.new_empty(a.shape), b.new_empty(b.shape), c.new_empty(c.shape), \
                d.new_empty(d.shape)
            block_d = 16
            blocks_in = triton.cdiv(d_in, block_d)
            grid = (blocks_in + triton.cdiv(d_out, block_d),)
        else:
            grad_a = grad_b = grad_c = grad_d = None
            block_d, blocks_in, grid = 32, 0, (1,)
        _keys_backward_kernel[grid](partial, n_blocks, unit_keys, key_norm, grad_keys, grad_s_values, grad_head_bias,
                                    u_values, a, grad_u, grad_a, grad_b, v_values, c, grad_v_values, grad_c, grad_d,
                                    P, K, C, d_in, d_out, blocks_in, CONTENT=content, BLOCK_P=blocks["BLOCK_P"],
                                    BLOCK_K=blocks["BLOCK_K"], BLOCK_D=block_d, BLOCK_C=64)
        if not content:
            grad_a, grad_b = grad_keys[0], grad_keys[1]
        grads = (grad_x, grad_joined[:C], grad_head_bias, grad_u, grad_v_values, grad_s_values, grad_keys[2],
                 grad_a, grad_b, grad_c, grad_d)
        return (*(g if need[i] else None for i, g in enumerate(grads)), None, None, None, None, None)
