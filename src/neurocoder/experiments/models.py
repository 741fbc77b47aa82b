"""Models for the experiments: a plain backbone and its variants built from it.

Every variant starts from the same plain network; ``neurocoder.convert`` (or the baseline
replacement below) swaps its layers, so the variants differ only where they should.
"""

from __future__ import annotations

import torch
import torch.nn as nn

import neurocoder
from neurocoder import MoELinear, NSMLinear, presets

__all__ = ["MultiHeadMLP", "build_mlp", "MODEL_VARIANTS", "count_parameters"]

# The project's own continual-learning configuration: the released layers, plus freezing the
# programs each task read most (PROJECT_FREEZE_PROGRAMS slots per layer per task; a trainer
# option). See README (continual learning) for the measurements that chose it.
PROJECT_CONTINUAL = presets.layer_options("released")
PROJECT_FREEZE_PROGRAMS = 10

MODEL_VARIANTS = {
    "mlp": "plain MLP (hidden layers without bias, as in the protocol)",
    "neurocoder-released": "every linear layer a Neurocoder layer, the authors' released configuration",
    "neurocoder": "released layers + the 10 most-read programs per layer frozen after each task (project config)",
    "neurocoder-hidden": "released Neurocoder layers in the two hidden layers only; plain linear heads",
    "neurocoder-head": "released Neurocoder layers in the heads only (the paper's figure); plain hidden layers",
    "nsm": "hidden layers as NSM layers (4 whole stored matrices), width 96: comparable parameter count",
    "moe": "hidden layers as mixtures of 4 experts (top-2), width 96: comparable parameter count",
}


class MultiHeadMLP(nn.Module):
    """input -> hidden -> hidden -> one head per task (or one shared head).

    ``forward(x, heads=None)``: ``heads`` is None (head 0), an int, or an (N,) tensor of head
    indices (samples from several tasks in one batch, as rehearsal makes).
    """

    def __init__(self, input_size: int, hidden: int, num_heads: int, head_size: int, head_bias: bool = True) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(input_size, hidden, bias=False), nn.ReLU(),
                                  nn.Linear(hidden, hidden, bias=False), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(hidden, head_size, bias=head_bias) for _ in range(num_heads))

    def forward(self, x: torch.Tensor, heads: int | torch.Tensor | None = None) -> torch.Tensor:
        features = self.body(x)
        if heads is None or isinstance(heads, int):
            return self.heads[heads or 0](features)
        out = features.new_empty(features.shape[0], self.heads[0].out_features)
        for index in heads.unique().tolist():
            rows = (heads == index).nonzero().squeeze(-1)
            out = out.index_copy(0, rows, self.heads[index](features[rows]))
        return out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_mlp(variant: str, input_size: int, num_heads: int, head_size: int, hidden: int = 400,
              layer_options: dict | None = None) -> nn.Module:
    """Build one of :data:`MODEL_VARIANTS`. ``layer_options`` overrides Neurocoder options."""
    if variant not in MODEL_VARIANTS:
        raise ValueError(f"unknown model {variant!r}; choose one of {sorted(MODEL_VARIANTS)}")
    targets = {"neurocoder-hidden": ["body.0", "body.2"], "neurocoder-head": ["heads.*"]}.get(
        variant, ["body.0", "body.2", "heads.*"])
    if variant == "mlp":
        return MultiHeadMLP(input_size, hidden, num_heads, head_size)
    if variant.startswith("neurocoder"):
        options = dict(PROJECT_CONTINUAL) if variant == "neurocoder" else presets.layer_options("released")
        options.update(layer_options or {})
        # No layer of the released Neurocoder MLP applies a bias, the heads included; plain heads
        # (neurocoder-hidden) keep theirs, as the MLP's.
        model = MultiHeadMLP(input_size, hidden, num_heads, head_size, head_bias=variant == "neurocoder-hidden")
        return neurocoder.convert(model, targets, **options)
    width = 96
    model = MultiHeadMLP(input_size, width, num_heads, head_size)
    for index in (0, 2):
        old = model.body[index]
        if variant == "nsm":
            model.body[index] = NSMLinear(old.in_features, old.out_features, num_programs=4, bias=False)
        else:
            model.body[index] = MoELinear(old.in_features, old.out_features, num_experts=4, top_k=2, bias=False)
    return model
