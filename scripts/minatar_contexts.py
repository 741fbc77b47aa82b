"""How many distinct contexts the `nc-conv` agent's convolution reads on each MinAtar game.

    python scripts/minatar_contexts.py [--games breakout asterix ...] [--steps 64] [--seed 0]

`nc-conv`'s NeurocoderConv2d composes its filters from the observation's channels averaged over
the 10 x 10 board (its context). MinAtar's channels are 0/1 maps, so a context is a vector of
object counts / 100, and few distinct ones occur. Since session 37 the layer reads each distinct
context of a batch once (`NeurocoderConv2d.dedupe_contexts`) and, in a rollout, each context
once per parameter version: what that saves depends on these counts. For every game this plays
the agents' 32 environments for `--steps` steps with uniformly random actions (the agent's
behaviour early in training) and prints the distinct contexts among all those frames and, on
average, within one training minibatch (a quarter of the frames, drawn at random) and one
rollout step (the 32 environments' frames at one time).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from neurocoder.layers import _unique_rows  # noqa: E402
from neurocoder.train.rl.envs import make_vector_env  # noqa: E402

GAMES = ("breakout", "space_invaders", "freeway", "asterix", "seaquest")


def count_contexts(game: str, steps: int, seed: int, generator: torch.Generator) -> dict:
    """Distinct contexts over ``steps`` random steps of 32 environments of one game: over all the
    frames, per training minibatch (a quarter of them, 20 draws averaged) and per rollout step."""
    envs = make_vector_env(f"minatar:{game}", 32, seed)
    observations, frames = envs.reset(), []
    for _ in range(steps):
        frames.append(observations.clone())
        actions = torch.randint(envs.num_actions, (32,), generator=generator)
        observations, *_ = envs.step(actions.numpy())
    contexts = torch.stack(frames).mean(dim=(3, 4))                            # (steps, 32, channels)
    flat = contexts.flatten(0, 1)
    minibatch = max(1, flat.shape[0] // 4)
    per_minibatch = [_unique_rows(flat[torch.randperm(flat.shape[0], generator=generator)[:minibatch]])[0].shape[0]
                     for _ in range(20)]
    per_step = [_unique_rows(step)[0].shape[0] for step in contexts]
    return {"channels": contexts.shape[-1], "frames": flat.shape[0], "distinct": _unique_rows(flat)[0].shape[0],
            "minibatch": minibatch, "per_minibatch": sum(per_minibatch) / len(per_minibatch),
            "per_step": sum(per_step) / len(per_step)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--games", nargs="*", default=list(GAMES))
    parser.add_argument("--steps", type=int, default=64, help="steps of the 32 environments (a PPO rollout: 64)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    generator = torch.Generator().manual_seed(args.seed)
    print(f"distinct pooled contexts, 32 environments x {args.steps} steps of random play, seed {args.seed}")
    print(f"{'game':16s} {'channels':>8s} {'all frames':>14s} {'per minibatch':>14s} {'per step':>9s}")
    counts = {}
    for game in args.games:
        c = counts[game] = count_contexts(game, args.steps, args.seed, generator)
        print(f"{game:16s} {c['channels']:8d} {c['distinct']:6d} of {c['frames']:5d} "
              f"{c['per_minibatch']:7.1f} of {c['minibatch']:4d} {c['per_step']:5.1f} of 32")
    return counts


if __name__ == "__main__":
    main()
