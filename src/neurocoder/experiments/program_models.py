"""Models for the synthetic program tasks, all of (about) the same parameter count.

Each model maps an input x (N, d_in), optionally with a separate context (N, c) such as a cue or
a history, to (N, d_out):

* ``nc-ff``: one NeurocoderLinear, feed-forward composer (the context drives the composer);
* ``nc-rnn``: one NeurocoderLinear, recurrent composer (2 steps);
* ``nsm``: one NSMLinear (stored whole matrices; the context drives the key query);
* ``moe``: one MoELinear (top-2 experts; the context drives the gate);
* ``mlp``: [x, context] -> hidden (ReLU) -> d_out, the hidden width chosen so its parameter
  count is closest to ``nc-ff``'s.

``reads(x, context)`` gives each sample's read distribution over slots / stored matrices /
experts (N, S): the U-bank slot usage for Neurocoder, attention for NSM, gates for MoE; None
for the MLP, which has nothing to read.
"""

from __future__ import annotations

import torch
import torch.nn as nn

import neurocoder
from neurocoder import MoELinear, NeurocoderLinear, NSMLinear

__all__ = ["PROGRAM_MODELS", "ProgramModel", "build_program_model", "routing_parameters", "routing_maps",
           "parameter_groups"]

PROGRAM_MODELS = {
    "mlp": "MLP, one hidden layer sized to nc-ff's parameter count",
    "nsm": "NSM layer (stored whole matrices mixed by key attention)",
    "moe": "mixture of experts (top-2 of linear experts)",
    "nc-ff": "Neurocoder layer, feed-forward composer",
    "nc-rnn": "Neurocoder layer, recurrent composer (2 steps)",
}
NC_OPTIONS = dict(num_programs=16, rank=4, key_dim=8, key_mode="content", sharpness="learned")


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class ProgramModel(nn.Module):
    def __init__(self, kind: str, layer: nn.Module, uses_context: bool) -> None:
        super().__init__()
        self.kind, self.layer, self.uses_context = kind, layer, uses_context

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "mlp":
            return self.layer(x if context is None else torch.cat([x, context], dim=-1))
        return self.layer(x, context) if self.uses_context else self.layer(x)

    @torch.no_grad()
    def reads(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor | None:
        """(N, S) what each sample read: slot usage, NSM attention or MoE gates; None for the MLP."""
        ctx = context if self.uses_context else None
        if self.kind.startswith("nc"):
            _, trace = self.layer(x, ctx, return_trace=True)
            return trace.slot_usage("u")
        if self.kind == "nsm":
            return self.layer(x, ctx, return_attention=True)[1]
        if self.kind == "moe":
            return self.layer.gates(x if ctx is None else ctx)[1]
        return None


def build_program_model(kind: str, in_features: int, out_features: int, context_features: int | None = None,
                        nc_options: dict | None = None) -> ProgramModel:
    """One of :data:`PROGRAM_MODELS`; the baselines are sized to the ``nc-ff`` model's parameter count."""
    if kind not in PROGRAM_MODELS:
        raise ValueError(f"unknown model {kind!r}; choose one of {sorted(PROGRAM_MODELS)}")
    options = {**NC_OPTIONS, **(nc_options or {})}
    uses_context = context_features is not None
    reference = NeurocoderLinear(in_features, out_features, context_features=context_features, **options)
    target = _count(reference)
    if kind == "nc-ff":
        return ProgramModel(kind, reference, uses_context)
    if kind == "nc-rnn":
        # A small LSTM keeps the recurrent model near the feed-forward one's size.
        layer = NeurocoderLinear(in_features, out_features, context_features=context_features,
                                 **{**options, "composer": "recurrent", "steps": 2, "composer_hidden": 8})
        return ProgramModel(kind, layer, uses_context)
    if kind == "mlp":
        width_in = in_features + (context_features or 0)

        def make(hidden: int) -> nn.Module:
            return nn.Sequential(nn.Linear(width_in, hidden), nn.ReLU(), nn.Linear(hidden, out_features))

        hidden = min(range(4, 1025), key=lambda h: abs(_count(make(h)) - target))
        return ProgramModel(kind, make(hidden), uses_context)

    def baseline(n: int) -> nn.Module:
        if kind == "nsm":
            return NSMLinear(in_features, out_features, num_programs=n, context_features=context_features)
        return MoELinear(in_features, out_features, num_experts=n, top_k=2, context_features=context_features)

    n = min(range(2, 65), key=lambda n: abs(_count(baseline(n)) - target))
    return ProgramModel(kind, baseline(n), uses_context)


# The parameters that decide what is read, per model kind (name prefixes): NSM's query map and
# keys, MoE's gate (Neurocoder's composer and keys: neurocoder.routing_parameters). The MLP
# reads nothing; its hidden layer, whose units decide which features respond, stands in for the
# same split (a control: the MLP given the same two learning rates).
_ROUTING = {
    "nsm": ("layer.query.", "layer.keys"),
    "moe": ("layer.gate.", "layer.noise."),
    "mlp": ("layer.0.",),
}


def routing_parameters(model: ProgramModel) -> list[str]:
    """Names of the parameters that choose what is read (see ``_ROUTING``); the rest are the
    programs themselves (slot values, stored matrices, experts, the output layer) and biases."""
    if model.kind.startswith("nc"):
        return [name for name, _ in neurocoder.routing_parameters(model)]
    prefixes = _ROUTING[model.kind]
    return [name for name, _ in model.named_parameters() if name.startswith(prefixes)]


def routing_maps(model: ProgramModel) -> list[torch.Tensor]:
    """The weight matrices among :func:`routing_parameters` that map the input or context to the
    choice of read (Neurocoder's composer, NSM's query map, MoE's gate, the MLP's hidden layer as
    a control): the target of ``routing_l1``. Keys are left out: they name the slots, they do not
    map an input."""
    named = dict(model.named_parameters())
    return [named[name] for name in routing_parameters(model) if named[name].dim() >= 2 and "key" not in name]


def parameter_groups(model: ProgramModel, lr: float, routing_lr_scale: float = 1.0) -> list[dict]:
    """Optimiser parameter groups: everything at ``lr``, or, when ``routing_lr_scale`` != 1, the
    routing parameters at ``lr * routing_lr_scale`` (two timescales: what is read changes more
    slowly than what is stored)."""
    if routing_lr_scale == 1.0:
        return [{"params": list(model.parameters()), "lr": lr}]
    routing = set(routing_parameters(model))
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if n not in routing], "lr": lr},
            {"params": [p for n, p in named if n in routing], "lr": lr * routing_lr_scale}]


def regularization(model: ProgramModel) -> torch.Tensor:
    """The orthogonality loss of Neurocoder models plus MoE load balancing (0 for the others)."""
    loss = neurocoder.regularization(model)
    if model.kind == "moe":
        loss = loss + 0.01 * neurocoder.load_balancing_loss(model)
    return loss
