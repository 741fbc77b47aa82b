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
    "seed_from_weight", "regularization", "neurocoder_layers", "routing_parameters", "NSMLinear", "MoELinear",
    "load_balancing_loss", "Trace", "record", "usage_by_label", "presets", "trace", "reuse_programs",
]


def neurocoder_layers(model: nn.Module) -> list[tuple[str, NeurocoderLayer]]:
    """(name, layer) for every Neurocoder layer of ``model`` (the model itself included)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, NeurocoderLayer)]


# Parts of a Neurocoder layer that decide what is read (the rest is what is read and applied:
# the stored programs' values, the working program, the bias).
_ROUTING_PARTS = ("composer.", "memory.u_keys", "memory.v_keys", "memory.s_keys", "memory.u_key_map.",
                  "memory.v_key_map.", "memory.slot_bias")


def routing_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) for every parameter of ``model``'s Neurocoder layers that decides what is
    read: the composer, the keys (learned keys, or the maps that compute content keys from the
    programs) and a grown memory's slot bias. The stored programs (U, V and S values), the working
    program and the bias are left out: they are what is read and applied.

    For two timescales, e.g. an optimiser group at a smaller learning rate for these: with learned
    keys everything that chooses a read is then slow; with content keys the keys still follow the
    programs they are computed from.
    """
    found = []
    for layer_name, layer in neurocoder_layers(model):
        prefix = f"{layer_name}." if layer_name else ""
        found += [(prefix + name, p) for name, p in layer.named_parameters() if name.startswith(_ROUTING_PARTS)]
    return found


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
