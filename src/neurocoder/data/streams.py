"""Task streams for continual learning: split and permuted benchmarks in three scenarios.

Scenarios (van de Ven & Tolias 2019; Hsu et al. 2018):

* ``task``: incremental task. Each task has its own head; the task id is given at test time.
  Labels are positions within the task (0 .. classes_per_task - 1).
* ``domain``: incremental domain. One shared head of ``classes_per_task`` outputs; no task id.
* ``class``: incremental class. One head over every class seen; labels are the global classes.

Any data set given as tensors becomes a stream through :func:`split_stream` (groups of classes)
or :func:`permuted_stream` (fixed pixel permutations).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["Task", "Stream", "SCENARIOS", "split_stream", "permuted_stream", "prepare_images"]

SCENARIOS = ("task", "domain", "class")


@dataclass
class Task:
    """One task: inputs (N, features) float, targets (N,) int64 in the scenario's label space."""

    index: int
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[int, ...]          # the original classes this task covers


@dataclass
class Stream:
    tasks: list[Task]
    scenario: str
    num_heads: int                    # 1, or the number of tasks in the task-incremental scenario
    head_size: int                    # outputs per head
    input_size: int
    description: str = ""
    notes: dict = field(default_factory=dict)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)


def prepare_images(images: torch.Tensor, pad_to: int | None = 32, mean: float = 0.1307,
                   std: float = 0.3081) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, side*side): scale to [0, 1], zero-pad, normalise, flatten.

    Hsu et al.'s protocol pads MNIST to 32 x 32; their code then normalises with the padded
    images' mean and std (0.1000, 0.2752), the defaults here are the 28 x 28 images' (see
    ``ContinualConfig.normalisation`` and ``padded_statistics`` in :mod:`neurocoder.train.continual`).
    """
    x = images.float() / 255.0
    if pad_to is not None:
        pad = (pad_to - x.shape[-1]) // 2
        x = F.pad(x, (pad, pad, pad, pad))
    return ((x - mean) / std).flatten(1)


def _check_scenario(scenario: str) -> None:
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose one of {SCENARIOS}")


def _check_data(builder: str, train_x, train_y, test_x, test_y) -> None:
    """Inputs (N, features) floating point, labels (N,) integers, as many of each, the same
    features for training and test: else a ValueError naming the tensor, what it expected and got."""
    for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        for name, t in ((f"{split}_x", x), (f"{split}_y", y)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{builder}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if x.dim() != 2 or not x.is_floating_point():
            raise ValueError(f"{builder}: {split}_x must be a floating-point (N, features) tensor, got "
                             f"{x.dtype} of shape {tuple(x.shape)} (images: flatten them, e.g. with prepare_images)")
        if y.dim() != 1 or y.is_floating_point() or y.dtype == torch.bool:
            raise ValueError(f"{builder}: {split}_y must be an (N,) tensor of integer class labels, got "
                             f"{y.dtype} of shape {tuple(y.shape)}")
        if len(x) != len(y):
            raise ValueError(f"{builder}: {split}_x has {len(x)} rows but {split}_y {len(y)} labels")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"{builder}: train_x has {train_x.shape[1]} features, test_x {test_x.shape[1]}")


def split_stream(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 groups: list[tuple[int, ...]], scenario: str, description: str = "") -> Stream:
    """One task per group of classes, e.g. groups=[(0, 1), (2, 3), ...] for split MNIST.

    Args:
        train_x, test_x: (N, features) float inputs.
        train_y, test_y: (N,) int64 original class labels.
        groups: the classes of each task, all of the same size for ``task``/``domain``.
        scenario: ``'task'``, ``'domain'`` or ``'class'``.
    """
    _check_scenario(scenario)
    _check_data("split_stream", train_x, train_y, test_x, test_y)
    sizes = {len(g) for g in groups}
    if scenario != "class" and len(sizes) != 1:
        raise ValueError(f"scenario {scenario!r} needs groups of equal size, got sizes {sorted(sizes)}")
    all_classes = sorted({c for g in groups for c in g})
    tasks = []
    for index, group in enumerate(groups):
        def select(x, y):
            mask = torch.isin(y, torch.tensor(group))
            labels = y[mask]
            if scenario != "class":  # position within the group
                lookup = torch.full((int(y.max()) + 1,), -1, dtype=torch.long)
                lookup[torch.tensor(group)] = torch.arange(len(group))
                labels = lookup[labels]
            return x[mask], labels.long()

        tx, ty = select(train_x, train_y)
        vx, vy = select(test_x, test_y)
        if len(tx) == 0:
            raise ValueError(f"task {index} (classes {group}) has no training samples")
        tasks.append(Task(index, "classes " + ",".join(map(str, group)), tx, ty, vx, vy, tuple(group)))
    head_size = len(all_classes) if scenario == "class" else len(groups[0])
    return Stream(tasks, scenario, len(groups) if scenario == "task" else 1, head_size, train_x.shape[1],
                  description)


def permuted_stream(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                    num_tasks: int, seed: int, scenario: str = "domain", description: str = "") -> Stream:
    """Task t applies a fixed random pixel permutation (task 0 keeps the original order).
    Inputs as :func:`split_stream`'s."""
    _check_scenario(scenario)
    _check_data("permuted_stream", train_x, train_y, test_x, test_y)
    generator = torch.Generator().manual_seed(seed)
    classes = tuple(sorted(int(c) for c in train_y.unique()))
    tasks = []
    for index in range(num_tasks):
        order = torch.arange(train_x.shape[1]) if index == 0 else torch.randperm(train_x.shape[1], generator=generator)
        offset = index * len(classes) if scenario == "class" else 0
        tasks.append(Task(index, f"permutation {index}", train_x[:, order], train_y.long() + offset,
                          test_x[:, order], test_y.long() + offset, classes))
    head_size = len(classes) * (num_tasks if scenario == "class" else 1)
    return Stream(tasks, scenario, num_tasks if scenario == "task" else 1, head_size, train_x.shape[1], description,
                  notes={"permutation_seed": seed})
