"""What the Neurocoder layers of a trained classifier read, summarised for the report.

For each Neurocoder layer (applied once per sample; layers applied per position are skipped
only by ``usage_by_label``'s own check, and convolutions compose one filter bank per sample):

* ``usage_by_class``: (classes, P) mean read weight of each U slot per class;
* ``entropy``: mean entropy of the final U read weights, in nats, beside ``log P`` (a flat read);
* ``distinct_programs``: how many slots are the most-read slot (top-1 of the U read, summed over
  components) for at least 1% of the samples, and ``effective_programs``: exp of the entropy of
  the average usage (how many slots the layer spreads its reads over);
* ``weight_similarity``: for the last Neurocoder linear layer, the cosine similarity between
  the composed weights of 10 samples of each class (100 x 100), with the mean within-class and
  between-class similarity: composed weights that differ by input have a similarity below 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from neurocoder import NeurocoderLinear
from neurocoder.trace import attention_entropy, record, usage_by_label

__all__ = ["analyse_reads"]


@torch.no_grad()
def analyse_reads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                  batch_size: int = 500) -> dict:
    """Summaries of the reads of ``model`` on inputs ``x`` (N, ...) with labels ``y`` (N,)."""
    was_training = model.training
    model.eval()
    batches = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size)]
    usage = usage_by_label(model, batches, num_classes)
    layers: dict[str, dict] = {}
    entropy_sum: dict[str, float] = {}
    top_counts: dict[str, torch.Tensor] = {}
    with record(model) as traces:
        for inputs, _ in batches:
            for name in traces:
                traces[name].clear()
            model(inputs)
            for name, layer_traces in traces.items():
                for trace in layer_traces:
                    weights = trace.read_weights["u"]                         # (N, T, r, P)
                    entropy_sum[name] = entropy_sum.get(name, 0.0) + attention_entropy(weights).mean(dim=(1, 2)).sum().item()
                    top = trace.slot_usage("u").argmax(-1)                    # (N,)
                    counts = top_counts.setdefault(name, torch.zeros(weights.shape[-1]))
                    counts += torch.bincount(top, minlength=weights.shape[-1]).float()
    for name, matrix in usage.items():
        programs = matrix.shape[1]
        mean_usage = matrix.mean(0)
        mean_usage = mean_usage / mean_usage.sum()
        effective = math.exp(-(mean_usage * mean_usage.clamp_min(1e-12).log()).sum().item())
        counts = top_counts[name]
        layers[name] = {"usage_by_class": matrix, "num_programs": programs,
                        "entropy": entropy_sum[name] / len(y), "max_entropy": math.log(programs),
                        "distinct_programs": int((counts / counts.sum() >= 0.01).sum().item()),
                        "effective_programs": effective,
                        "top_slot_counts": counts}
    linear = [(n, m) for n, m in model.named_modules() if isinstance(m, NeurocoderLinear)]
    similarity = None
    if linear:
        name, layer = linear[-1]
        picked = torch.cat([(y == c).nonzero().squeeze(-1)[:10] for c in range(num_classes)])
        captured = []
        handle = layer.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            model(x[picked])
        finally:
            handle.remove()
        weights = layer.compose_weight(captured[0]).flatten(1)                # (M, d_in * d_out)
        unit = weights / weights.norm(dim=1, keepdim=True).clamp_min(1e-12)
        cosine = unit @ unit.T
        labels = y[picked]
        same = labels[:, None] == labels[None, :]
        off_diagonal = ~torch.eye(len(picked), dtype=torch.bool)
        similarity = {"layer": name, "labels": labels, "cosine": cosine,
                      "within_class": cosine[same & off_diagonal].mean().item(),
                      "between_class": cosine[~same].mean().item(),
                      "relative_spread": (weights - weights.mean(0)).norm(dim=1).mean().item()
                      / weights.mean(0).norm().clamp_min(1e-12).item()}
    model.train(was_training)
    return {"layers": layers, "weight_similarity": similarity}
