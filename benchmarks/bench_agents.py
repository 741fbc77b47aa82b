"""Environment steps per second of the PPO agents, plain and Neurocoder, side by side in one process.

    python benchmarks/bench_agents.py [--env minatar:breakout] [--updates 6] [--threads 1] [--set key=value ...]

Builds one trainer per variant with identical settings and alternates their PPO updates
(rollout + optimisation), so a busy machine slows them alike; prints the median steps per
second of each and the ratio to the plain agent.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import neurocoder  # noqa: E402
from neurocoder.experiments.registry import apply_overrides  # noqa: E402
from neurocoder.train.rl.ppo import AGENT_VARIANTS, NEUROCODER_SETTINGS, PPOConfig, _Seed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="minatar:breakout")
    parser.add_argument("--updates", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", nargs="*", default=list(AGENT_VARIANTS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="PPOConfig overrides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # The overrides are checked against a Neurocoder variant (the plain agent refuses Neurocoder
    # settings); the plain agent then runs with those settings at their defaults.
    cfg = apply_overrides(PPOConfig(env=args.env, total_frames=10**9, variant="nc-heads"), args.set)
    plain_defaults = {name: getattr(PPOConfig(), name) for name in NEUROCODER_SETTINGS}
    trainers = {v: _Seed(PPOConfig(**{**cfg.__dict__, "variant": v, **(plain_defaults if v == "plain" else {})}), 0)
                for v in args.variants}
    for trainer in trainers.values():                       # warm-up
        trainer.train_update()
    seconds = {v: [] for v in trainers}
    for _ in range(args.updates):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            trainer.train_update()
            seconds[name].append(time.perf_counter() - start)
    batch = cfg.num_envs * cfg.num_steps
    rate = {v: batch / statistics.median(s) for v, s in seconds.items()}
    print(f"{args.env}, {cfg.num_envs} envs x {cfg.num_steps} steps per update, {args.threads} thread(s):")
    for name in trainers:
        ratio = rate[name] / rate["plain"] if "plain" in rate else float("nan")
        paired = ""
        if "plain" in rate and name != "plain" and len(seconds[name]) >= 4:
            # Each round's own ratio (the two updates ran back to back, under the same load): its
            # quartiles show how far a busy host moves the ratio of medians.
            rounds = [p / t for p, t in zip(seconds["plain"], seconds[name])]
            q1, q2, q3 = statistics.quantiles(rounds, n=4)
            paired = f"   (per round: median {q2:.2f}x, quartiles {q1:.2f}-{q3:.2f}x)"
        print(f"  {name:<12} {rate[name]:8.0f} steps/s   {ratio:5.2f}x plain{paired}")
    if "plain" in trainers and "nc-heads" in trainers:
        extra = head_costs(trainers["plain"].agent.heads, trainers["nc-heads"].agent.heads, cfg)
        update_ms = {v: 1e3 * batch / rate[v] for v in ("plain", "nc-heads")}
        print(f"  per update: the Neurocoder agent takes {update_ms['nc-heads'] - update_ms['plain']:.0f} ms more "
              f"({update_ms['nc-heads']:.0f} vs {update_ms['plain']:.0f} ms); its output layer alone accounts "
              f"for ~{extra:.0f} ms ({cfg.num_steps + 1} rollout calls, "
              f"{cfg.update_epochs * cfg.num_minibatches} minibatches)")


def head_costs(plain: torch.nn.Module, neurocoder_head: torch.nn.Module, cfg: PPOConfig, rounds: int = 200) -> float:
    """Per-call time of the output layer alone, plain vs Neurocoder, interleaved: a rollout call
    (batch = num_envs, eval mode, no grad, inside reuse_programs) and a training minibatch (forward+backward).
    Prints both; returns the Neurocoder layer's extra milliseconds per PPO update."""
    hidden = plain.in_features
    minibatch = cfg.num_envs * cfg.num_steps // cfg.num_minibatches
    x_roll, x_train = torch.randn(cfg.num_envs, hidden), torch.randn(minibatch, hidden)

    def rollout(layer):
        layer.eval()                     # as the trainer's rollout: no usage bookkeeping
        with torch.no_grad(), neurocoder.reuse_programs(layer):
            for _ in range(cfg.num_steps):   # one rollout's calls share the kept constants, as in the trainer
                layer(x_roll)
        layer.train()

    def train(layer):
        # Gradients set to None first, as the trainer's zero_grad does: accumulating into kept
        # ones would add one add_ per parameter, more for the Neurocoder layer's many tensors.
        layer.zero_grad(set_to_none=True)
        layer(x_train).square().sum().backward()

    extra = 0.0
    calls_per_update = (cfg.num_steps + 1, cfg.update_epochs * cfg.num_minibatches)
    for (label, fn, per), calls in zip((("rollout call, batch %d, no grad" % cfg.num_envs, rollout, cfg.num_steps),
                                        ("training minibatch %d, fwd+bwd" % minibatch, train, 1)), calls_per_update):
        times = {"plain": [], "nc-heads": []}
        for _ in range(max(20, rounds // per)):       # at least 20 timings for the median
            for name, layer in (("plain", plain), ("nc-heads", neurocoder_head)):
                start = time.perf_counter()
                fn(layer)
                times[name].append((time.perf_counter() - start) / per)
        plain_ms, nc_ms = (1e3 * statistics.median(times[n]) for n in ("plain", "nc-heads"))
        print(f"  output layer alone, {label}: nn.Linear {plain_ms:.3f} ms, Neurocoder {nc_ms:.3f} ms "
              f"({nc_ms / plain_ms:.0f}x)")
        extra += calls * (nc_ms - plain_ms)
    return extra


if __name__ == "__main__":
    main()
