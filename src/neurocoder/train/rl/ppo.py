"""PPO with vectorised environments and GAE, in one file (after CleanRL's ppo.py), for plain and
Neurocoder actor-critics with identical settings.

Agent: a small CNN torso (MinAtar: one 3x3 convolution of 16 channels, as Young & Tian's
networks; Atari: the Nature-DQN torso; vector observations: no convolution), one fully connected
layer, a policy head and a value head. Variants (``AGENT_VARIANTS``) are that network with
``neurocoder.convert`` applied by module name:

* ``plain``: nothing converted;
* ``nc-heads``: the output layer, which gives the policy logits and the value, is a Neurocoder
  layer (the paper's figure);
* ``nc-fc``: every fully connected layer (torso layer and output layer).
* ``nc-policy``: the policy logits come from a Neurocoder layer, the value from a plain linear
  row beside it (a probe, not the paper's figure: in ``nc-heads`` the value's gradients move the
  program that also gives the policy, see the README).
* ``lowrank-heads``: a control, not Neurocoder: the plain output layer factorised as
  sum_n sigma_n u_n v_n^T with ordered positive sigma (Neurocoder's form of a program) but with
  u, v and sigma free parameters, no memory, no reads, the same for every input.
* ``nc-added-heads``: the plain output layer kept, and a Neurocoder layer's output added to it
  through a learned per-output scale that starts at 0 (as ReZero, Bachlechner et al. 2020): the
  agent starts as the plain agent, and the composed program is learnt as an input-dependent
  correction of a static head.

The policy and value heads are one output layer of A + 1 units (A logits, then the value): for
the plain agent this is exactly two linear heads side by side (their rows are initialised with
the usual gains, 0.01 and 1); for the Neurocoder agent it means one composed program per input
serves both heads, which halves the composition work (measured: two separate Neurocoder heads
ran the MinAtar agent at 0.3-0.45x the plain agent's steps per second).

Run folder: ``config.json``; ``episodes.jsonl`` (frame, return, length of every finished episode);
``metrics.jsonl`` (one line per update: frames, steps per second, losses); ``checkpoint.pt``
(agent, optimiser, counters, RNG states and, for MinAtar, the environments themselves, written
atomically every ``checkpoint_every`` updates); ``seeds/seed-NN.json`` and ``results.json``.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import neurocoder
from neurocoder import presets
from neurocoder.progress import Progress
from neurocoder.runs import atomic_torch_save, atomic_write_text, changed_settings, finished_seeds, start_seeded_run
from neurocoder.train.rl.envs import make_vector_env

__all__ = ["PPOConfig", "ActorCritic", "run_ppo", "AGENT_VARIANTS", "NEUROCODER_SETTINGS", "build_agent",
           "generalized_advantages", "explained_variance"]

AGENT_VARIANTS = {
    "plain": "the plain actor-critic",
    "nc-heads": "Neurocoder policy and value heads, one composed output layer (the paper's figure)",
    "nc-fc": "Neurocoder in every fully connected layer (torso layer and the output layer)",
    "nc-policy": "Neurocoder policy head, plain value head beside it (the value no longer shares the program)",
    "nc-two-heads": "two Neurocoder output layers, one for the policy, one for the value, each composing its own program",
    "lowrank-heads": "control: the plain output layer as sum sigma_n u_n v_n^T of free factors (no memory, no reads)",
    "nc-added-heads": "the plain output layer plus a Neurocoder layer added through a scale that starts at 0",
    "nc-conv": "Neurocoder in the torso's first convolution (filters composed per observation), plain heads",
}


# PPOConfig fields that configure the Neurocoder layers, meaningless for the plain agent.
NEUROCODER_SETTINGS = ("layer_options", "layer_init", "neurocoder_lr_scale", "routing_lr_scale", "orthogonality_weight",
                       "torso_grad_scale")


@dataclass
class PPOConfig:
    env: str = "minatar:breakout"
    variant: str = "plain"
    total_frames: int = 1_000_000      # frames summed over environments (MinAtar: agent steps; Atari: 4 per step)
    num_envs: int = 32
    num_steps: int = 64                # rollout length per environment
    lr: float = 5e-4
    # The Neurocoder layers' learning rate as a multiple of lr (1: the same as every other layer).
    neurocoder_lr_scale: float = 1.0
    # What decides a Neurocoder layer's reads (composer, keys: neurocoder.routing_parameters) at a
    # further multiple of that rate: two timescales, the reads changing more slowly than the
    # stored programs (with content keys the keys still follow the programs they come from).
    routing_lr_scale: float = 1.0
    anneal_lr: bool = True
    gamma: float = 0.99
    gae_lambda: float = 0.95
    num_minibatches: int = 4
    update_epochs: int = 4
    clip_coef: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    # Stop an update's epochs early once the approximate KL between the rollout policy and the
    # updated one passes this (CleanRL's target_kl); None: always run every epoch.
    target_kl: float | None = None
    orthogonality_weight: float = 0.1
    hidden: int = 128
    # Neurocoder layer options over the 'default' preset: a smaller memory than the classifiers'
    # (16 slots, rank 4), chosen for speed (benchmarks/bench_agents.py; see README).
    layer_options: dict = field(default_factory=lambda: dict(num_programs=16, rank=4))
    # How the Neurocoder layers start: 'random', or 'svd' (seeded from the plain layer they replace,
    # so the agent starts as the plain agent's function: see neurocoder.convert).
    layer_init: str = "random"
    # Probe: the Neurocoder output layer composes its program from the torso's features with their
    # gradient stopped (forward(h, context=h.detach())), so the torso learns only through the
    # applied program, as under a plain head, not through which program is composed.
    detach_context: bool = False
    # Probe: the output layer's composer reads a constant (one input fixed at 1), so its program is
    # learned but the same for every input: Neurocoder's parametrisation without input dependence.
    constant_context: bool = False
    # Probe: the gradient the torso receives through the Neurocoder layers is multiplied by this
    # (their forward is unchanged; 1: no change). A Neurocoder head sends the torso gradients
    # several times the plain head's (the plain policy rows start at gain 0.01; see the notes of
    # session 15), so its features are shaped by the policy more than the plain agent's are.
    torso_grad_scale: float = 1.0
    seeds: int = 3
    seed: int = 0
    checkpoint_every: int = 20         # updates
    threads: int | None = None

    def check(self) -> None:
        problems = []
        if self.variant not in AGENT_VARIANTS:
            problems.append(f"variant={self.variant!r} (choose {sorted(AGENT_VARIANTS)})")
        for name in ("total_frames", "num_envs", "num_steps", "num_minibatches", "update_epochs", "seeds",
                     "checkpoint_every", "hidden"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} (must be >= 1)")
        if not self.lr > 0:
            problems.append(f"lr={self.lr} (must be > 0)")
        if not self.neurocoder_lr_scale > 0:
            problems.append(f"neurocoder_lr_scale={self.neurocoder_lr_scale} (must be > 0)")
        if not self.routing_lr_scale > 0:
            problems.append(f"routing_lr_scale={self.routing_lr_scale} (must be > 0)")
        if self.layer_init not in ("random", "svd"):
            problems.append(f"layer_init={self.layer_init!r} (choose 'random' or 'svd')")
        if self.variant == "plain":
            # Settings of the Neurocoder layers, which the plain agent does not have: a run would
            # record them as if they had applied.
            ignored = changed_settings(self, NEUROCODER_SETTINGS)
            if ignored:
                problems.append(f"{ignored} set for variant='plain', which has no Neurocoder layer "
                                f"(drop them, or choose a Neurocoder variant: {sorted(set(AGENT_VARIANTS) - {'plain'})})")
        if self.variant == "lowrank-heads" and self.layer_init != "random":
            problems.append(f"layer_init={self.layer_init!r} does not apply to variant='lowrank-heads' "
                            f"(it has no memory to seed; drop the setting)")
        if self.variant == "nc-added-heads" and self.layer_init != "random":
            # The added layer replaces no trained weight: seeding it from the SVD of a fresh
            # linear layer would be a random start by another name.
            problems.append(f"layer_init={self.layer_init!r} does not apply to variant='nc-added-heads' "
                            f"(its Neurocoder layer is added beside the plain head, not converted from it; "
                            f"drop the setting)")
        if not 0.0 <= self.torso_grad_scale <= 1.0:
            problems.append(f"torso_grad_scale={self.torso_grad_scale} (must be in [0, 1]: the share of the "
                            f"gradient through the Neurocoder layers that reaches the torso)")
        if self.torso_grad_scale != 1.0 and self.variant in ("nc-fc", "lowrank-heads", "nc-conv"):
            problems.append(f"torso_grad_scale applies to a Neurocoder output layer, which variant={self.variant!r} "
                            f"does not have (choose nc-heads, nc-policy, nc-two-heads or nc-added-heads)")
        if self.detach_context and self.constant_context:
            problems.append("detach_context and constant_context are both true (choose one probe)")
        if self.target_kl is not None and not self.target_kl > 0:
            problems.append(f"target_kl={self.target_kl} (must be > 0, or None to run every epoch)")
        if (self.num_envs * self.num_steps) % self.num_minibatches:
            problems.append(f"num_envs * num_steps = {self.num_envs * self.num_steps} must divide into "
                            f"num_minibatches={self.num_minibatches}")
        if problems:
            raise ValueError("bad config: " + "; ".join(problems))


def _orthogonal(layer: nn.Module, gain: float = 2 ** 0.5) -> nn.Module:
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


class ActorCritic(nn.Module):
    """observation -> features -> fc (ReLU) -> policy logits (A) and value (1).

    Input shapes: (N, C, H, W) images or (N, D) vectors."""

    def __init__(self, observation_shape: tuple[int, ...], num_actions: int, hidden: int = 128) -> None:
        super().__init__()
        if len(observation_shape) == 3 and observation_shape[1] <= 16:           # MinAtar 10x10
            self.features = nn.Sequential(_orthogonal(nn.Conv2d(observation_shape[0], 16, 3)), nn.ReLU(),
                                          nn.Flatten())
            size = 16 * (observation_shape[1] - 2) * (observation_shape[2] - 2)
        elif len(observation_shape) == 3:                                        # Atari 84x84
            self.features = nn.Sequential(
                _orthogonal(nn.Conv2d(observation_shape[0], 32, 8, 4)), nn.ReLU(),
                _orthogonal(nn.Conv2d(32, 64, 4, 2)), nn.ReLU(),
                _orthogonal(nn.Conv2d(64, 64, 3, 1)), nn.ReLU(), nn.Flatten())
            with torch.no_grad():
                size = self.features(torch.zeros(1, *observation_shape)).shape[1]
        else:
            self.features = nn.Flatten()
            size = int(np.prod(observation_shape))
        self.fc = nn.Sequential(_orthogonal(nn.Linear(size, hidden)), nn.ReLU())
        self.num_actions = num_actions
        self.heads = nn.Linear(hidden, num_actions + 1)          # policy logits, then the value
        with torch.no_grad():
            self.heads.weight[:num_actions] = nn.init.orthogonal_(torch.empty(num_actions, hidden), 0.01)
            self.heads.weight[num_actions:] = nn.init.orthogonal_(torch.empty(1, hidden), 1.0)
            self.heads.bias.zero_()

    def forward(self, observations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.heads(self.fc(self.features(observations)))
        return out[:, :self.num_actions], out[:, self.num_actions]


class _PolicyAndValueHeads(nn.Module):
    """The output layer as two modules, ``policy`` (A logits) and ``value`` (1), whose outputs are
    concatenated like the one linear layer they are cut from (its rows, so the initial function is
    the same): (N, hidden) -> (N, A + 1)."""

    def __init__(self, heads: nn.Linear, num_actions: int) -> None:
        super().__init__()
        self.policy = nn.Linear(heads.in_features, num_actions)
        self.value = nn.Linear(heads.in_features, 1)
        with torch.no_grad():
            for part, rows in ((self.policy, slice(0, num_actions)), (self.value, slice(num_actions, None))):
                part.weight.copy_(heads.weight[rows])
                part.bias.copy_(heads.bias[rows])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.policy(features), self.value(features)], dim=-1)


class _LowRankHeads(nn.Module):
    """The output layer as W = sum_n sigma_n u_n v_n^T plus a bias, with u_n, v_n and the raw
    singular values free parameters: Neurocoder's factorised, ordered form of one program without
    its memory and reads (a control for the ``constant_context`` probe). u and v start with
    orthonormal columns; sigma starts small (raw -3: sigma_n ~ 0.05 x (rank - n + 1)), so the
    initial logits are near zero as under the plain head's 0.01 gain. No orthogonality loss (it
    has no memory); ``layer_init`` does not apply. (N, hidden) -> (N, out)."""

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.u = nn.Parameter(nn.init.orthogonal_(torch.empty(in_features, rank)))
        self.v = nn.Parameter(nn.init.orthogonal_(torch.empty(out_features, rank)))
        self.raw_sigma = nn.Parameter(torch.full((rank,), -3.0))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return ((features @ self.u) * neurocoder.singular_values(self.raw_sigma)) @ self.v.T + self.bias


class _ProbeContext(nn.Module):
    """A Neurocoder output layer whose composer reads something other than the live features:
    ``'detached'`` the features with their gradient stopped (built with ``context_features`` =
    hidden; the torso then learns only through the applied program), ``'constant'`` a single 1
    (built with ``context_features=1``: one learned program for every input).
    (N, hidden) -> (N, out)."""

    CONTEXT_FEATURES = {"detached": None, "constant": 1}     # None: the layer's input size

    def __init__(self, layer: nn.Module, mode: str) -> None:
        super().__init__()
        self.layer, self.mode = layer, mode

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.mode == "detached":
            return self.layer(features, context=features.detach())
        return self.layer(features, context=features.new_ones(*features.shape[:-1], 1))


class _ScaledInputGradient(nn.Module):
    """``layer(h)`` in the forward; in the backward the gradient that reaches ``h`` (the torso's
    features) through ``layer`` is multiplied by ``scale``, while ``layer``'s own parameters get
    their full gradient. (N, hidden) -> whatever ``layer`` returns."""

    def __init__(self, layer: nn.Module, scale: float) -> None:
        super().__init__()
        self.layer, self.scale = layer, scale

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        stopped = features.detach()
        # stopped + scale * (features - stopped) equals features in value; its gradient is scale.
        return self.layer(stopped + self.scale * (features - stopped))


class _AddedHeads(nn.Module):
    """``static(h) + scale * program(h)``: the plain output layer (``static``, kept with its
    initialisation) and a second layer of the same shape (``program``, converted to Neurocoder by
    :func:`build_agent`) whose output enters through ``scale`` (out,), initialised to 0. At the
    start the head is the plain one exactly; the program's parameters receive gradient once the
    scale has moved off 0. (N, hidden) -> (N, out)."""

    def __init__(self, heads: nn.Linear) -> None:
        super().__init__()
        self.static = heads
        self.program = nn.Linear(heads.in_features, heads.out_features)
        self.scale = nn.Parameter(torch.zeros(heads.out_features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.static(features) + self.scale * self.program(features)


def build_agent(variant: str, observation_shape, num_actions: int, hidden: int = 128,
                layer_options: dict | None = None, init: str = "random",
                detach_context: bool = False, constant_context: bool = False,
                torso_grad_scale: float = 1.0) -> ActorCritic:
    agent = ActorCritic(observation_shape, num_actions, hidden)
    options = {**presets.layer_options("default"), **(layer_options or {})}
    if (detach_context or constant_context) and variant != "nc-heads":
        raise ValueError(f"detach_context / constant_context=True is a probe of the nc-heads variant, not of {variant!r}")
    probe = "detached" if detach_context else "constant" if constant_context else None
    if variant == "nc-heads" and probe:
        context_features = _ProbeContext.CONTEXT_FEATURES[probe] or hidden
        neurocoder.convert(agent, ["heads"], init=init, **{**options, "context_features": context_features})
        agent.heads = _ProbeContext(agent.heads, probe)
    elif variant == "nc-heads":
        neurocoder.convert(agent, ["heads"], init=init, **options)
    elif variant == "nc-fc":
        neurocoder.convert(agent, ["fc.0", "heads"], init=init, **options)
    elif variant == "lowrank-heads":
        agent.heads = _LowRankHeads(hidden, num_actions + 1, options["rank"])
    elif variant == "nc-policy":
        agent.heads = _PolicyAndValueHeads(agent.heads, num_actions)
        neurocoder.convert(agent, ["heads.policy"], init=init, **options)
    elif variant == "nc-two-heads":
        agent.heads = _PolicyAndValueHeads(agent.heads, num_actions)
        neurocoder.convert(agent, ["heads.policy", "heads.value"], init=init, **options)
    elif variant == "nc-added-heads":
        agent.heads = _AddedHeads(agent.heads)
        neurocoder.convert(agent, ["heads.program"], init=init, **options)
    elif variant == "nc-conv":
        neurocoder.convert(agent, ["features.0"], init=init, **options)
    elif variant != "plain":
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(AGENT_VARIANTS)}")
    if torso_grad_scale != 1.0:
        _scale_torso_gradient(agent, variant, torso_grad_scale)
    return agent


def _scale_torso_gradient(agent: ActorCritic, variant: str, scale: float) -> None:
    """Wrap the output layer's Neurocoder parts in :class:`_ScaledInputGradient`."""
    if variant in ("plain", "lowrank-heads", "nc-fc", "nc-conv"):
        raise ValueError(f"torso_grad_scale applies to a Neurocoder output layer; variant {variant!r} has none "
                         f"outside the torso")
    if variant == "nc-heads":
        agent.heads = _ScaledInputGradient(agent.heads, scale)
    elif variant == "nc-added-heads":
        agent.heads.program = _ScaledInputGradient(agent.heads.program, scale)
    else:                                                    # nc-policy, nc-two-heads
        agent.heads.policy = _ScaledInputGradient(agent.heads.policy, scale)
        if variant == "nc-two-heads":
            agent.heads.value = _ScaledInputGradient(agent.heads.value, scale)


def _parameter_groups(agent: nn.Module, lr: float, neurocoder_lr_scale: float,
                      routing_lr_scale: float = 1.0) -> list[dict]:
    """Adam's parameter groups, each with its ``lr_scale`` (kept for the annealing): everything at
    lr, except the Neurocoder layers' parameters at lr x neurocoder_lr_scale, and among them what
    decides the reads (``neurocoder.routing_parameters``) at lr x neurocoder_lr_scale x
    routing_lr_scale. Parameters of equal scale share one group, in order of first appearance
    (so with both scales 1 there is one group, as before either option existed)."""
    layered = {id(p) for m in agent.modules() if isinstance(m, neurocoder.NeurocoderLayer) for p in m.parameters()}
    routing = {id(p) for _, p in neurocoder.routing_parameters(agent)}
    groups: dict[float, list] = {}
    for p in agent.parameters():
        scale = 1.0
        if id(p) in layered:
            scale = neurocoder_lr_scale * (routing_lr_scale if id(p) in routing else 1.0)
        groups.setdefault(scale, []).append(p)
    return [{"params": params, "lr": lr * scale, "lr_scale": scale} for scale, params in groups.items()]


def generalized_advantages(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor,
                           next_value: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """GAE (Schulman et al. 2016). All (T, N) but ``next_value`` (N,), the value of the
    observation after the last step. ``dones[t]`` = 1 marks that an episode ended with step t
    (the observation after it starts a new episode), so nothing is bootstrapped across it."""
    steps = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(next_value)
    for t in reversed(range(steps)):
        following = next_value if t == steps - 1 else values[t + 1]
        nonterminal = 1.0 - dones[t]
        delta = rewards[t] + gamma * following * nonterminal - values[t]
        last = delta + gamma * lam * nonterminal * last
        advantages[t] = last
    return advantages


class _Seed:
    """One seed's agent, optimiser, environments, rollout buffers and counters."""

    def __init__(self, cfg: PPOConfig, seed_index: int) -> None:
        self.cfg = cfg
        self.seed = cfg.seed * 1000 + seed_index
        self.seed_index = seed_index
        random.seed(self.seed)
        np.random.seed(self.seed)
        torch.manual_seed(self.seed)
        self.envs = make_vector_env(cfg.env, cfg.num_envs, self.seed)
        self.agent = build_agent(cfg.variant, self.envs.observation_shape, self.envs.num_actions, cfg.hidden,
                                 cfg.layer_options, cfg.layer_init, cfg.detach_context,
                                 cfg.constant_context, cfg.torso_grad_scale)
        # foreach: one call per step for all tensors instead of ~10 per tensor (on a CPU PyTorch
        # otherwise loops in Python; the Neurocoder agent has 15 tensors, the plain one 6). The
        # same arithmetic: parameters stay bit-identical (tests/test_rl.py).
        self.optimizer = torch.optim.Adam(_parameter_groups(self.agent, cfg.lr, cfg.neurocoder_lr_scale,
                                                            cfg.routing_lr_scale), lr=cfg.lr,
                                          eps=1e-5, foreach=True)
        self.batch = cfg.num_envs * cfg.num_steps
        self.num_updates = max(1, cfg.total_frames // (self.batch * self.envs.frames_per_step))
        self.update = 0
        self.steps = 0
        self.seconds = 0.0
        self.observations = self.envs.reset()
        self.generator = torch.Generator().manual_seed(self.seed)

    def state(self) -> dict:
        return {"seed_index": self.seed_index, "update": self.update, "steps": self.steps, "seconds": self.seconds,
                "agent": self.agent.state_dict(), "optimizer": self.optimizer.state_dict(),
                "observations": self.observations, "envs": self.envs.state(),
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                        "generator": self.generator.get_state()}}

    def load(self, state: dict) -> None:
        self.agent.load_state_dict(state["agent"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.update, self.steps, self.seconds = state["update"], state["steps"], state["seconds"]
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        self.generator.set_state(state["rng"]["generator"])
        if self.envs.resumable_state:
            self.envs.load_state(state["envs"])
            self.observations = state["observations"]
        else:
            # Environments that cannot be saved restart with a seed derived from the update count.
            self.envs.seed = self.seed + 7919 * self.update
            self.observations = self.envs.reset()

    def train_update(self) -> tuple[dict, list]:
        cfg, agent, n, t_max = self.cfg, self.agent, self.cfg.num_envs, self.cfg.num_steps
        if cfg.anneal_lr:
            for group in self.optimizer.param_groups:
                group["lr"] = cfg.lr * group.get("lr_scale", 1.0) * (1.0 - self.update / self.num_updates)
        start = time.perf_counter()
        obs_buffer = torch.empty(t_max, n, *self.envs.observation_shape)
        actions = torch.empty(t_max, n, dtype=torch.long)
        log_probs, rewards, dones, values = (torch.empty(t_max, n) for _ in range(4))
        episodes = []
        agent.eval()
        # The parameters stay fixed through the rollout: Neurocoder layers compute their keys and
        # joined composer weight once instead of at each of the t_max small forward passes.
        with torch.no_grad(), neurocoder.reuse_programs(agent):
            for t in range(t_max):
                obs_buffer[t] = self.observations
                logits, value = agent(self.observations)
                distribution = torch.distributions.Categorical(logits=logits)
                action = distribution.sample()
                actions[t], log_probs[t], values[t] = action, distribution.log_prob(action), value
                self.observations, reward, done, finished = self.envs.step(action.numpy())
                rewards[t], dones[t] = reward, done.float()
                self.steps += n
                episodes += [(self.steps * self.envs.frames_per_step, r, length) for r, length in finished]
            _, next_value = agent(self.observations)
            advantages = generalized_advantages(rewards, values, dones, next_value, cfg.gamma, cfg.gae_lambda)
            returns = advantages + values
        flat = {"obs": obs_buffer.flatten(0, 1), "actions": actions.flatten(), "log_probs": log_probs.flatten(),
                "advantages": advantages.flatten(), "returns": returns.flatten(), "values": values.flatten()}
        agent.train()
        minibatch = self.batch // cfg.num_minibatches
        clip_fractions, kls, grad_norms, stats, epochs = [], [], [], {}, 0
        for _ in range(cfg.update_epochs):
            epochs += 1
            order = torch.randperm(self.batch, generator=self.generator)
            for i in range(0, self.batch, minibatch):
                index = order[i:i + minibatch]
                logits, value = agent(flat["obs"][index])
                distribution = torch.distributions.Categorical(logits=logits)
                new_log_prob = distribution.log_prob(flat["actions"][index])
                log_ratio = new_log_prob - flat["log_probs"][index]
                ratio = log_ratio.exp()
                advantage = flat["advantages"][index]
                advantage = (advantage - advantage.mean()) / (advantage.std() + 1e-8)
                policy_loss = torch.max(-advantage * ratio,
                                        -advantage * ratio.clamp(1 - cfg.clip_coef, 1 + cfg.clip_coef)).mean()
                value_loss = 0.5 * (value - flat["returns"][index]).pow(2).mean()
                entropy = distribution.entropy().mean()
                loss = (policy_loss + cfg.vf_coef * value_loss - cfg.ent_coef * entropy
                        + neurocoder.regularization(agent, cfg.orthogonality_weight))
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                # The norm before clipping: above max_grad_norm every parameter's step shrinks.
                grad_norms.append(nn.utils.clip_grad_norm_(agent.parameters(), cfg.max_grad_norm).item())
                self.optimizer.step()
                clip_fractions.append(((ratio - 1).abs() > cfg.clip_coef).float().mean().item())
                with torch.no_grad():           # Schulman's low-variance estimator of KL(old || new)
                    kls.append(((ratio - 1) - log_ratio).mean().item())
                stats = {"policy_loss": policy_loss.item(), "value_loss": value_loss.item(),
                         "entropy": entropy.item()}
            if cfg.target_kl is not None and kls[-1] > cfg.target_kl:
                break
        seconds = time.perf_counter() - start
        self.seconds += seconds
        self.update += 1
        record = {"seed": self.seed_index, "update": self.update, "frames": self.steps * self.envs.frames_per_step,
                  "steps_per_second": self.batch / seconds, "clip_fraction": sum(clip_fractions) / len(clip_fractions),
                  "approx_kl": sum(kls) / len(kls), "max_approx_kl": max(kls), "epochs": epochs,
                  "grad_norm": sum(grad_norms) / len(grad_norms),
                  "clipped_fraction": sum(g > cfg.max_grad_norm for g in grad_norms) / len(grad_norms),
                  "explained_variance": explained_variance(flat["returns"], flat["values"]), **stats}
        return record, episodes


def explained_variance(returns: torch.Tensor, values: torch.Tensor) -> float | None:
    """CleanRL's diagnostic of the value head: 1 - Var(returns - values) / Var(returns) over one
    rollout, both (N,). 1: the values predict the returns; 0: no better than a constant; < 0: worse.
    None when the returns do not vary (nothing to explain)."""
    return_variance = returns.var()
    if not return_variance > 0:
        return None
    return (1 - (returns - values).var() / return_variance).item()


def run_ppo(cfg: PPOConfig, out: str | os.PathLike, resume: bool = False, preset: str | None = None,
            quiet: bool = False) -> dict:
    """Train ``cfg.seeds`` agents on ``cfg.env``; returns ``results.json``'s dict."""
    run, out, config, say = start_seeded_run(cfg, "rl", out, resume, preset, quiet)
    checkpoint = out / "checkpoint.pt"
    for seed_index in range(cfg.seeds):
        seed_file = out / "seeds" / f"seed-{seed_index:02d}.json"
        if seed_file.is_file():
            continue
        trainer = _Seed(cfg, seed_index)
        if checkpoint.is_file():
            try:
                state = torch.load(checkpoint, map_location="cpu", weights_only=False)
            except Exception as error:
                raise ValueError(f"{checkpoint} is not a readable checkpoint ({error}); delete it to restart seed "
                                 f"{seed_index} from its first update") from error
            if state.get("seed_index") == seed_index:
                trainer.load(state)
                _truncate_logs(out, seed_index, trainer.update, trainer.steps * trainer.envs.frames_per_step)
                say(f"seed {seed_index}: resumed after update {trainer.update}")
        if trainer.update == 0:
            say(f"{cfg.env} / {cfg.variant} / seed {seed_index}: {trainer.num_updates} updates of {trainer.batch} steps; "
                f"{sum(p.numel() for p in trainer.agent.parameters()):,} parameters")
        with Progress(trainer.num_updates, f"seed {seed_index}", enabled=None if not quiet else False) as bar:
            bar.count = trainer.update
            recent: list[float] = []
            while trainer.update < trainer.num_updates:
                record, episodes = trainer.train_update()
                with open(out / "episodes.jsonl", "a") as handle:
                    for frame, episode_return, length in episodes:
                        handle.write(json.dumps({"seed": seed_index, "frame": frame, "return": episode_return,
                                                 "length": length}) + "\n")
                recent = (recent + [r for _, r, _ in episodes])[-100:]
                run.log(**record)
                bar.update(1, f"return {np.mean(recent) if recent else float('nan'):.1f}, "
                              f"{record['steps_per_second']:.0f} steps/s")
                if trainer.update % cfg.checkpoint_every == 0 or trainer.update == trainer.num_updates:
                    atomic_torch_save(trainer.state(), checkpoint)
        trainer.envs.close()
        episodes = [e for e in _read_jsonl(out / "episodes.jsonl") if e["seed"] == seed_index]
        last = [e["return"] for e in episodes[-100:]]
        result = {"seed_index": seed_index, "seed": trainer.seed, "episodes": len(episodes),
                  "final_return": float(np.mean(last)) if last else float("nan"),
                  "frames": trainer.steps * trainer.envs.frames_per_step, "agent_steps": trainer.steps,
                  "steps_per_second": trainer.steps / trainer.seconds if trainer.seconds else float("nan"),
                  "parameters": sum(p.numel() for p in trainer.agent.parameters())}
        atomic_write_text(seed_file, json.dumps(result, indent=2))
        checkpoint.unlink(missing_ok=True)
        say(f"seed {seed_index}: final return (last 100 episodes) {result['final_return']:.2f}, "
            f"{result['steps_per_second']:.0f} steps/s")
    seeds = finished_seeds(out)
    finals = torch.tensor([s["final_return"] for s in seeds], dtype=torch.float64)
    results = {"config": config, "seeds": len(seeds), "final_return": finals.tolist(),
               "final_return_mean": finals.mean().item(),
               "final_return_std": finals.std().item() if len(seeds) > 1 else 0.0,
               "steps_per_second": float(np.mean([s["steps_per_second"] for s in seeds])),
               "frames": seeds[0]["frames"], "parameters": seeds[0]["parameters"]}
    run.write_results(results)
    say(f"{cfg.env} / {cfg.variant}: final return {results['final_return_mean']:.2f} +- "
        f"{results['final_return_std']:.2f} over {len(seeds)} seeds; {results['steps_per_second']:.0f} steps/s")
    return results


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_logs(out: Path, seed_index: int, update: int, frames: int) -> None:
    """Drop log lines a killed run wrote after its last checkpoint, so a resumed run logs each
    update and episode once."""
    for name, keep in (("metrics.jsonl", lambda r: r.get("seed") != seed_index or r["update"] <= update),
                       ("episodes.jsonl", lambda r: r.get("seed") != seed_index or r["frame"] <= frames)):
        path = out / name
        rows = [r for r in _read_jsonl(path) if keep(r)]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
