"""Where a PPO agent's gradient norm sits: each parameter tensor's share of the squared norm
before clipping, over the minibatches of a window of updates. A diagnostic (README, games).

    python scripts/probe_agent_gradients.py [--env minatar:asterix] [--variant nc-heads]
        [--updates 60] [--every 20] [--top 8] [--set key=value ...]

Trains one seed through the PPO trainer's own update and, every ``--every`` updates, prints the
update's mean gradient norm before clipping, the share of minibatches clipped, and the tensors
with the largest share of the squared norm (with their root-mean-square norm) over that window.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from neurocoder.experiments.registry import apply_overrides  # noqa: E402
from neurocoder.train.rl import ppo  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the probe; returns one record per window: update, grad_norm, clipped_fraction, shares."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="minatar:asterix")
    parser.add_argument("--variant", default="nc-heads")
    parser.add_argument("--updates", type=int, default=60)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="PPOConfig overrides")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = apply_overrides(ppo.PPOConfig(env=args.env, variant=args.variant, total_frames=10**9, seeds=1), args.set)
    cfg.check()
    trainer = ppo._Seed(cfg, 0)
    names = {id(p): n for n, p in trainer.agent.named_parameters()}
    squares: dict[str, float] = defaultdict(float)
    calls = [0]
    clip = ppo.nn.utils.clip_grad_norm_

    def measured_clip(parameters, max_norm):
        # The trainer clips once per minibatch, right after backward: read the gradients there.
        parameters = list(parameters)
        for p in parameters:
            if p.grad is not None:
                squares[names[id(p)]] += p.grad.pow(2).sum().item()
        calls[0] += 1
        return clip(parameters, max_norm)

    records, norms, clipped = [], [], []
    ppo.nn.utils.clip_grad_norm_ = measured_clip
    try:
        for update in range(1, args.updates + 1):
            record, _ = trainer.train_update()
            norms.append(record["grad_norm"])
            clipped.append(record["clipped_fraction"])
            if update % args.every == 0 or update == args.updates:
                total = sum(squares.values())
                shares = {n: v / total for n, v in sorted(squares.items(), key=lambda kv: -kv[1])}
                window = {"update": update, "grad_norm": sum(norms) / len(norms),
                          "clipped_fraction": sum(clipped) / len(clipped), "shares": shares}
                records.append(window)
                print(f"{args.env} {args.variant}, updates {update - len(norms) + 1}-{update}: gradient norm before "
                      f"clipping {window['grad_norm']:.3f}, minibatches clipped {window['clipped_fraction']:.2f}")
                for n in list(shares)[:args.top]:
                    print(f"   {n:45s} share {shares[n]:6.3f}   rms norm {(squares[n] / calls[0]) ** 0.5:.3f}")
                squares.clear()
                calls[0] = 0
                norms, clipped = [], []
    finally:
        ppo.nn.utils.clip_grad_norm_ = clip
    return records


if __name__ == "__main__":
    main()
