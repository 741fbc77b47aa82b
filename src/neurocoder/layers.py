"""Neurocoder layers: compose a weight from the program memory per input, and apply it fast.

For each input the composer reads R = steps x rank components from the memory and the layer
applies ``W(x) = sum_n sigma_n u_n v_n^T`` without ever building W per sample:

    NeurocoderLinear:  x (B, d_in) -> x M_U^T (B, P) -> mix by U read weights and scale by sigma
                       (B, R) -> mix by V read weights (B, P) -> times M_V (B, d_out)
    NeurocoderConv2d:  x -> conv with the P program filters (B, P, H, W) -> a per-sample P x C_out
                       mixing matrix (from the read weights, sigma and M_V) applied as a 1x1 map

Cost O(B P (d_in + d_out)) for the linear layer, against O(B d_in d_out) for a dense one.
``forward_explicit`` builds W per sample instead; it exists for tests and benchmarks.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from ._checks import check_positive_int
from .composer import COMPOSERS, ComposerOutput, FeedForwardComposer, RecurrentComposer
from . import native as _native
from .fused import (_EPS, _native_applies, _reverse_cumsum, conv_layer_read_mixing, conv_read_mixing, fused_layer_apply,
                    fused_read_apply)
from .memory import KEY_MODES, ProgramMemory
from .reading import content_attention, read_with_least_used
from .trace import BANK_NAMES, Trace

__all__ = ["NeurocoderLayer", "NeurocoderLinear", "NeurocoderConv2d", "singular_values"]


def singular_values(raw: torch.Tensor) -> torch.Tensor:
    """(..., R) raw reads -> positive, descending singular values.

    sigma_R = softplus(s_R), sigma_n = sigma_(n+1) + softplus(s_n): a reversed cumulative sum.
    """
    R = raw.shape[-1]
    # One matrix product with a lower-triangular ones matrix does the reversed cumulative sum.
    reverse_cumsum = torch.ones(R, R, device=raw.device, dtype=raw.dtype).tril()
    return F.softplus(raw) @ reverse_cumsum


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except (TypeError, RuntimeError):  # devices without autocast (meta), or torch < 2.4
        return False


def _no_autocast(device_type: str):
    """Turn autocast off for a block, where it is on."""
    if _autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _under_functorch(tensor: torch.Tensor) -> bool:
    """True inside a torch.func transform, where the running usage (a buffer) must not be
    mutated in place."""
    if torch.compiler.is_compiling():
        return False
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check is not None and check(tensor))


def _recomputing() -> bool:
    """Whether this forward runs inside a backward pass: activation checkpointing
    (``torch.utils.checkpoint``) recomputes a training-mode forward there, and its batch must
    not count twice in the running usage average."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)       # private; guard other torch versions
    return task_id is not None and not torch.compiler.is_compiling() and task_id() != -1


def _max_over_components(weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Three (B, R, P) read weights -> (3, B, P) usage: each slot's largest weight."""
    return torch.stack([w.amax(dim=1) for w in weights])


class NeurocoderLayer(nn.Module):
    """What linear and convolutional Neurocoder layers share: memory, composer, reading.

    Subclasses set ``self._label`` and implement ``forward``.
    """

    _label = "NeurocoderLayer"

    def _build(self, program_in: int, program_out: int, context_features: int, num_programs: int,
               rank: int, key_dim: int, steps: int, composer: str, key_mode: str, least_used: int,
               sharpness: float | str, residual: bool, composer_hidden: int, factory: dict,
               orthogonality_over_keys: bool = False) -> None:
        owner = self._label
        for name, value in (("num_programs", num_programs), ("rank", rank), ("key_dim", key_dim),
                            ("steps", steps), ("context_features", context_features),
                            ("composer_hidden", composer_hidden)):
            check_positive_int(owner, name, value)
        if composer not in COMPOSERS:
            raise ValueError(f"{owner}: composer must be one of {COMPOSERS}, got {composer!r}")
        if composer == "feedforward" and steps != 1:
            raise ValueError(f"{owner}: the feed-forward composer reads once (steps=1), got steps={steps}; "
                             f"use composer='recurrent' for several read steps")
        if key_mode not in KEY_MODES:
            raise ValueError(f"{owner}: key_mode must be one of {KEY_MODES}, got {key_mode!r}")
        if isinstance(least_used, bool) or not isinstance(least_used, int) or least_used < 0:
            raise ValueError(f"{owner}: least_used must be an integer >= 0 (0 turns it off), got {least_used!r}")
        if least_used > num_programs:
            raise ValueError(f"{owner}: least_used={least_used} exceeds num_programs={num_programs}; "
                             f"the least-used weight spreads over at most num_programs slots")
        if sharpness != "learned":
            if isinstance(sharpness, bool) or not isinstance(sharpness, (int, float)) or not sharpness > 0 \
                    or not math.isfinite(sharpness):
                raise ValueError(f"{owner}: sharpness must be a finite number > 0 or 'learned', got {sharpness!r}")
        self.rank = rank
        self.key_dim = key_dim
        self.steps = steps
        self.composer_kind = composer
        self.least_used = least_used
        self.sharpness = sharpness
        self.residual = residual
        self.context_features = context_features
        if not isinstance(orthogonality_over_keys, bool):
            raise TypeError(f"{owner}: orthogonality_over_keys must be True or False, got {orthogonality_over_keys!r}")
        self.memory = ProgramMemory(num_programs, program_in, program_out, key_dim, key_mode,
                                    orthogonality_over_keys=orthogonality_over_keys, **factory)
        options = dict(sharpness=sharpness, least_used=least_used > 0, residual=residual, **factory)
        if composer == "feedforward":
            self.composer = FeedForwardComposer(context_features, key_dim, rank, **options)
        else:
            self.composer = RecurrentComposer(context_features, key_dim, rank, steps,
                                              hidden_size=composer_hidden, **options)
        self._trace_sink = None
        # Set by neurocoder.reuse_programs: a dict while the block runs, filled by the first no-grad
        # call with the tensors that depend only on parameters (and the parameters' versions).
        self._reused: dict | None = None

    @property
    def num_programs(self) -> int:
        """P, slots per bank (grows with ``memory.grow``)."""
        return self.memory.num_programs

    @property
    def total_rank(self) -> int:
        """R = steps x rank, the number of components a composition sums."""
        return self.steps * self.rank

    # ----------------------------------------------------------------------------- checks
    def _check_tensor(self, what: str, tensor: torch.Tensor, shape_ok, expected: str) -> None:
        """Raise a clear error unless ``tensor`` is a floating tensor on the layer's device and
        dtype whose shape passes ``shape_ok(shape)``; ``expected`` describes that shape."""
        owner = self._label
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{owner}: {what} must be a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise TypeError(f"{owner}: {what} must be a floating-point tensor, got dtype {tensor.dtype}; "
                            f"convert it with .float()")
        if not shape_ok(tuple(tensor.shape)):
            raise ValueError(f"{owner}: expected {what} of shape {expected}, got {tuple(tensor.shape)}")
        reference = self.memory.u_values
        if tensor.device != reference.device:
            raise ValueError(f"{owner}: {what} is on {tensor.device} but the layer's parameters are on "
                             f"{reference.device}; move one of them (tensor.to(device) or layer.to(device))")
        if tensor.dtype != reference.dtype and not _autocast_enabled(tensor.device.type):
            raise TypeError(f"{owner}: {what} has dtype {tensor.dtype} but the layer's parameters are "
                            f"{reference.dtype}; convert one of them (tensor.to({reference.dtype}) or "
                            f"layer.to({tensor.dtype})), or run under torch.autocast")

    # ----------------------------------------------------------------------------- reading
    def read(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, ComposerOutput, torch.Tensor,
                                                   torch.Tensor | None]:
        """Compose the read for a batch of contexts (B, context_features).

        Returns:
            sigma: (B, R) singular values, descending.
            weights: final read weights for the banks U, V, S: three (B, R, P) tensors.
            plan: the composer's output.
            attention: (3, B, R, P) content attention before least-used mixing.
            usage: (3, B, P) the largest weight each slot received in this composition, or None
                when least-used reading is off (then it is the max of ``weights`` over R,
                computed only where a trace or the running average needs it).
        """
        plan = self.composer(context)
        keys = self.memory.keys()
        # Reading runs in at least float32 even under autocast: least-used reading makes discrete
        # choices between slots that bfloat16 rounding would flip.
        dtype = torch.promote_types(self.memory.u_values.dtype, torch.float32)
        usage = None
        with _no_autocast(context.device.type):
            queries, keys = plan.queries.to(dtype), keys.to(dtype)
            sharpness = plan.sharpness.to(dtype) if isinstance(plan.sharpness, torch.Tensor) else plan.sharpness
            slot_bias = self.memory.slot_bias
            attention = content_attention(queries, keys, sharpness,
                                          None if slot_bias is None else slot_bias.to(dtype))
            if self.least_used > 0:
                weights, usage = read_with_least_used(attention, plan.gates.to(dtype), self.least_used)
            else:
                weights = attention
            stacked = weights
            # Unbinding once keeps the backward pass from materialising a zero tensor per bank.
            weights = weights.unbind(0)
            raw_sigma = weights[2] @ self.memory.s.to(dtype)                        # (B, R)
            sigma = singular_values(raw_sigma)
        # An empty batch has no usage to average in (its mean would be NaN).
        if self.training and sigma.shape[0] and not _under_functorch(sigma) and not _recomputing():
            with torch.no_grad():
                # One reduction over the contiguous (3, B, R, P) weights.
                batch_usage = usage if usage is not None else stacked.amax(dim=2)
                self.memory.update_usage(batch_usage.mean(dim=1))
        return sigma, weights, plan, attention, usage

    def _make_trace(self, sigma, weights, plan, attention, usage) -> Trace:
        B, R, P = weights[0].shape
        T, r = self.steps, self.rank
        if usage is None:
            usage = _max_over_components(weights)

        def per_bank(t: torch.Tensor, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
            return {name: t[j].reshape(B, *shape) for j, name in enumerate(BANK_NAMES)}

        sharpness = plan.sharpness
        if isinstance(sharpness, torch.Tensor):
            sharpness = sharpness.squeeze(-1).transpose(0, 1)
        else:
            sharpness = torch.full((B, 3, R), float(sharpness), device=sigma.device, dtype=sigma.dtype)
        return Trace(
            sigma=sigma,
            read_weights=per_bank(weights, (T, r, P)),
            attention=per_bank(attention, (T, r, P)),
            gates=per_bank(plan.gates, (T, r)) if plan.gates is not None else None,
            sharpness=sharpness,
            usage=per_bank(usage, (P,)),
            residual_gate=plan.residual_gate,
        )

    def _kept(self, name, build):
        """``build()``, or inside ``neurocoder.reuse_programs`` (no-grad calls only) what an earlier
        call built under ``name``, unless a parameter changed since. ``build`` must depend on
        parameters and buffers only."""
        reused = getattr(self, "_reused", None)          # absent on modules pickled by older versions
        reuse = reused is not None and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        if reuse:
            # In-place updates (an optimiser step, load_state_dict, freeze) bump the tensors'
            # version counters: then what was kept is stale and is computed again.
            stamp = (self.memory.num_programs, tuple(t._version for t in reused["watch"]))
            if reused.get("stamp") != stamp:
                reused.clear()
                reused.update(watch=_reused_watch(self), stamp=stamp)
            elif name in reused:
                return reused[name]
        value = build()
        if reuse:
            reused[name] = value
        return value

    def _finish(self, y: torch.Tensor, parts: tuple, return_trace: bool):
        sink = self._trace_sink
        if not return_trace and sink is None:
            return y
        trace = self._make_trace(*parts)
        if sink is not None:
            sink[0].append(trace.detach() if sink[1] else trace)
        return (y, trace) if return_trace else y

    def _residual_scale(self, sigma: torch.Tensor, plan: ComposerOutput) -> torch.Tensor:
        """(B,) rho * sigma_R, the weight of the working program."""
        return plan.residual_gate * sigma[:, -1]

    # ----------------------------------------------------------------------------- regularisation
    def orthogonality_loss(self) -> torch.Tensor:
        return self.memory.orthogonality_loss()

    def save_programs(self, path):
        """Save this layer's program memory (see :meth:`ProgramMemory.save_programs`)."""
        return self.memory.save_programs(path)

    def load_programs(self, path) -> None:
        self.memory.load_programs(path)

    def _options_repr(self) -> str:
        return (f"num_programs={self.num_programs}, rank={self.rank}, key_dim={self.key_dim}, "
                f"steps={self.steps}, composer={self.composer_kind!r}, key_mode={self.memory.key_mode!r}, "
                f"least_used={self.least_used}, sharpness={self.sharpness!r}, residual={self.residual}")


class NeurocoderLinear(NeurocoderLayer):
    """A linear layer whose weight is composed per input from a program memory.

    ``y = x W(c) (+ rho sigma_R x W_res) (+ b)`` with ``W(c) = sum_n sigma_n u_n v_n^T`` read from
    the memory by a composer looking at the context c (the input x unless one is given).

    Args:
        in_features: d_in.
        out_features: d_out.
        num_programs: P, slots per memory bank.
        rank: r, components read per step.
        key_dim: k, size of keys and queries.
        steps: T, read steps (recurrent composer only); R = T * r components in all.
        composer: ``'feedforward'`` or ``'recurrent'``.
        key_mode: ``'learned'`` or ``'content'``.
        least_used: m, slots that share the least-used weight; 0 turns least-used reading off.
        sharpness: fixed attention sharpness (> 0), or ``'learned'`` (per component).
        residual: add a static working program W_res with a composed gate.
        bias: add a learned bias.
        context_features: size of a separate context given as ``forward(x, context=c)``;
            default in_features (the context is x).
        composer_hidden: LSTM width of the recurrent composer.
        fused: run the common case (no least-used reading, no trace, float32/float64 outside
            autocast and torch.func) through the fused read-and-apply of :mod:`neurocoder.fused`;
            False uses the composable path everywhere (same values and gradients up to rounding,
            slower). Also settable later as ``layer.fused``.
        orthogonality_over_keys: the orthogonality loss over each slot's key and value together,
            as in the authors' released code (see :class:`~neurocoder.memory.ProgramMemory`).

    Shapes:
        x: (..., in_features) -> y: (..., out_features); context: (..., context_features) with
        the same leading dimensions as x.
    """

    _label = "NeurocoderLinear"

    def __init__(self, in_features: int, out_features: int, num_programs: int = 50, rank: int = 10,
                 key_dim: int = 8, steps: int = 1, composer: str = "feedforward", key_mode: str = "content",
                 least_used: int = 0, sharpness: float | str = "learned", residual: bool = False,
                 bias: bool = True, context_features: int | None = None, composer_hidden: int = 64,
                 fused: bool = True, orthogonality_over_keys: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        check_positive_int("NeurocoderLinear", "in_features", in_features)
        if not isinstance(fused, bool):
            raise TypeError(f"NeurocoderLinear: fused must be True or False, got {fused!r}")
        self.fused = fused
        check_positive_int("NeurocoderLinear", "out_features", out_features)
        self._label = f"NeurocoderLinear(in_features={in_features}, out_features={out_features})"
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self._build(in_features, out_features, context_features or in_features, num_programs, rank, key_dim,
                    steps, composer, key_mode, least_used, sharpness, residual, composer_hidden, factory,
                    orthogonality_over_keys)
        self.has_separate_context = context_features is not None
        if residual:
            self.residual_weight = nn.Parameter(torch.empty(in_features, out_features, **factory))
            nn.init.xavier_uniform_(self.residual_weight)
        else:
            self.register_parameter("residual_weight", None)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, **factory))
        else:
            self.register_parameter("bias", None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self._options_repr()}, "
                f"bias={self.bias is not None}")

    def _inputs(self, x: torch.Tensor, context: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_tensor("input", x, lambda shape: len(shape) >= 1 and shape[-1] == self.in_features,
                           f"(..., {self.in_features}) (last dimension = in_features)")
        flat = x.reshape(-1, self.in_features)
        if context is None:
            return flat, flat
        self._check_tensor("context", context, lambda shape: len(shape) >= 1 and shape[-1] == self.context_features,
                           f"(..., {self.context_features}) (last dimension = context_features)")
        if context.shape[:-1] != x.shape[:-1]:
            raise ValueError(f"{self._label}: context leading dimensions {tuple(context.shape[:-1])} must match "
                             f"the input's {tuple(x.shape[:-1])}")
        return flat, context.reshape(-1, self.context_features)

    def _can_fuse(self, flat: torch.Tensor, return_trace: bool) -> bool:
        """Whether the fused read-and-apply (:mod:`neurocoder.fused`) covers this call."""
        return (self.fused and not return_trace and self._trace_sink is None
                and flat.shape[0] > 0 and flat.dtype in (torch.float32, torch.float64)
                and not _autocast_enabled(flat.device.type)
                and not _under_functorch(flat)
                # Least-used reading is in the fused read on the C++ kernels only (CPU).
                and (self.least_used == 0 or _native_applies(flat, self.memory.u_values)))

    def _parameter_constants(self, joined: bool):
        """The keys (3, P, k) and, for the joined GEMM, its weight (C + P, d_in) and bias (C + P,).

        They depend on parameters only. Inside ``neurocoder.reuse_programs`` a no-grad call
        computes them once and later calls reuse them (a rollout's many small forward passes
        between two optimiser steps); otherwise they are recomputed every call.
        """
        def build():
            memory, linear = self.memory, self.composer.head.linear
            weight = bias = None
            if joined:
                weight = torch.cat([linear.weight, memory.u])
                bias = F.pad(linear.bias, (0, memory.num_programs))
            return memory.keys(), weight, bias
        return self._kept(joined, build)

    def _can_run_inference_path(self, context: torch.Tensor | None) -> bool:
        """Whether :meth:`_inference_forward` covers a call the fused path covers: no gradient
        (nothing to save for a backward), eval mode (no usage to count), the feed-forward
        composer, no working program."""
        return (not torch.is_grad_enabled() and not self.training and self.residual_weight is None
                and self.least_used == 0 and isinstance(self.composer, FeedForwardComposer)
                and not torch.compiler.is_compiling())

    def _inference_constants(self, joined: bool) -> dict:
        """What :meth:`_inference_forward` needs from the parameters: the composer's rows (joined
        with the U programs' when the composer reads the input itself), the unit keys laid out
        for one batched product per bank, and the programs."""
        memory, linear = self.memory, self.composer.head.linear
        keys, weight, bias = self._parameter_constants(joined)
        if not joined:
            weight, bias = linear.weight, linear.bias                       # (C, d), (C,)
        unit_keys = keys / torch.linalg.vector_norm(keys, dim=2, keepdim=True).clamp_min(_EPS)   # (J, P, k)
        slot_bias = memory.slot_bias
        return {"weight": weight, "bias": bias, "u": None if joined else memory.u,
                "unit_keys": unit_keys.contiguous(),                             # (J, P, k)
                "unit_keys_t": unit_keys.transpose(1, 2).contiguous(),          # (J, k, P)
                "s": memory.s, "v": memory.v, "slot_bias": None if slot_bias is None else slot_bias.unsqueeze(1),
                "reverse_cumsum_t": _reverse_cumsum(self.rank, weight).T}

    def _inference_forward(self, flat: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """(B, d_in) -> (B, d_out), bias included: the fused path's maths for a no-grad,
        eval-mode call in about 15 operations and no autograd Function (an agent's rollout makes
        thousands of such calls on small batches, where each operation's fixed cost dominates).
        Bank-first layout (J, B, r, ...) so that each bank's logits are one product with its keys."""
        joined = context is None
        kept = self._kept(("inference", joined), lambda: self._inference_constants(joined))
        head = self.composer.head
        if joined and _native_applies(flat, kept["weight"], kept["bias"], kept["v"], self.bias):
            # The same maths in one C++ call (neurocoder.native) instead of ~15 operations.
            return _native.ops().fused_layer_inference(
                flat, kept["weight"], kept["bias"], kept["unit_keys"], kept["s"], kept["v"], self.bias,
                self.memory.slot_bias, self.rank, self.key_dim,
                None if head.learn_sharpness else float(self.sharpness))
        J, r, k = 3, self.rank, self.key_dim
        P, B, Q = self.memory.num_programs, flat.shape[0], 3 * self.rank * self.key_dim
        out = torch.addmm(kept["bias"], flat if joined else context, kept["weight"].T)   # (B, C [+ P])
        queries = out[:, :Q].view(B, J, r, k)
        norms = torch.linalg.vector_norm(queries, dim=-1).clamp_min_(_EPS)                # (B, J, r)
        if head.learn_sharpness:
            start = sum(head.sizes[:2])
            scale = F.softplus(out[:, start:start + J * r].view(B, J, r)).div_(norms)
        else:
            scale = norms.reciprocal_().mul_(float(self.sharpness))
        # Scaled unit queries, written bank-first: the scale costs k multiplies, not P.
        scaled = torch.empty(J, B, r, k, dtype=out.dtype, device=out.device)
        torch.mul(queries.transpose(0, 1), scale.transpose(0, 1).unsqueeze(-1), out=scaled)
        logits = torch.bmm(scaled.view(J, B * r, k), kept["unit_keys_t"])                 # (J, B r, P)
        if kept["slot_bias"] is not None:
            logits += kept["slot_bias"]
        read_u, read_v, read_s = torch.softmax(logits, dim=-1).view(J, B, r, P).unbind(0)   # (B, r, P)
        sigma = F.softplus(read_s @ kept["s"]) @ kept["reverse_cumsum_t"]                  # (B, r), descending
        through_memory = out[:, -P:] if joined else flat @ kept["u"].T                     # (B, P)
        per_component = (read_u * through_memory.unsqueeze(1)).sum(-1).mul_(sigma)         # (B, r)
        mixed = torch.bmm(per_component.unsqueeze(1), read_v).squeeze(1)                  # (B, P)
        if self.bias is None:
            return mixed @ kept["v"]
        return torch.addmm(self.bias, mixed, kept["v"])

    def _fused_forward(self, flat: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """(B, d_in) -> (B, d_out) through :func:`~neurocoder.fused.fused_layer_apply` (a training
        step of a feed-forward layer reading its own input, without gates, working program or
        frozen slots) or :func:`~neurocoder.fused.fused_read_apply` (the rest)."""
        memory, head = self.memory, self.composer.head
        joined = isinstance(self.composer, FeedForwardComposer) and context is None
        only_sharpness = not head.sizes[1] and not head.sizes[3]              # no gates, no residual gate
        if (joined and only_sharpness and not memory._has_frozen and torch.is_grad_enabled()
                and not torch.compiler.is_compiling()):
            # A training step of the common case: the whole layer in one Function.
            key_tensors = ((memory.u_keys, memory.v_keys) if memory.key_mode == "learned" else
                           (memory.u_key_map.weight, memory.u_key_map.bias,
                            memory.v_key_map.weight, memory.v_key_map.bias))
            y, _, usage = fused_layer_apply(flat, head.linear.weight, head.linear.bias, memory.u_values,
                                            memory.v_values, memory.s_values, memory.s_keys, key_tensors,
                                            memory.slot_bias, self.rank, self.key_dim,
                                            None if head.learn_sharpness else float(self.sharpness),
                                            want_usage=self.training)
            if self.training and flat.shape[0] and not _recomputing():
                memory.update_usage(usage)
            return y
        keys, weight, bias = self._parameter_constants(joined)
        if joined:
            # The composer's linear map and x M_U^T read the same input: one GEMM does both, and
            # the fused read takes x M_U^T from its last P columns.
            P = memory.num_programs
            head_out = torch.addmm(bias, flat, weight.T).unsqueeze(1)             # (B, 1, C + P)
            through_memory, raw = None, head_out[..., :head_out.shape[-1] - P]
        else:
            raw = head_out = self.composer.raw(flat if context is None else context)   # (B, T, C)
            through_memory = flat @ memory.u.T                                     # (B, P)
        # Sharpness and the residual gate (when the composer makes them) come from the same raw output.
        parts = head.split(raw) if head.extra_outputs else None
        plan = head.assemble(parts) if self.residual_weight is not None else None
        if head.learn_sharpness:
            sharpness = head.component_major_sharpness(parts[2])                    # (3, 1, R, B)
        else:
            sharpness = float(self.sharpness)
        gates = head.component_major_gates(parts[1]) if self.least_used else None   # (3 R, B)
        y, sigma, usage = fused_read_apply(head_out, through_memory, self.rank, self.key_dim, keys,
                                           sharpness, memory.slot_bias, memory.s, memory.v,
                                           want_usage=self.training, gates=gates, least_used=self.least_used)
        if self.training and flat.shape[0] and not _recomputing():
            memory.update_usage(usage)
        if self.residual_weight is not None:
            y = y + self._residual_scale(sigma, plan).unsqueeze(-1) * (flat @ self.residual_weight)
        return y

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, return_trace: bool = False):
        flat, ctx = self._inputs(x, context)
        if self._can_fuse(flat, return_trace):
            if self._can_run_inference_path(context):
                return self._inference_forward(flat, None if context is None else ctx).reshape(
                    *x.shape[:-1], self.out_features)
            y = self._fused_forward(flat, None if context is None else ctx)
            if self.bias is not None:
                y = y + self.bias
            return y.reshape(*x.shape[:-1], self.out_features)
        sigma, weights, plan, attention, usage = self.read(ctx)
        memory_u, memory_v = self.memory.u, self.memory.v
        read_u, read_v = weights[0].to(flat.dtype), weights[1].to(flat.dtype)      # (B, R, P) each
        through_memory = flat @ memory_u.to(flat.dtype).T                        # (B, P)
        # Multiply-and-sum, not bmm: batches of 1 x P matrices are far slower through bmm (about
        # 4x for forward+backward at B=128, R=10, P=50 on a CPU; see benchmarks/).
        per_component = (read_u * through_memory.unsqueeze(1)).sum(-1)             # (B, R)
        per_component = per_component * sigma.to(per_component.dtype)
        mixed = (per_component.unsqueeze(-1) * read_v).sum(1)                      # (B, P)
        y = mixed @ memory_v.to(mixed.dtype)                                       # (B, d_out)
        if self.residual_weight is not None:
            y = y + self._residual_scale(sigma, plan).unsqueeze(-1).to(y.dtype) * (flat @ self.residual_weight.to(flat.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return self._finish(y, (sigma, weights, plan, attention, usage), return_trace)

    def compose_weight(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The per-sample weight the layer applies, (N, in_features, out_features).

        Slow and memory-hungry (N x d_in x d_out): for analysis and tests. Includes the working
        program when ``residual`` is on; excludes the bias.
        """
        flat, ctx = self._inputs(x, context)
        sigma, weights, plan, _, _ = self.read(ctx)
        u = weights[0] @ self.memory.u                                             # (B, R, d_in)
        v = weights[1] @ self.memory.v                                             # (B, R, d_out)
        weight = torch.einsum("br,bri,bro->bio", sigma, u, v)
        if self.residual_weight is not None:
            weight = weight + self._residual_scale(sigma, plan)[:, None, None] * self.residual_weight
        return weight

    def forward_explicit(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Same output as ``forward``, computed by building each sample's weight and applying it
        with bmm (the released code's formulation). For tests and benchmarks."""
        weight = self.compose_weight(x, context)
        y = torch.bmm(x.reshape(-1, 1, self.in_features), weight).squeeze(1)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


class NeurocoderConv2d(NeurocoderLayer):
    """A 2-D convolution whose filters are composed per input from a program memory.

    A U program is a filter (in_channels x kh x kw), a V program a vector over out_channels.
    The composer reads from the globally average-pooled input (B, in_channels) unless a
    context (B, context_features) is given. Other arguments as :class:`NeurocoderLinear`
    (default ``num_programs=32, rank=8``), plus ``kernel_size``, ``stride``, ``padding`` and
    ``dilation`` as in ``nn.Conv2d`` (zero padding, groups=1).

    With ``fused`` (the default), CPU calls in float32 or float64 read through the C++ kernels of
    :mod:`neurocoder.native` (:func:`neurocoder.fused.conv_read_mixing`) where the options allow
    it (no least-used reading, no working program, no trace); everything else takes the
    composable path, with the same maths. On that path a batch of at least 128 whose context
    carries no gradient (the layer reads data) reads each distinct context once and shares the
    read, when that at least halves the reads: the values, gradients and usage are those of
    reading every sample. (A MinAtar board's pooled channels take few values: 5 to 82 distinct
    contexts in 2,048 frames of random play, ``scripts/minatar_contexts.py``.) Set the attribute
    ``dedupe_contexts = False`` to read every sample. Inside :func:`reuse_programs`, no-grad
    eval-mode calls keep each context's mixing matrix until a parameter changes.

    Shapes:
        x: (B, in_channels, H, W) -> y: (B, out_channels, H_out, W_out); an unbatched
        (in_channels, H, W) input gives (out_channels, H_out, W_out), as ``nn.Conv2d``.
    """

    _label = "NeurocoderConv2d"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 num_programs: int = 32, rank: int = 8, key_dim: int = 8, steps: int = 1,
                 composer: str = "feedforward", key_mode: str = "content", least_used: int = 0,
                 sharpness: float | str = "learned", residual: bool = False, bias: bool = True,
                 context_features: int | None = None, composer_hidden: int = 64, fused: bool = True,
                 orthogonality_over_keys: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        check_positive_int("NeurocoderConv2d", "in_channels", in_channels)
        self.fused = fused
        # Read identical contexts once on the C++ path (see _native_forward); False: every sample.
        self.dedupe_contexts = True
        check_positive_int("NeurocoderConv2d", "out_channels", out_channels)
        self._label = f"NeurocoderConv2d(in_channels={in_channels}, out_channels={out_channels})"
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"{self._label}: padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
            self.padding = padding
        else:
            self.padding = _pair(padding)
        for name, pair in (("kernel_size", self.kernel_size), ("stride", self.stride), ("dilation", self.dilation)):
            if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in pair):
                raise ValueError(f"{self._label}: {name} must be positive integers, got {pair}")
        if not isinstance(self.padding, str) and any(n < 0 for n in self.padding):
            raise ValueError(f"{self._label}: padding must be >= 0, got {self.padding}")
        factory = {"device": device, "dtype": dtype}
        self.in_channels, self.out_channels = in_channels, out_channels
        filter_size = in_channels * self.kernel_size[0] * self.kernel_size[1]
        self._build(filter_size, out_channels, context_features or in_channels, num_programs, rank, key_dim,
                    steps, composer, key_mode, least_used, sharpness, residual, composer_hidden, factory,
                    orthogonality_over_keys)
        self.has_separate_context = context_features is not None
        if residual:
            self.residual_weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size, **factory))
            nn.init.kaiming_uniform_(self.residual_weight, a=math.sqrt(5))
        else:
            self.register_parameter("residual_weight", None)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_channels, **factory))
        else:
            self.register_parameter("bias", None)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, {self._options_repr()}, "
                f"bias={self.bias is not None}")

    def _conv(self, x: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, filters.to(x.dtype), None, self.stride, self.padding, self.dilation)

    def _inputs(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        self._check_tensor("input", x, lambda shape: len(shape) == 4 and shape[1] == self.in_channels,
                           f"(B, {self.in_channels}, H, W)")
        if context is None:
            return self._pooled(x)
        self._check_tensor("context", context,
                           lambda shape: shape == (x.shape[0], self.context_features),
                           f"({x.shape[0]}, {self.context_features}) (batch, context_features)")
        return context

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_in): the composer's default context, x averaged over its pixels.
        On the fused path the C++ loop the rollout op uses: the same bits there, in training and
        with or without a gradient (and faster than the mean)."""
        if self.fused and _native_applies(x):
            if x.requires_grad and torch.is_grad_enabled():
                return _PixelMeans.apply(x)
            return _native.ops().pixel_means(x)
        return x.mean(dim=(2, 3))

    def _program_filters(self) -> torch.Tensor:
        return self.memory.u.reshape(self.num_programs, self.in_channels, *self.kernel_size)

    def _can_run_native(self, x: torch.Tensor, return_trace: bool) -> bool:
        """Whether :func:`~neurocoder.fused.conv_read_mixing` (C++, CPU) covers this call."""
        memory = self.memory
        return (self.fused and not return_trace and self._trace_sink is None and x.shape[0] > 0
                and self.least_used == 0 and self.residual_weight is None
                and not _autocast_enabled(x.device.type) and not _under_functorch(x)
                and _native_applies(x, memory.u_values, memory.v_values, memory.s_values, self.bias,
                                    memory.slot_bias))

    def _read_mixing(self, ctx: torch.Tensor, counts: torch.Tensor | None = None,
                     programs: tuple | None = None, expand: torch.Tensor | None = None) -> torch.Tensor:
        """(B, context_features) -> (B, C_out, P) each context's mixing matrix, through
        :func:`~neurocoder.fused.conv_read_mixing`; counts (B,): how many samples each context
        stands for in the usage average (None: one each); programs: the keys, S and V programs
        when the caller has them (None: taken here); expand (B',): return ``mixing[expand]``
        instead, (B', C_out, P)."""
        memory, head = self.memory, self.composer.head
        usage_weights = None if counts is None else counts.to(memory.u_values.dtype)
        if (programs is None and isinstance(self.composer, FeedForwardComposer) and not head.sizes[1]
                and not head.sizes[3] and not memory._has_frozen and torch.is_grad_enabled()
                and not torch.compiler.is_compiling()):
            # A training step of the common case: composer, keys and read in one Function.
            key_tensors = ((memory.u_keys, memory.v_keys) if memory.key_mode == "learned" else
                           (memory.u_key_map.weight, memory.u_key_map.bias,
                            memory.v_key_map.weight, memory.v_key_map.bias))
            mixing, usage = conv_layer_read_mixing(
                ctx, head.linear.weight, head.linear.bias, memory.u_values, memory.v_values, memory.s_values,
                memory.s_keys, key_tensors, memory.slot_bias, self.steps * self.rank,
                None if head.learn_sharpness else float(self.sharpness), want_usage=self.training,
                usage_weights=usage_weights, expand=expand)
            if self.training and not _recomputing():
                memory.update_usage(usage)
            return mixing
        J, R, k = 3, self.steps * self.rank, self.key_dim
        Q = J * R * k
        if isinstance(self.composer, FeedForwardComposer):
            # The composer's map written transposed, (C, B): its rows are already the queries'
            # (J R k, B) and the sharpness' (J R, B) layouts, so neither needs a permuted copy.
            head_t = torch.addmm(head.linear.bias.unsqueeze(1), head.linear.weight, ctx.T)
            queries, raw_sharpness = head_t[:Q], head_t[sum(head.sizes[:2]):sum(head.sizes[:3])]
        else:
            raw = self.composer.raw(ctx)                                           # (B, T, C)
            B, T = raw.shape[:2]
            per_step = J * self.rank * k                                            # query columns of a step
            queries = raw[..., :per_step].reshape(B, T, J, self.rank, k).permute(2, 1, 3, 4, 0).reshape(Q, B)
            raw_sharpness = head.split(raw)[2]
            if head.learn_sharpness:
                raw_sharpness = raw_sharpness.reshape(B, T, J, self.rank).permute(2, 1, 3, 0).reshape(J * R, B)
        sharpness = F.softplus(raw_sharpness) if head.learn_sharpness else float(self.sharpness)
        if programs is None:
            programs = self._kept("conv", lambda: (memory.keys(), memory.s, memory.v))
        keys, s_values, v_values = programs
        mixing, usage = conv_read_mixing(queries, keys, sharpness, memory.slot_bias, s_values, v_values,
                                         want_usage=self.training, usage_weights=usage_weights, expand=expand)
        if self.training and not _recomputing():
            memory.update_usage(usage)
        return mixing

    def _rollout_constants(self) -> dict:
        """What a rollout call needs from the parameters, kept by :meth:`_kept` until a
        parameter changes: the programs, filters and bias; whether the kernels cover this
        layer's options (``covered``) and whether one op runs the whole call (``one_op``: the
        feed-forward composer); for that op the composer's rows, the unit keys and an empty
        table of the contexts met (see ``conv_layer_inference`` in ``csrc/fused_layer.cpp``)."""
        memory, head = self.memory, self.composer.head
        keys = memory.keys()
        covered = (self.fused and self.least_used == 0 and self.residual_weight is None
                   and _native_applies(memory.u_values, memory.v_values, memory.s_values, self.bias,
                                       memory.slot_bias))
        kept = {"programs": (keys, memory.s, memory.v), "filters": self._program_filters(),
                "bias": None if self.bias is None else self.bias.view(1, -1, 1), "dtype": memory.u_values.dtype,
                "covered": covered, "one_op": covered and isinstance(self.composer, FeedForwardComposer)}
        if kept["one_op"]:
            # The composer's query and (learned) sharpness rows: the only rows the op reads.
            weight, bias, Q = head.linear.weight, head.linear.bias, head.sizes[0]
            if head.learn_sharpness:
                start, end = sum(head.sizes[:2]), sum(head.sizes[:3])
                weight, bias = torch.cat([weight[:Q], weight[start:end]]), torch.cat([bias[:Q], bias[start:end]])
            else:
                weight, bias = weight[:Q], bias[:Q]
            # The table of contexts met: as many as fit in ~16 MB of mixing matrices (at least
            # 256), at most _REMEMBERED_CONTEXTS; twice as many hash slots, a power of two.
            dtype, P = memory.u_values.dtype, self.num_programs
            per_context = self.out_channels * P * memory.u_values.element_size()
            capacity = min(_REMEMBERED_CONTEXTS, max((16 << 20) // per_context, 256))
            kept.update(head_weight=weight.contiguous(), head_bias=bias.contiguous(),
                        unit_keys=(keys / torch.linalg.vector_norm(keys, dim=2, keepdim=True).clamp_min(_EPS))
                        .contiguous(),
                        fixed_sharpness=None if head.learn_sharpness else float(self.sharpness),
                        slots=torch.full((1 << (2 * capacity - 1).bit_length(),), -1, dtype=torch.int64),
                        rows=torch.empty(capacity, self.context_features, dtype=dtype),
                        mixings=torch.empty(capacity, self.out_channels, P, dtype=dtype),
                        counts=torch.zeros(3, dtype=torch.int64),
                        padding=(0, 0) if isinstance(self.padding, str) else self.padding,
                        padding_mode=self.padding if isinstance(self.padding, str) else "")
        return kept

    def _rollout_call(self, x, context) -> torch.Tensor | None:
        """(B, C_in, H, W) -> (B, C_out, H', W') for a no-grad, eval-mode CPU call inside
        :func:`reuse_programs` that the kernels cover (an agent's rollout: many small calls
        between two parameter updates); None for any other call, which the general path runs
        (and checks). Checks little on purpose: a rollout's calls are many and each is short.

        What depends on parameters only is computed once. With the feed-forward composer the
        call is one C++ op, ``conv_layer_inference``, which also remembers each context's mixing
        matrix (looked up by the context's bits) until a parameter changes: an agent meets the
        same MinAtar contexts again and again (in Seaquest ~4 of a step's 32 are new)."""
        if (self.training or torch.is_grad_enabled() or self._trace_sink is not None
                or not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] == 0
                or torch.compiler.is_compiling()):
            return None
        kept = self._kept("rollout", self._rollout_constants)
        if (not kept["covered"] or x.dtype != kept["dtype"] or x.device.type != "cpu"
                or x.shape[1] != self.in_channels or _autocast_enabled("cpu") or _under_functorch(x)):
            return None
        if context is not None and not (isinstance(context, torch.Tensor) and context.dtype == x.dtype
                                        and context.device == x.device
                                        and context.shape == (x.shape[0], self.context_features)):
            return None
        if kept["one_op"]:
            return _native.ops().conv_layer_inference(
                x, context, kept["slots"], kept["rows"], kept["mixings"], kept["counts"], kept["head_weight"],
                kept["head_bias"], kept["unit_keys"], self.memory.slot_bias, kept["programs"][1],
                kept["programs"][2], kept["filters"], self.bias, self.stride, kept["padding"],
                kept["padding_mode"], self.dilation, self.steps * self.rank, kept["fixed_sharpness"])
        mixing = self._read_mixing(self._pooled(x) if context is None else context, programs=kept["programs"])
        return self._apply_mixing(x, mixing, kept["filters"], kept["bias"])

    def _apply_mixing(self, x: torch.Tensor, mixing: torch.Tensor, filters: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
        """x (B, C_in, H, W), mixing (B, C_out, P), filters (P, C_in, kh, kw), bias (1, C_out, 1)
        or None -> (B, C_out, H', W'): the responses to the P program filters, each sample's
        mixed by its matrix in one batched product."""
        responses = self._conv(x, filters)                                         # (B, P, H', W')
        B, P, H, W = responses.shape
        flat = responses.reshape(B, P, H * W)
        y = torch.bmm(mixing, flat) if bias is None else torch.baddbmm(bias, mixing, flat)
        return y.view(B, self.out_channels, H, W)

    def _native_forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, H', W'): the read through
        :func:`~neurocoder.fused.conv_read_mixing`, then one batched product."""
        if (getattr(self, "dedupe_contexts", True) and not ctx.requires_grad
                and ctx.shape[0] >= _DEDUPE_MIN_BATCH):
            # A read depends on its context alone: identical contexts are read once. Only for
            # contexts without a gradient (the layer's input is data), where sharing the read
            # changes no value and no gradient; only for batches large enough that the reads
            # saved outweigh finding them; and only when it saves at least half the reads.
            unique, inverse, counts = _unique_rows(ctx)
            if 2 * unique.shape[0] <= ctx.shape[0]:
                mixing = self._read_mixing(unique, counts, expand=inverse)            # (B, C_out, P)
            else:
                mixing = self._read_mixing(ctx)
        else:
            mixing = self._read_mixing(ctx)
        return self._apply_mixing(x, mixing, self._program_filters(),
                                  None if self.bias is None else self.bias.view(1, -1, 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, return_trace: bool = False):
        if isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[0] == self.in_channels:
            # Unbatched, as nn.Conv2d accepts it: a batch of one (the trace keeps that batch axis).
            out = self.forward(x.unsqueeze(0), None if context is None else context.unsqueeze(0), return_trace)
            return (out[0].squeeze(0), out[1]) if return_trace else out.squeeze(0)
        if self.__dict__.get("_reused") is not None and not return_trace:
            y = self._rollout_call(x, context)
            if y is not None:
                return y
        ctx = self._inputs(x, context)
        if self._can_run_native(x, return_trace):
            return self._native_forward(x, ctx)
        sigma, weights, plan, attention, usage = self.read(ctx)
        responses = self._conv(x, self._program_filters())                         # (B, P, H', W')
        B, P, H, W = responses.shape
        dtype = responses.dtype
        scaled_u = (weights[0] * sigma.unsqueeze(-1)).to(dtype)                   # (B, R, P)
        read_v = weights[1].to(dtype) @ self.memory.v.to(dtype)                   # (B, R, C_out)
        mixing = torch.bmm(read_v.transpose(1, 2), scaled_u)                       # (B, C_out, P)
        y = torch.bmm(mixing, responses.reshape(B, P, H * W)).reshape(B, self.out_channels, H, W)
        if self.residual_weight is not None:
            scale = self._residual_scale(sigma, plan).to(dtype)
            y = y + scale[:, None, None, None] * self._conv(x, self.residual_weight)
        if self.bias is not None:
            y = y + self.bias.to(dtype)[None, :, None, None]
        return self._finish(y, (sigma, weights, plan, attention, usage), return_trace)

    def compose_weight(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample filters (B, out_channels, in_channels, kh, kw), working program included.
        For analysis and tests."""
        ctx = self._inputs(x, context)
        sigma, weights, plan, _, _ = self.read(ctx)
        u = weights[0] @ self.memory.u                                             # (B, R, C_in*kh*kw)
        v = weights[1] @ self.memory.v                                             # (B, R, C_out)
        filters = torch.einsum("br,bri,bro->boi", sigma, u, v)
        filters = filters.reshape(x.shape[0], self.out_channels, self.in_channels, *self.kernel_size)
        if self.residual_weight is not None:
            filters = filters + self._residual_scale(sigma, plan)[:, None, None, None, None] * self.residual_weight
        return filters

    def forward_explicit(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Same output as ``forward`` by building each sample's filters and running a grouped
        convolution. For tests and benchmarks."""
        filters = self.compose_weight(x, context)
        B = x.shape[0]
        grouped = F.conv2d(x.reshape(1, B * self.in_channels, *x.shape[2:]),
                           filters.reshape(B * self.out_channels, self.in_channels, *self.kernel_size),
                           None, self.stride, self.padding, self.dilation, groups=B)
        y = grouped.reshape(B, self.out_channels, *grouped.shape[2:])
        if self.bias is not None:
            y = y + self.bias[None, :, None, None]
        return y


# Smallest batch whose identical contexts NeurocoderConv2d reads once: below it finding them
# costs about what it saves (32 observations: ~0.04 ms to find them, ~0.09 ms for the whole read).
_DEDUPE_MIN_BATCH = 128
# How many contexts' mixing matrices a NeurocoderConv2d keeps inside reuse_programs before it
# starts over (each C_out x P numbers: 16 KB at 64 x 64).
_REMEMBERED_CONTEXTS = 4096


class _PixelMeans(torch.autograd.Function):
    """x (B, C, H, W) -> (B, C), x averaged over its pixels by the C++ loop ``pixel_means``; the
    gradient spreads evenly over the pixels, as the mean's does."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return _native.ops().pixel_means(x)

    @staticmethod
    def backward(ctx, grad):
        B, C, H, W = ctx.shape
        return (grad / (H * W))[:, :, None, None].expand(B, C, H, W)


def _unique_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distinct rows of a (B, C) float tensor, in order of first appearance.

    With the C++ kernels (CPU), ``unique_rows``: rows match by their exact bits (0.0 and -0.0
    differ, two NaN rows with the same bits match), found through a hash table in one pass (on a
    CPU ``torch.unique(dim=0)`` compares rows a pair at a time: ~2 ms for 512 contexts). Without
    them, ``torch.unique(dim=0)``, which compares values and sorts.

    Returns:
        unique (U, C), inverse (B,) the index of each row's unique row, counts (U,) how many
        rows each unique row stands for.
    """
    ops = _native.ops() if rows.device.type == "cpu" else None
    if ops is not None:
        unique, inverse, counts = ops.unique_rows(rows)
        return unique, inverse, counts
    return torch.unique(rows, dim=0, return_inverse=True, return_counts=True)


def _reused_watch(layer: nn.Module) -> list[torch.Tensor]:
    """The tensors whose changes make :func:`reuse_programs`' kept tensors stale.

    Every parameter and buffer except the running usage average: a training-mode call updates
    it in place on every forward (a rollout run without ``model.eval()``), and the kept keys and
    joined weight do not depend on it, so watching it would recompute them on every call.
    """
    usage = {id(m.usage_average) for m in layer.modules() if isinstance(m, ProgramMemory)}
    return list(layer.parameters()) + [b for b in layer.buffers() if id(b) not in usage]


@contextlib.contextmanager
def reuse_programs(model: nn.Module):
    """Within this block, no-grad forward passes of ``model``'s Neurocoder layers compute what
    depends only on parameters (the keys, the programs as read, and the feed-forward composer's
    weight joined with the U programs) once, and reuse it.

    For many small no-grad calls between two parameter updates, such as an agent's rollout::

        with torch.no_grad(), neurocoder.reuse_programs(agent):
            for t in range(steps):
                logits, value = agent(observations)

    Changing parameters inside the block is safe but undoes the saving: in-place updates (an
    optimiser step, ``load_state_dict``, ``memory.freeze``) bump the tensors' version counters and
    the layer computes the kept tensors again. Calls with gradients enabled are unaffected.
    Leaving the block drops what was kept. Blocks may nest; the outer one owns the reuse.
    """
    layers = [m for m in model.modules() if isinstance(m, NeurocoderLayer) and getattr(m, "_reused", None) is None]
    for layer in layers:
        layer._reused = {"watch": _reused_watch(layer)}
    try:
        yield model
    finally:
        for layer in layers:
            layer._reused = None
