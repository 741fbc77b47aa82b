"""How many directions a PPO agent's output layer really uses: the singular values and effective
rank of the weight it applies, over training. A diagnostic (README, games).

    python scripts/probe_head_rank.py [--env minatar:asterix] [--variant nc-heads] [--updates 146]
        [--every 24] [--set key=value ...] [--out FILE.jsonl]

Trains one seed through the PPO trainer's own update and, at the start and every ``--every``
updates, takes the environments' current observations (one per environment) and measures each
output layer (the modules under ``heads``): for a plain ``nn.Linear`` its weight, the same for
every input; for a Neurocoder layer the weight it composes for each observation
(``compose_weight``, which includes the working program when ``residual`` is on). Per layer it
records the mean singular values (largest first) and the mean effective rank (exp of the entropy
of the normalised singular values; 1 = one direction, k = k equal ones), of the whole layer and of
the policy's columns alone, and, for Neurocoder layers,
the mean singular values sigma it read and the mean entropy and largest weight of its U-bank
reads. One JSON object per measurement, printed and written to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import neurocoder  # noqa: E402
from neurocoder.experiments.registry import apply_overrides  # noqa: E402
from neurocoder.train.rl import ppo  # noqa: E402


def effective_rank(singular_values: torch.Tensor) -> torch.Tensor:
    """(..., k) singular values -> (...) exp of the entropy of their normalised distribution."""
    p = singular_values / singular_values.sum(-1, keepdim=True).clamp_min(1e-12)
    return torch.exp(-(p * p.clamp_min(1e-12).log()).sum(-1))


@torch.no_grad()
def measure(agent: ppo.ActorCritic, observations: torch.Tensor) -> dict:
    """Per output layer: singular values, effective rank and (Neurocoder) what it read."""
    features = agent.fc(agent.features(observations))                          # (N, hidden)
    composed = [name for name, m in agent.named_modules() if isinstance(m, neurocoder.NeurocoderLinear)]
    # The output layers; not the small linear maps inside a Neurocoder layer (its key maps, composer).
    layers = {name: m for name, m in agent.named_modules()
              if (name == "heads" or name.startswith("heads.")) and isinstance(m, (nn.Linear, neurocoder.NeurocoderLinear))
              and not any(name.startswith(outer + ".") for outer in composed)}
    out = {}
    for name, layer in layers.items():
        if isinstance(layer, neurocoder.NeurocoderLinear):
            weight = layer.compose_weight(features)                            # (N, hidden, out)
            _, trace = layer(features, return_trace=True)
            reads = trace.read_weights["u"].flatten(1, 2)                      # (N, R, P)
            extra = {"sigma": trace.sigma.mean(0).tolist(),
                     "read_entropy_u": (-(reads * reads.clamp_min(1e-12).log()).sum(-1)).mean().item(),
                     "largest_read_u": reads.amax(-1).mean().item()}
        else:
            weight = layer.weight.T[None]                                      # (1, hidden, out)
            extra = {}
        singular = torch.linalg.svdvals(weight)                                # (N, min(hidden, out))
        record = {"singular_values": singular.mean(0).tolist(),
                  "effective_rank": effective_rank(singular).mean().item(), **extra}
        # The policy's own columns: in a joint layer the value's column, started at 100x the
        # policy rows' scale as in CleanRL, would otherwise dominate the spectrum.
        policy = weight[..., :agent.num_actions] if name == "heads" else weight if name.endswith("policy") else None
        if policy is not None:
            singular = torch.linalg.svdvals(policy)
            record.update(policy_singular_values=singular.mean(0).tolist(),
                          policy_effective_rank=effective_rank(singular).mean().item())
        out[name] = record
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the probe; returns the records it printed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="minatar:asterix")
    parser.add_argument("--variant", default="nc-heads")
    parser.add_argument("--updates", type=int, default=146)
    parser.add_argument("--every", type=int, default=24)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="PPOConfig overrides")
    parser.add_argument("--out", default=None, help="also write the records here (JSON lines)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    # total_frames sets the learning rate's annealing: that of the table's 1M-frame runs.
    cfg = apply_overrides(ppo.PPOConfig(env=args.env, variant=args.variant, seeds=1), args.set)
    cfg.check()
    trainer = ppo._Seed(cfg, 0)
    records = []
    handle = open(args.out, "w") if args.out else None
    try:
        for update in range(args.updates + 1):
            record = None
            if update:
                record, _ = trainer.train_update()
            if update % args.every == 0 or update == args.updates:
                trainer.agent.eval()
                entry = {"env": args.env, "variant": args.variant, "update": update,
                         "frames": trainer.steps * trainer.envs.frames_per_step,
                         "entropy": None if record is None else record["entropy"],
                         "layers": measure(trainer.agent, trainer.observations)}
                records.append(entry)
                line = json.dumps(entry)
                print(line, flush=True)
                if handle:
                    handle.write(line + "\n")
                    handle.flush()
    finally:
        if handle:
            handle.close()
    return records


if __name__ == "__main__":
    main()
