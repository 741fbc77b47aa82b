"""Composers: from a context to the queries, sharpness and gates that read a program memory.

Both composers return a :class:`ComposerOutput`. The feed-forward composer reads once
(T = 1) with one linear map; the recurrent composer runs an LSTM cell for T steps on the same
context, from a learned initial state, and reads ``rank`` components per bank at every step,
so a layer's rank is R = T * rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ComposerOutput", "FeedForwardComposer", "RecurrentComposer", "COMPOSERS", "LEARNED_SHARPNESS_INIT"]

COMPOSERS = ("feedforward", "recurrent")
NUM_BANKS = 3
# Where a learned sharpness starts: sharp enough that reads are not flat averages of every slot.
LEARNED_SHARPNESS_INIT = 5.0


@dataclass
class ComposerOutput:
    """What a composer produces for a batch of contexts (B, R = steps x rank, k = key_dim).

    Attributes:
        queries: (3, B, R, k), banks U, V, S first.
        sharpness: (3, B, R, 1) when learned, else the fixed float.
        gates: (3, B, R) least-used interpolating gates in (0, 1), or None when least-used
            reading is off.
        residual_gate: (B,) in (0, 1), or None without a residual (working) program.
    """

    queries: torch.Tensor
    sharpness: torch.Tensor | float
    gates: torch.Tensor | None
    residual_gate: torch.Tensor | None


class _Head(nn.Module):
    """Splits one flat vector per step into queries, gates, sharpness and residual gate."""

    def __init__(self, in_features: int, key_dim: int, rank: int, sharpness: float | str,
                 least_used: bool, residual: bool, factory: dict) -> None:
        super().__init__()
        self.key_dim, self.rank = key_dim, rank
        self.learn_sharpness = sharpness == "learned"
        self.fixed_sharpness = None if self.learn_sharpness else float(sharpness)
        self.least_used, self.residual = least_used, residual
        per_bank = rank
        self.sizes = [NUM_BANKS * rank * key_dim,
                      NUM_BANKS * per_bank if least_used else 0,
                      NUM_BANKS * per_bank if self.learn_sharpness else 0,
                      1 if residual else 0]
        self.linear = nn.Linear(in_features, sum(self.sizes), **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # As the released code: Xavier weights, small normal biases.
        nn.init.xavier_uniform_(self.linear.weight)
        nn.init.normal_(self.linear.bias, std=0.01)
        if self.learn_sharpness:
            start = sum(self.sizes[:2])
            with torch.no_grad():
                inverse_softplus = math.log(math.expm1(LEARNED_SHARPNESS_INIT))
                self.linear.bias[start:start + self.sizes[2]].fill_(inverse_softplus)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """hidden: (B, S, in_features) -> raw parts, each (B, S, ...) with S steps."""
        return self.split(self.linear(hidden))

    def split(self, raw: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, S, out) raw output -> its parts: queries, gates, sharpness, residual gate."""
        return torch.split(raw, self.sizes, dim=-1)

    @property
    def extra_outputs(self) -> bool:
        """Whether the raw output holds anything besides the queries."""
        return any(self.sizes[1:])

    def assemble(self, parts: tuple[torch.Tensor, ...]) -> ComposerOutput:
        raw_queries, raw_gates, raw_sharpness, raw_residual = parts
        B, T = raw_queries.shape[:2]
        R = T * self.rank

        def banks_first(t: torch.Tensor, *tail: int) -> torch.Tensor:
            # (B, T, 3 * rank * tail) -> (3, B, T * rank, *tail), components in reading order.
            t = t.reshape(B, T, NUM_BANKS, self.rank, *tail).movedim(2, 0)
            return t.reshape(NUM_BANKS, B, R, *tail)

        queries = banks_first(raw_queries, self.key_dim)
        gates = torch.sigmoid(banks_first(raw_gates).contiguous()) if self.least_used else None
        if self.learn_sharpness:
            # contiguous first: elementwise maps of a permuted view run several times slower on a CPU
            sharpness = F.softplus(banks_first(raw_sharpness).contiguous()).unsqueeze(-1)
        else:
            sharpness = self.fixed_sharpness
        residual = torch.sigmoid(raw_residual[:, -1, 0]) if self.residual else None
        return ComposerOutput(queries, sharpness, gates, residual)


    def component_major_gates(self, raw_gates: torch.Tensor) -> torch.Tensor:
        """(B, T, 3 x rank) raw least-used gates -> (3 x R, B), contiguous: the C++ fused read's
        layout (row j x R + n). The same values as :meth:`assemble`'s gates, laid out component-major."""
        B, T = raw_gates.shape[:2]
        raw = raw_gates.reshape(B, T, NUM_BANKS, self.rank).permute(2, 1, 3, 0).contiguous()
        return torch.sigmoid(raw).view(NUM_BANKS * T * self.rank, B)

    def component_major_sharpness(self, raw_sharpness: torch.Tensor) -> torch.Tensor:
        """(B, T, 3 x rank) raw sharpness -> (3, 1, R, B), contiguous: the fused read's layout
        (:mod:`neurocoder.fused`). The same values as :meth:`assemble`'s, laid out component-major;
        made contiguous before the softplus, which is ~10x slower on a permuted view on a CPU."""
        B, T = raw_sharpness.shape[:2]
        raw = raw_sharpness.reshape(B, T, NUM_BANKS, self.rank).permute(2, 1, 3, 0).contiguous()
        return F.softplus(raw).view(NUM_BANKS, 1, T * self.rank, B)


class FeedForwardComposer(nn.Module):
    """One linear map of the context gives every query and gate (T = 1).

    Args:
        context_features: size of the context c.
        key_dim: k.
        rank: r, components per bank.
        sharpness: a fixed float > 0, or ``'learned'`` (softplus of the composer's output).
        least_used: whether to produce least-used interpolating gates.
        residual: whether to produce the gate of the working program.
    """

    def __init__(self, context_features: int, key_dim: int, rank: int, sharpness: float | str = "learned",
                 least_used: bool = False, residual: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        self.steps = 1
        self.head = _Head(context_features, key_dim, rank, sharpness, least_used, residual,
                          {"device": device, "dtype": dtype})

    def forward(self, context: torch.Tensor) -> ComposerOutput:
        """context: (B, context_features)."""
        return self.head.assemble(self.head.split(self.raw(context)))

    def raw(self, context: torch.Tensor) -> torch.Tensor:
        """(B, context_features) -> (B, 1, out) the head's raw output, before splitting."""
        return self.head.linear(context.unsqueeze(1))


class RecurrentComposer(nn.Module):
    """An LSTM cell run ``steps`` times on the same context from a learned initial state.

    At each step its hidden state gives ``rank`` queries per bank (and the gates), so the
    layer composes ``steps * rank`` components. Arguments as :class:`FeedForwardComposer`,
    plus ``steps`` (T) and ``hidden_size`` (the LSTM's width).
    """

    def __init__(self, context_features: int, key_dim: int, rank: int, steps: int, hidden_size: int = 64,
                 sharpness: float | str = "learned", least_used: bool = False, residual: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.steps = steps
        self.cell = nn.LSTMCell(context_features, hidden_size, **factory)
        self.initial_hidden = nn.Parameter(torch.zeros(hidden_size, **factory))
        self.initial_cell = nn.Parameter(torch.zeros(hidden_size, **factory))
        self.head = _Head(hidden_size, key_dim, rank, sharpness, least_used, residual, factory)

    def forward(self, context: torch.Tensor) -> ComposerOutput:
        """context: (B, context_features)."""
        return self.head.assemble(self.head.split(self.raw(context)))

    def raw(self, context: torch.Tensor) -> torch.Tensor:
        """(B, context_features) -> (B, T, out) the head's raw output at every step."""
        B = context.shape[0]
        hidden = self.initial_hidden.expand(B, -1)
        cell = self.initial_cell.expand(B, -1)
        states = []
        # The context is the same at every step, so its part of the gates is computed once
        # (nn.LSTMCell would redo that context_features x 4H product T times). Gate order and
        # parameters are nn.LSTMCell's: input, forget, cell, output.
        from_context = F.linear(context, self.cell.weight_ih, self.cell.bias_ih)      # (B, 4H)
        for _ in range(self.steps):
            gates = from_context + F.linear(hidden, self.cell.weight_hh, self.cell.bias_hh)
            i, f, g, o = gates.chunk(4, dim=1)
            cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
            hidden = torch.sigmoid(o) * torch.tanh(cell)
            states.append(hidden)
        return self.head.linear(torch.stack(states, dim=1))
