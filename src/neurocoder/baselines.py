"""Baseline layers with the same constructor style as NeurocoderLinear, for the experiments.

* :class:`NSMLinear` - Neural Stored-program Memory (Le, Tran & Venkatesh, ICLR 2020): a memory
  of whole weight matrices, mixed per input by key attention. Its programs are big: each one
  is a full d_in x d_out matrix.
* :class:`MoELinear` - sparsely-gated mixture of experts (Shazeer et al., 2017): noisy top-k
  gating over expert linear maps, with a load-balancing loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import check_positive_int
from .reading import content_attention

__all__ = ["NSMLinear", "MoELinear", "load_balancing_loss"]


def _check(owner: str, **values) -> None:
    for name, value in values.items():
        check_positive_int(owner, name, value)


def _check_input(owner: str, x: torch.Tensor, features: int, reference: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{owner}: input must be a floating-point tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 1 or x.shape[-1] != features:
        raise ValueError(f"{owner}: expected input of shape (..., {features}), got {tuple(x.shape)}")
    if x.device != reference.device:
        raise ValueError(f"{owner}: input is on {x.device} but the layer's parameters are on {reference.device}")


def _context(owner: str, flat: torch.Tensor, context: torch.Tensor | None, features: int | None) -> torch.Tensor:
    """The (B, features) context a query or gate reads: the input itself, or a separate context."""
    if context is None:
        if features is not None:
            raise ValueError(f"{owner}: built with context_features={features}; pass forward(x, context)")
        return flat
    if features is None:
        raise ValueError(f"{owner}: got a context but was built without context_features; build it with "
                         f"context_features={context.shape[-1]}")
    if context.shape[-1] != features:
        raise ValueError(f"{owner}: context must have {features} features in its last dimension, got shape "
                         f"{tuple(context.shape)}")
    context = context.reshape(-1, features)
    if context.shape[0] != flat.shape[0]:
        raise ValueError(f"{owner}: context holds {context.shape[0]} rows but the input {flat.shape[0]}")
    return context.to(flat.dtype)


class NSMLinear(nn.Module):
    """A linear layer whose weight is a key-attention mixture of P whole stored matrices.

    ``y = x (sum_p a_p(x) W_p) + b`` with ``a(x) = softmax(sharpness * cos(q(x), K))``.

    Args:
        in_features, out_features: as nn.Linear.
        num_programs: P, stored matrices.
        key_dim: k.
        sharpness: fixed attention sharpness (> 0).
        bias: learned bias.
        context_features: size of a separate context the query reads (``forward(x, context)``);
            None: the query reads the input, as NeurocoderLinear's composer does by default.

    Shapes: x (..., in_features), context (..., context_features) -> (..., out_features). Cost O(B P d_in d_out): every stored
    program is applied, then mixed (cheaper than building a per-sample matrix when P < B).
    """

    def __init__(self, in_features: int, out_features: int, num_programs: int = 4, key_dim: int = 8,
                 sharpness: float = 1.0, bias: bool = True, context_features: int | None = None, device=None,
                 dtype=None) -> None:
        super().__init__()
        owner = f"NSMLinear(in_features={in_features}, out_features={out_features})"
        _check(owner, in_features=in_features, out_features=out_features, num_programs=num_programs,
               key_dim=key_dim)
        if not sharpness > 0:
            raise ValueError(f"{owner}: sharpness must be > 0, got {sharpness!r}")
        factory = {"device": device, "dtype": dtype}
        self._label = owner
        self.in_features, self.out_features = in_features, out_features
        self.num_programs, self.key_dim, self.sharpness = num_programs, key_dim, float(sharpness)
        self.programs = nn.Parameter(torch.empty(num_programs, in_features, out_features, **factory))
        self.keys = nn.Parameter(torch.empty(num_programs, key_dim, **factory))
        self.context_features = context_features
        self.query = nn.Linear(context_features or in_features, key_dim, **factory)
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.programs, -bound, bound)
        nn.init.normal_(self.keys)
        self.query.reset_parameters()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_programs={self.num_programs}, key_dim={self.key_dim}, sharpness={self.sharpness}, "
                f"bias={self.bias is not None}")

    def attention(self, flat: torch.Tensor) -> torch.Tensor:
        """(B, in_features) -> (B, P) program weights."""
        q = self.query(flat)[None, :, None, :]                                     # (1, B, 1, k)
        return content_attention(q, self.keys[None], self.sharpness)[0, :, 0]

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, return_attention: bool = False):
        _check_input(self._label, x, self.in_features, self.programs)
        flat = x.reshape(-1, self.in_features)
        weights = self.attention(_context(self._label, flat, context, self.context_features))
        every = (flat @ self.programs.permute(1, 0, 2).reshape(self.in_features, -1))
        every = every.view(-1, self.num_programs, self.out_features)              # (B, P, d_out)
        y = torch.einsum("bp,bpo->bo", weights, every)
        if self.bias is not None:
            y = y + self.bias
        y = y.reshape(*x.shape[:-1], self.out_features)
        return (y, weights) if return_attention else y


class MoELinear(nn.Module):
    """Sparsely-gated mixture of linear experts with noisy top-k gating.

    ``y = sum_{e in topk(x)} g_e(x) (x W_e + b_e)``. During training the gate logits get
    learned, input-dependent Gaussian noise (Shazeer et al. 2017). After each forward,
    :attr:`balance_loss` holds the load-balancing loss ``E * sum_e f_e p_e`` (f_e the fraction
    of inputs routed to expert e, p_e its mean gate probability; 1 when perfectly balanced),
    collected for a whole model by :func:`load_balancing_loss`.

    Args:
        in_features, out_features: as nn.Linear.
        num_experts: E.
        top_k: experts used per input (1 <= top_k <= E).
        noisy_gating: add the learned noise to the gate logits while training.
        bias: experts have biases.
        context_features: size of a separate context the gate reads (``forward(x, context)``);
            None: the gate reads the input.
        dispatch: how inputs reach their experts. ``'sparse'``: each expert multiplies only the
            rows routed to it (top-k / E of the dense FLOPs, but a host synchronisation per
            expert); ``'dense'``: every expert multiplies every row and the zero gates drop the
            rest (E / top-k times the FLOPs, no synchronisation); ``'auto'`` (default): dense on
            GPUs, where the synchronisations cost more than the FLOPs, sparse elsewhere. The
            output and gradients are the same either way.

    Shapes: x (..., in_features) -> (..., out_features).
    """

    def __init__(self, in_features: int, out_features: int, num_experts: int = 4, top_k: int = 2,
                 noisy_gating: bool = True, bias: bool = True, context_features: int | None = None,
                 dispatch: str = "auto", device=None, dtype=None) -> None:
        super().__init__()
        owner = f"MoELinear(in_features={in_features}, out_features={out_features})"
        _check(owner, in_features=in_features, out_features=out_features, num_experts=num_experts, top_k=top_k)
        if top_k > num_experts:
            raise ValueError(f"{owner}: top_k={top_k} exceeds num_experts={num_experts}")
        if dispatch not in ("auto", "sparse", "dense"):
            raise ValueError(f"{owner}: dispatch must be 'auto', 'sparse' or 'dense', got {dispatch!r}")
        self.dispatch = dispatch
        factory = {"device": device, "dtype": dtype}
        self._label = owner
        self.in_features, self.out_features = in_features, out_features
        self.num_experts, self.top_k, self.noisy_gating = num_experts, top_k, noisy_gating
        self.experts = nn.Parameter(torch.empty(num_experts, in_features, out_features, **factory))
        self.expert_bias = nn.Parameter(torch.zeros(num_experts, out_features, **factory)) if bias else None
        self.context_features = context_features
        self.gate = nn.Linear(context_features or in_features, num_experts, bias=False, **factory)
        self.noise = nn.Linear(context_features or in_features, num_experts, bias=False, **factory)
        self.balance_loss = torch.zeros(())
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.experts, -bound, bound)
        nn.init.zeros_(self.gate.weight)   # as Shazeer et al.: start with balanced routing
        nn.init.zeros_(self.noise.weight)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_experts={self.num_experts}, top_k={self.top_k}, noisy_gating={self.noisy_gating}")

    def gates(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, in) -> sparse gates (B, E) that sum to 1 over the top-k, and dense probabilities."""
        logits = self.gate(flat)
        if self.training and self.noisy_gating:
            logits = logits + torch.randn_like(logits) * F.softplus(self.noise(flat))
        top_values, top_index = logits.topk(self.top_k, dim=-1)
        sparse = torch.zeros_like(logits).scatter(-1, top_index, torch.softmax(top_values, dim=-1))
        return sparse, torch.softmax(logits, dim=-1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, return_gates: bool = False):
        _check_input(self._label, x, self.in_features, self.experts)
        flat = x.reshape(-1, self.in_features)
        sparse, dense = self.gates(_context(self._label, flat, context, self.context_features))
        routed = sparse > 0
        # An empty batch goes the dense way too: its (0, out) output then stays part of the graph.
        dense_dispatch = (self.dispatch == "dense" or (self.dispatch == "auto" and flat.device.type != "cpu")
                          or flat.shape[0] == 0)
        if dense_dispatch:
            every = torch.einsum("bi,eio->beo", flat, self.experts)                 # (B, E, out)
            if self.expert_bias is not None:
                every = every + self.expert_bias
            y = torch.einsum("beo,be->bo", every, sparse.to(every.dtype))
        else:
            y = self._sparse_dispatch(flat, sparse, routed)
        if flat.shape[0]:
            fraction = routed.float().mean(dim=0) / self.top_k
            self.balance_loss = self.num_experts * (fraction * dense.mean(dim=0)).sum()
        else:                       # nothing routed, nothing unbalanced (a mean over no rows is NaN)
            self.balance_loss = dense.sum()
        y = y.reshape(*x.shape[:-1], self.out_features)
        return (y, sparse) if return_gates else y

    def _sparse_dispatch(self, flat: torch.Tensor, sparse: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        y = flat.new_zeros(flat.shape[0], self.out_features)
        for e in range(self.num_experts):
            rows = routed[:, e].nonzero().squeeze(-1)
            if rows.numel() == 0:
                continue
            out = flat[rows] @ self.experts[e]
            if self.expert_bias is not None:
                out = out + self.expert_bias[e]
            y = y.index_add(0, rows, out * sparse[rows, e, None])
        return y


def load_balancing_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the last forward's balance losses over every MoELinear of ``model``."""
    losses = [m.balance_loss for m in model.modules() if isinstance(m, MoELinear)]
    if not losses:
        return torch.zeros(())
    return torch.stack([loss.to(losses[0].device) for loss in losses]).sum()
