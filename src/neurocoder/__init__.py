"""Neurocoder: neural layers that compose their weight per input from a memory of stored
program pieces (Le & Venkatesh, ICML 2022).

    import neurocoder
    layer = neurocoder.NeurocoderLinear(784, 256, num_programs=32, rank=8)
    model = neurocoder.convert(model, targets=["classifier"], init="svd")
    loss = task_loss + neurocoder.regularization(model)
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import presets, trace
from ._version import __version__
from .baselines import MoELinear, NSMLinear, load_balancing_loss
from .composer import ComposerOutput, FeedForwardComposer, RecurrentComposer
from .convert import convert, seed_from_weight
from .layers import NeurocoderConv2d, NeurocoderLayer, NeurocoderLinear, reuse_programs, singular_values
from .memory import ProgramMemory
from .trace import Trace, record, usage_by_label

__all__ = [
    "__version__", "ProgramMemory", "FeedForwardComposer", "RecurrentComposer", "ComposerOutput",
    "NeurocoderLayer", "NeurocoderLinear", "NeurocoderConv2d", "singular_values", "convert",
    "seed_from_weight", "regularization", "neurocoder_layers", "NSMLinear", "MoELinear",
    "load_balancing_loss", "Trace", "record", "usage_by_label", "presets", "trace", "reuse_programs",
]


def neurocoder_layers(model: nn.Module) -> list[tuple[str, NeurocoderLayer]]:
    """(name, layer) for every Neurocoder layer of ``model`` (the model itself included)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, NeurocoderLayer)]


def regularization(model: nn.Module, weight: float = 1.0) -> torch.Tensor:
    """``weight`` times the orthogonality loss summed over every Neurocoder layer of ``model``.

    Returns a scalar tensor on the model's device (zero when the model has no Neurocoder layer).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"regularization: expected an nn.Module (the model holding Neurocoder layers), "
                        f"got {type(model).__name__}")
    layers = neurocoder_layers(model)
    if not layers:
        reference = next(model.parameters(), None)
        return torch.zeros((), device=None if reference is None else reference.device)
    return weight * torch.stack([layer.orthogonality_loss() for _, layer in layers]).sum()
