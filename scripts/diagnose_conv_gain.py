"""Why Neurocoder convolutions stall ResNet-20: signal statistics at initialisation.

    python scripts/diagnose_conv_gain.py [--variants plain nc-conv] [--batch 128]

For one batch of MNIST digits and a freshly built ResNet-20 (plain, and with every convolution a
NeurocoderConv2d), prints the cross-entropy and the orthogonality loss at weight 1, the gradient-to-parameter norm ratio of the first and
last layers, and, for each convolution, how much the per-sample channel means of its output vary
across the batch relative to the output's overall std. Composed filters give each input its own
gain per channel, which batch normalisation (batch statistics) does not remove; the README's
object-recognition section quotes these numbers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import neurocoder  # noqa: E402
from neurocoder.data.classification import load_classification  # noqa: E402
from neurocoder.experiments.backbones import build_classifier  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="*", default=["plain", "nc-conv"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_classification("mnist")
    x, y = data.train_x[:args.batch], data.train_y[:args.batch]
    for variant in args.variants:
        torch.manual_seed(args.seed)
        model = build_classifier("resnet20", variant, data.input_shape, data.num_classes)
        outputs: dict[str, torch.Tensor] = {}
        for name, module in model.named_modules():
            if name == "features.0" or name.endswith(("conv1", "conv2")):
                module.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o.detach()))
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        print(f"{variant}: cross-entropy {loss.item():.3f}; orthogonality loss summed over its Neurocoder "
              f"layers {neurocoder.regularization(model, 1.0).item():.1f}")
        parameters = [(n, p) for n, p in model.named_parameters() if p.grad is not None and p.dim() > 1]
        for name, p in parameters[:1] + parameters[-2:-1]:
            print(f"  grad/param norm {name:<45} {(p.grad.norm() / p.norm().clamp_min(1e-12)).item():.2e}")
        for name, out in outputs.items():
            # (B, C, H, W): spread across samples of each channel's spatial mean, over the output's std
            spread = (out.mean(dim=(2, 3)).std(0).mean() / out.std()).item()
            print(f"  {name:<22} per-sample channel-mean spread / output std {spread:.3f}")


if __name__ == "__main__":
    main()
