"""Traces: what a Neurocoder layer read for each input, and summaries over a data set.

``y, trace = layer(x, return_trace=True)`` gives a :class:`Trace`. To collect traces from
layers deep inside a model, use :func:`record`; :func:`usage_by_label` turns them into
slot-usage-by-label matrices over a data loader.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
import torch.nn as nn

__all__ = ["Trace", "record", "usage_by_label", "attention_entropy"]

BANK_NAMES = ("u", "v", "s")


@dataclass
class Trace:
    """What one forward pass read. N is the number of compositions: the batch size (for an
    input of shape (..., in_features), the product of the leading dimensions).

    Attributes:
        sigma: (N, R) singular values, descending, R = steps x rank.
        read_weights: bank -> (N, steps, rank, P) final read weights (rows sum to 1).
        attention: bank -> (N, steps, rank, P) content attention before least-used mixing.
        gates: bank -> (N, steps, rank) least-used gates, or None when least-used is off.
        sharpness: (N, 3, R) the attention sharpness per bank and component (a fixed
            sharpness is broadcast).
        usage: bank -> (N, P) largest weight each slot received within the composition.
        residual_gate: (N,) gate of the working program, or None.
    """

    sigma: torch.Tensor
    read_weights: dict[str, torch.Tensor]
    attention: dict[str, torch.Tensor]
    gates: dict[str, torch.Tensor] | None
    sharpness: torch.Tensor
    usage: dict[str, torch.Tensor]
    residual_gate: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    @property
    def num_programs(self) -> int:
        return self.read_weights["u"].shape[-1]

    def detach(self) -> "Trace":
        """A copy with every tensor detached (safe to keep across steps)."""
        def d(value):
            if isinstance(value, torch.Tensor):
                return value.detach()
            if isinstance(value, dict):
                return {k: d(v) for k, v in value.items()}
            return value
        return Trace(**{name: d(getattr(self, name)) for name in self.__dataclass_fields__})

    def slot_usage(self, bank: str = "u") -> torch.Tensor:
        """(N, P): mean read weight per slot over all components of one bank."""
        return self.read_weights[bank].flatten(1, 2).mean(dim=1)


def attention_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of read weights over the last axis; log(P) is a flat read."""
    return -(weights * weights.clamp_min(1e-12).log()).sum(dim=-1)


def _neurocoder_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    from .layers import NeurocoderLayer

    for name, module in model.named_modules():
        if isinstance(module, NeurocoderLayer):
            yield name, module


@contextlib.contextmanager
def record(model: nn.Module, detach: bool = True):
    """Within this block every Neurocoder layer of ``model`` keeps the trace of each forward.

    Yields a dict that maps layer names to lists of traces, in call order::

        with neurocoder.trace.record(model) as traces:
            model(x)
        traces["fc1"][-1].sigma
    """
    layers = dict(_neurocoder_layers(model))
    if not layers:
        raise ValueError(f"record: {type(model).__name__} holds no Neurocoder layer; "
                         f"convert one first with neurocoder.convert(model, targets=[...])")
    collected: dict[str, list[Trace]] = {name: [] for name in layers}
    for name, layer in layers.items():
        layer._trace_sink = (collected[name], detach)
    try:
        yield collected
    finally:
        for layer in layers.values():
            layer._trace_sink = None


def _label_indices(labels, num_labels: int) -> torch.Tensor:
    """A batch's labels as int64 indices on the CPU, or a ValueError naming the first bad one."""
    labels = torch.as_tensor(labels).cpu().flatten()
    if labels.is_floating_point() and not torch.equal(labels, labels.round()):
        bad = labels[labels != labels.round()][0].item()
        raise ValueError(f"usage_by_label: labels must be whole numbers (class indices), got {bad}")
    labels = labels.long()
    outside = (labels < 0) | (labels >= num_labels)
    if outside.any():
        raise ValueError(f"usage_by_label: label {labels[outside][0].item()} lies outside [0, {num_labels}); "
                         f"pass num_labels larger than the largest label")
    return labels


@torch.no_grad()
def usage_by_label(model: nn.Module, batches: Iterable, num_labels: int, bank: str = "u",
                   device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Mean read weight of every slot, per label, for each Neurocoder layer of ``model``.

    Args:
        model: any model holding Neurocoder layers.
        batches: an iterable of (inputs, labels) pairs, e.g. a DataLoader.
        num_labels: number of distinct labels (labels are integers in [0, num_labels)).
        bank: which bank's read weights to summarise: 'u', 'v' or 's'.

    Returns:
        layer name -> (num_labels, P) matrix; row c is the average over inputs of label c of the
        mean read weight per slot. Rows of labels never seen are zero.
    """
    if bank not in BANK_NAMES:
        raise ValueError(f"usage_by_label: bank must be one of {BANK_NAMES}, got {bank!r}")
    if not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"usage_by_label: num_labels must be an integer >= 1, got {num_labels!r}")
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    counts = torch.zeros(num_labels)
    try:
        with record(model) as traces:
            for inputs, labels in batches:
                if device is not None:
                    inputs = inputs.to(device)
                labels = _label_indices(labels, num_labels)
                for name in traces:
                    traces[name].clear()
                model(inputs)
                counts += torch.bincount(labels, minlength=num_labels)[:num_labels].float()
                for name, layer_traces in traces.items():
                    for trace in layer_traces:
                        usage = trace.slot_usage(bank).float().cpu()
                        if usage.shape[0] != labels.shape[0]:
                            raise ValueError(
                                f"usage_by_label: layer {name!r} composed {usage.shape[0]} programs for "
                                f"a batch of {labels.shape[0]} labels; it needs one composition per "
                                f"labelled input (a layer applied per position cannot be summarised by label)")
                        total = sums.setdefault(name, torch.zeros(num_labels, usage.shape[1]))
                        total.index_add_(0, labels, usage)
    finally:
        model.train(was_training)
    return {name: total / counts.clamp_min(1).unsqueeze(1) for name, total in sums.items()}
