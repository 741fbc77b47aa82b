"""Plain classification backbones and their Neurocoder / NSM / MoE variants.

Every backbone keeps its layers in two named parts, ``features`` (convolutions, if any) and
``classifier`` (fully connected layers, the last one the head), so each variant is the plain
network with ``neurocoder.convert`` (or a baseline swap) applied to named modules:

=============  ===============================================================================
variant        what changes
=============  ===============================================================================
plain          nothing
nc-head        the final linear layer becomes a NeurocoderLinear (the paper's figure)
nc-fc          every linear layer becomes a NeurocoderLinear
nc-conv        every linear layer and every convolution (NeurocoderConv2d)
nsm-head       the final layer becomes an NSMLinear (a memory of whole weight matrices)
moe-head       the final layer becomes a MoELinear (top-2 of several experts)
=============  ===============================================================================

Variants that would repeat another one for a backbone (``nc-fc`` of ResNet-20 and of the 1-D CNN,
whose only linear layer is the head; ``nc-conv`` of the MLP) are not offered for it:
``variants_for``. The NSM and MoE heads get as many stored matrices / experts as bring their
parameter count closest to the Neurocoder head's (``matched_head``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import neurocoder
from neurocoder import MoELinear, NSMLinear, presets

__all__ = ["BACKBONES", "VARIANTS", "build_classifier", "variants_for", "head_name", "HEAD_BASELINES"]

VARIANTS = {
    "plain": "the plain backbone",
    "nc-head": "Neurocoder in the final layer only (the paper's figure)",
    "nc-fc": "Neurocoder in every fully connected layer",
    "nc-conv": "Neurocoder in every fully connected layer and every convolution",
    "nsm-head": "NSM final layer (stored whole matrices mixed by key attention)",
    "moe-head": "mixture-of-experts final layer (top-2 gating, load-balancing loss)",
}
HEAD_BASELINES = ("nsm-head", "moe-head")


class MLP(nn.Module):
    """flatten -> Linear(d, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, classes)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: int = 256) -> None:
        super().__init__()
        size = 1
        for n in input_shape:
            size *= n
        self.features = nn.Identity()
        self.classifier = nn.Sequential(nn.Linear(size, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x.flatten(1))


class LeNet(nn.Module):
    """LeNet-5 style for (1, 28, 28): conv5(6, pad 2)-pool-conv5(16)-pool-120-84-classes."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        channels, height, width = input_shape
        self.features = nn.Sequential(nn.Conv2d(channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2))
        side_h, side_w = ((height // 2) - 4) // 2, ((width // 2) - 4) // 2
        self.classifier = nn.Sequential(nn.Linear(16 * side_h * side_w, 120), nn.ReLU(), nn.Linear(120, 84),
                                        nn.ReLU(), nn.Linear(84, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm; identity shortcut, or 1x1 conv when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet-20 (He et al. 2016, CIFAR layout: 3 stages of 3 blocks, 16/32/64 channels) for
    (1, 28, 28) inputs; global average pooling, one linear head. 19 convolutions (+2 shortcut
    1x1 convolutions), 0.27M parameters."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(input_shape[0], width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                   nn.ReLU()]
        channels = width
        for stage, out_channels in enumerate((width, 2 * width, 4 * width)):
            for block in range(3):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(BasicBlock(channels, out_channels, stride))
                channels = out_channels
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class CNN1D(nn.Module):
    """The MNIST-1D convolutional baseline (Greydanus 2020): three convolutions of 25 channels
    (kernels 5, 3, 3; stride 2; padding 1), then a linear head. Input (N, 1, 1, L); the
    convolutions are 2-D with (1, k) kernels, which act as 1-D convolutions along the signal."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, channels: int = 25) -> None:
        super().__init__()
        length = input_shape[-1]
        self.features = nn.Sequential(
            nn.Conv2d(input_shape[0], channels, (1, 5), (1, 2), (0, 1)), nn.ReLU(),
            nn.Conv2d(channels, channels, (1, 3), (1, 2), (0, 1)), nn.ReLU(),
            nn.Conv2d(channels, channels, (1, 3), (1, 2), (0, 1)), nn.ReLU())
        for _ in range(3):
            length = (length + 2 - (5 if _ == 0 else 3)) // 2 + 1
        self.classifier = nn.Sequential(nn.Linear(channels * length, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


BACKBONES = {
    "mlp": (MLP, "MLP with two hidden layers (256 units; 100 for MNIST-1D, as R3)"),
    "lenet": (LeNet, "LeNet-5 style CNN (2 convolutions, 3 linear layers)"),
    "resnet20": (ResNet20, "ResNet-20 (CIFAR layout, 16/32/64 channels, batch norm)"),
    "cnn1d": (CNN1D, "MNIST-1D CNN of Greydanus 2020 (3 convolutions, 25 channels)"),
}


def _plain(backbone: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {sorted(BACKBONES)}")
    cls = BACKBONES[backbone][0]
    if backbone in ("lenet", "resnet20") and (len(input_shape) != 3 or input_shape[1] < 12):
        raise ValueError(f"backbone {backbone!r} needs image inputs (C, H, W) with H, W >= 12, got {input_shape}; "
                         f"use mlp or cnn1d for MNIST-1D")
    if backbone == "mlp" and input_shape[-2] == 1:   # MNIST-1D: hidden 100, as in R3's MLP
        return MLP(input_shape, num_classes, hidden=100)
    return cls(input_shape, num_classes)


def head_name(model: nn.Module) -> str:
    """The qualified name of a backbone's final linear layer, e.g. ``classifier.4``."""
    return f"classifier.{len(model.classifier) - 1}"


def _linear_names(model: nn.Module) -> list[str]:
    return [f"classifier.{i}" for i, m in enumerate(model.classifier) if isinstance(m, nn.Linear)]


def _conv_names(model: nn.Module) -> list[str]:
    return [f"features.{name}" for name, m in model.features.named_modules() if isinstance(m, nn.Conv2d)]


def variants_for(backbone: str) -> list[str]:
    """The variants that differ from each other for ``backbone``."""
    out = ["plain", "nc-head"]
    if backbone in ("mlp", "lenet"):
        out.append("nc-fc")
    if backbone != "mlp":
        out.append("nc-conv")
    return out + ["nsm-head", "moe-head"]


def build_classifier(backbone: str, variant: str, input_shape: tuple[int, ...], num_classes: int,
                     layer_options: dict | None = None, conv_options: dict | None = None,
                     init: str = "random") -> nn.Module:
    """The plain ``backbone`` with ``variant`` applied (see the module docstring).

    ``layer_options`` go to every NeurocoderLinear (default: the ``default`` preset),
    ``conv_options`` to every NeurocoderConv2d (default: 32 programs of rank 8, learned sharpness).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(VARIANTS)}")
    if variant not in variants_for(backbone):
        raise ValueError(f"variant {variant!r} is not offered for backbone {backbone!r} (it would repeat another "
                         f"variant); choose one of {variants_for(backbone)}")
    model = _plain(backbone, input_shape, num_classes)
    linear_options = {**presets.layer_options("default"), **(layer_options or {})}
    conv = {**dict(num_programs=32, rank=8, key_dim=8, key_mode="content", sharpness="learned"), **(conv_options or {})}
    head = head_name(model)
    if variant == "nc-head":
        neurocoder.convert(model, [head], init=init, **linear_options)
    elif variant in ("nc-fc", "nc-conv"):
        neurocoder.convert(model, _linear_names(model), init=init, **linear_options)
        if variant == "nc-conv":
            neurocoder.convert(model, _conv_names(model), init=init, **conv)
    elif variant in HEAD_BASELINES:
        index = len(model.classifier) - 1
        old = model.classifier[index]
        target = sum(p.numel() for p in neurocoder.NeurocoderLinear(old.in_features, old.out_features,
                                                                      **linear_options).parameters())
        model.classifier[index] = matched_head(variant, old.in_features, old.out_features, target)
    return model


def matched_head(variant: str, in_features: int, out_features: int, target_parameters: int) -> nn.Module:
    """An NSM or MoE layer whose number of stored matrices / experts (2..64) brings its parameter
    count closest to ``target_parameters``."""
    def make(n: int) -> nn.Module:
        if variant == "nsm-head":
            return NSMLinear(in_features, out_features, num_programs=n)
        return MoELinear(in_features, out_features, num_experts=n, top_k=2)

    def size(n: int) -> int:
        return sum(p.numel() for p in make(n).parameters())

    best = min(range(2, 65), key=lambda n: abs(size(n) - target_parameters))
    return make(best)
