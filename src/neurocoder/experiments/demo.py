"""The demo: a plain MLP and its Neurocoder version on real Fashion-MNIST, side by side.

Both models are built from the same plain MLP; ``neurocoder.convert`` turns its two linear
layers into Neurocoder layers. The run folder keeps the config, seed, code version, data
source, per-epoch metrics, the results table and a heatmap of which programs each class read.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import neurocoder
from neurocoder.data import load_dataset
from neurocoder.progress import Progress
from neurocoder.runs import RunFolder
from neurocoder.trace import attention_entropy

FASHION_CLASSES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot")


@dataclass
class DemoConfig:
    dataset: str = "fashion-mnist"
    epochs: int = 3
    batch_size: int = 128
    lr: float = 1e-3
    hidden: int = 256
    preset: str = "default"
    orthogonality_weight: float = 1.0
    train_limit: int | None = None   # use only the first N training samples (smoke tests)
    seed: int = 0
    data_dir: str | None = None

    def check(self) -> None:
        """ValueError naming every setting out of range (before any data is read or folder made)."""
        problems = [f"{name}={getattr(self, name)} (must be >= 1)" for name in ("epochs", "batch_size", "hidden")
                    if getattr(self, name) < 1]
        if self.train_limit is not None and self.train_limit < 1:
            problems.append(f"train_limit={self.train_limit} (must be >= 1, or None for every image)")
        if not self.lr > 0:
            problems.append(f"lr={self.lr} (must be > 0)")
        if self.preset not in neurocoder.presets.PRESETS:
            problems.append(f"preset={self.preset!r} (choose {sorted(neurocoder.presets.PRESETS)})")
        if problems:
            raise ValueError("bad demo settings: " + "; ".join(problems))


def _mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def _prepare(images: torch.Tensor) -> torch.Tensor:
    # Scale to [0, 1] and standardise with Fashion-MNIST's customary mean and std.
    return (images.float() / 255.0 - 0.2860) / 0.3530


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += (model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum().item()
    return 100.0 * correct / len(x)


def _train(name: str, model: nn.Module, cfg: DemoConfig, x, y, x_test, y_test, run: RunFolder) -> dict:
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    generator = torch.Generator().manual_seed(cfg.seed)
    steps = (len(x) + cfg.batch_size - 1) // cfg.batch_size
    epoch_times = []
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        start = time.perf_counter()
        with Progress(steps, f"{name:<16} epoch {epoch + 1}/{cfg.epochs}") as bar:
            for i in range(0, len(x), cfg.batch_size):
                index = order[i:i + cfg.batch_size]
                loss = F.cross_entropy(model(x[index]), y[index])
                loss = loss + neurocoder.regularization(model, cfg.orthogonality_weight)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                bar.update(suffix=f"loss {loss.item():.3f}")
        epoch_times.append(time.perf_counter() - start)
        accuracy = _evaluate(model, x_test, y_test)
        run.log(model=name, epoch=epoch + 1, loss=loss.item(), test_accuracy=accuracy, seconds=epoch_times[-1])
        print(f"  {name:<16} epoch {epoch + 1}: test accuracy {accuracy:5.2f}%  ({epoch_times[-1]:.1f} s)")
    return {"test_accuracy": accuracy, "parameters": sum(p.numel() for p in model.parameters()),
            "seconds_per_epoch": sum(epoch_times) / len(epoch_times)}


def run_demo(cfg: DemoConfig, out: str | Path) -> dict:
    """Train both models, write the run folder, print the table and what the layers read."""
    cfg.check()
    torch.manual_seed(cfg.seed)
    data = load_dataset(cfg.dataset, data_dir=cfg.data_dir)
    x, y = _prepare(data.train_x), data.train_y
    if cfg.train_limit:
        x, y = x[:cfg.train_limit], y[:cfg.train_limit]
    x_test, y_test = _prepare(data.test_x), data.test_y
    run = RunFolder.create(out, {**asdict(cfg), "data": {**data.describe(), "train_samples_used": len(x)}},
                           seed=cfg.seed)
    print(f"data: {data.source}; {len(x)} training and {len(x_test)} test images")

    torch.manual_seed(cfg.seed)
    plain = _mlp(cfg.hidden)
    torch.manual_seed(cfg.seed)
    coded = neurocoder.convert(_mlp(cfg.hidden), targets=["1", "3"], **neurocoder.presets.layer_options(cfg.preset))
    rows = {"MLP": _train("MLP", plain, cfg, x, y, x_test, y_test, run),
            "Neurocoder MLP": _train("Neurocoder MLP", coded, cfg, x, y, x_test, y_test, run)}

    # What the Neurocoder layers read, per class, on the test set.
    batches = [(x_test[i:i + 1000], y_test[i:i + 1000]) for i in range(0, len(x_test), 1000)]
    usage = neurocoder.usage_by_label(coded, batches, num_labels=10, bank="u")
    with neurocoder.record(coded) as traces:
        coded.eval()
        with torch.no_grad():
            coded(x_test[:1000])
    reads = {}
    for name, layer_traces in traces.items():
        trace = layer_traces[0]
        P = trace.num_programs
        entropy = attention_entropy(trace.read_weights["u"]).mean().item()
        top_slots = trace.read_weights["u"].flatten(1, 2).argmax(-1)            # (N, R) most-read slot
        reads[name] = {"num_programs": P, "mean_attention_entropy_nats": entropy,
                       "flat_entropy_nats": float(torch.log(torch.tensor(float(P)))),
                       "distinct_top_slots": int(top_slots.unique().numel()),
                       "mean_sigma": trace.sigma.mean(0).tolist()}
    results = {"table": rows, "reads": reads, "usage_by_class": {k: v.tolist() for k, v in usage.items()},
               "data": data.describe()}
    run.write_results(results)
    labels = FASHION_CLASSES if cfg.dataset == "fashion-mnist" else [str(i) for i in range(10)]
    figure = _heatmap(usage, run.path / "usage_by_class.png", labels)

    print("\n| model | test accuracy (%) | parameters | s / epoch |")
    print("|---|---|---|---|")
    for model_name, row in rows.items():
        print(f"| {model_name} | {row['test_accuracy']:.2f} | {row['parameters']:,} | {row['seconds_per_epoch']:.1f} |")
    print(f"\n({cfg.dataset}, {len(x)} training images, {cfg.epochs} epochs, Adam lr {cfg.lr}, seed {cfg.seed})")
    print("\nWhat the Neurocoder layers read (test images, U bank):")
    for name, info in reads.items():
        print(f"  layer {name}: attention entropy {info['mean_attention_entropy_nats']:.2f} nats "
              f"(flat = {info['flat_entropy_nats']:.2f}), {info['distinct_top_slots']} of {info['num_programs']} "
              f"slots are some component's top read; sigma_1..R = "
              + ", ".join(f"{s:.2f}" for s in info["mean_sigma"][:4]) + ", ...")
    last = usage[list(usage)[-1]]
    print("\n  output layer: the three slots each class reads most (mean read weight):")
    for label in range(10):
        weights, slots = last[label].topk(3)
        name = FASHION_CLASSES[label] if cfg.dataset == "fashion-mnist" else str(label)
        print(f"    {name:<9} " + "  ".join(f"slot {s:>2} {w:.3f}" for s, w in zip(slots.tolist(), weights.tolist())))
    print(f"\nrun folder: {run.path}" + (f"; heatmap: {figure}" if figure else ""))
    return results


def _heatmap(usage: dict[str, torch.Tensor], path: Path, labels) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(usage), figsize=(6 * len(usage), 3.6), squeeze=False)
    for ax, (name, matrix) in zip(axes[0], usage.items()):
        image = ax.imshow(matrix.numpy(), aspect="auto", cmap="magma")
        ax.set_title(f"layer {name}: mean read weight per slot")
        ax.set_xlabel("program slot (U bank)")
        ax.set_yticks(range(len(labels)), labels)
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
