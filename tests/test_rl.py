"""Video-game agents: environments, GAE, variants, PPO run folders, resume after a kill."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import neurocoder
from neurocoder.report import load_runs, write_report
from neurocoder.report_rl import rl_tables
from neurocoder.train.rl import ppo as ppo_module
from neurocoder.train.rl.envs import make_vector_env
from neurocoder.train.rl.ppo import PPOConfig, build_agent, explained_variance, generalized_advantages, run_ppo


def test_minatar_vector_env_steps_and_restores_its_state():
    env = make_vector_env("minatar:space_invaders", 3, seed=0)
    obs = env.reset()
    assert obs.shape == (3, 6, 10, 10) and env.num_actions == 4
    rng = np.random.default_rng(0)
    for _ in range(30):
        env.step(rng.integers(0, env.num_actions, 3))
    saved = env.state()
    import pickle
    copy = make_vector_env("minatar:space_invaders", 3, seed=99)
    copy.load_state(pickle.loads(pickle.dumps(saved)))
    actions = rng.integers(0, env.num_actions, (40, 3))
    a = [env.step(x)[1] for x in actions]
    b = [copy.step(x)[1] for x in actions]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="unknown MinAtar game 'pacman'"):
        make_vector_env("minatar:pacman", 1, 0)


def test_episodes_are_reported_when_they_end():
    env = make_vector_env("minatar:breakout", 4, seed=1)
    env.reset()
    finished = []
    for _ in range(400):
        _, _, dones, done_now = env.step(np.random.default_rng(0).integers(0, env.num_actions, 4))
        finished += done_now
        assert len(done_now) == int(dones.sum())
    assert finished and all(length > 0 for _, length in finished)


def test_gym_env_and_errors():
    env = make_vector_env("CartPole-v1", 2, seed=0)
    assert env.reset().shape == (2, 4) and env.num_actions == 2
    with pytest.raises(ValueError, match="discrete actions"):
        make_vector_env("Pendulum-v1", 1, 0)


def test_gae_matches_a_hand_computation():
    rewards = torch.tensor([[1.0], [0.0], [2.0]])
    values = torch.tensor([[0.5], [0.4], [0.3]])
    dones = torch.tensor([[0.0], [1.0], [0.0]])
    next_value = torch.tensor([0.2])
    gamma, lam = 0.9, 0.8
    d2 = 2.0 + gamma * 0.2 - 0.3
    d1 = 0.0 - 0.4                                   # the episode ended with step 1: no bootstrap
    d0 = 1.0 + gamma * 0.4 - 0.5
    expected = torch.tensor([[d0 + gamma * lam * d1], [d1], [d2]])
    torch.testing.assert_close(generalized_advantages(rewards, values, dones, next_value, gamma, lam), expected)


def test_agent_variants_convert_the_named_layers():
    plain = build_agent("plain", (4, 10, 10), 3)
    heads = build_agent("nc-heads", (4, 10, 10), 3)
    every = build_agent("nc-fc", (4, 10, 10), 3)
    assert not any(isinstance(m, neurocoder.NeurocoderLinear) for m in plain.modules())
    assert isinstance(heads.heads, neurocoder.NeurocoderLinear) and type(plain.heads) is torch.nn.Linear
    assert type(heads.fc[0]) is torch.nn.Linear and isinstance(every.fc[0], neurocoder.NeurocoderLinear)
    logits, value = every(torch.rand(5, 4, 10, 10))
    assert logits.shape == (5, 3) and value.shape == (5,)
    atari = build_agent("nc-heads", (4, 84, 84), 6)
    assert atari(torch.rand(2, 4, 84, 84))[0].shape == (2, 6)
    # nc-conv: only the torso's convolution composes its filters; fc and heads stay plain.
    conv = build_agent("nc-conv", (4, 10, 10), 3, layer_options={"num_programs": 16, "rank": 16})
    assert isinstance(conv.features[0], neurocoder.NeurocoderConv2d)
    assert type(conv.fc[0]) is torch.nn.Linear and type(conv.heads) is torch.nn.Linear
    torch.testing.assert_close(conv.heads.weight[:3].norm(dim=1), plain.heads.weight[:3].norm(dim=1))
    observations = torch.rand(5, 4, 10, 10).round()
    logits, value = conv(observations)
    assert logits.shape == (5, 3) and value.shape == (5,)
    # Its filters follow the observation: the same board filtered with the filters another board
    # composes (its pooled channels as the context) gives other features.
    layer = conv.features[0]
    own = layer(observations)
    torch.testing.assert_close(own, layer(observations, context=observations.mean(dim=(2, 3))))
    assert not torch.allclose(own, layer(observations, context=observations.flip(0).mean(dim=(2, 3))))
    with pytest.raises(ValueError, match="torso_grad_scale applies to a Neurocoder output layer"):
        _tiny(variant="nc-conv", torso_grad_scale=0.5).check()


def test_nc_two_heads_composes_the_policy_and_the_value_apart():
    """nc-two-heads: the logits and the value each come from a Neurocoder layer of their own, so
    the value's gradient reaches only the value layer (and the torso), the policy's only the
    policy layer (and the torso)."""
    observations = torch.rand(16, 4, 10, 10)
    agent = build_agent("nc-two-heads", (4, 10, 10), 3)
    assert isinstance(agent.heads.policy, neurocoder.NeurocoderLinear)
    assert isinstance(agent.heads.value, neurocoder.NeurocoderLinear)
    assert (agent.heads.policy.out_features, agent.heads.value.out_features) == (3, 1)
    logits, value = agent(observations)
    assert logits.shape == (16, 3) and value.shape == (16,)
    value.sum().backward(retain_graph=True)
    assert all(p.grad is None or not p.grad.any() for p in agent.heads.policy.parameters())
    assert agent.heads.value.memory.u_values.grad.abs().sum() > 0 and agent.fc[0].weight.grad.abs().sum() > 0
    agent.zero_grad(set_to_none=True)
    logits.sum(0)[1].backward()
    assert all(p.grad is None or not p.grad.any() for p in agent.heads.value.parameters())
    assert agent.heads.policy.memory.u_values.grad.abs().sum() > 0


def test_nc_added_heads_starts_as_the_plain_agent_and_then_learns_the_program():
    """nc-added-heads: with the same seed its initial logits and value equal the plain agent's
    exactly (the Neurocoder layer enters through a scale of 0); the first gradient reaches only the
    scale among the head's new parameters, and once the scale is off 0 the program learns too."""
    observations = torch.rand(16, 4, 10, 10)
    torch.manual_seed(0)
    plain = build_agent("plain", (4, 10, 10), 3)
    torch.manual_seed(0)
    agent = build_agent("nc-added-heads", (4, 10, 10), 3)
    assert isinstance(agent.heads.program, neurocoder.NeurocoderLinear)
    assert type(agent.heads.static) is torch.nn.Linear
    for ours, theirs in zip(agent(observations), plain(observations)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    logits, value = agent(observations)
    (logits.square().sum() + value.sum()).backward()
    assert agent.heads.scale.grad.abs().sum() > 0
    assert all(p.grad is None or not p.grad.any() for p in agent.heads.program.parameters())
    agent.zero_grad(set_to_none=True)
    with torch.no_grad():
        agent.heads.scale.fill_(0.5)
    logits, value = agent(observations)
    (logits.square().sum() + value.sum()).backward()
    assert agent.heads.program.memory.u_values.grad.abs().sum() > 0


def test_nc_policy_variant_keeps_the_plain_value_row():
    """nc-policy: the logits come from a Neurocoder layer, the value from the plain agent's own
    value row (cut from the same initial output layer, so with the same seed the initial values
    agree exactly), and the value's gradients do not reach the Neurocoder layer."""
    observations = torch.rand(16, 4, 10, 10)
    torch.manual_seed(0)
    plain = build_agent("plain", (4, 10, 10), 3)
    torch.manual_seed(0)
    split = build_agent("nc-policy", (4, 10, 10), 3)
    assert isinstance(split.heads.policy, neurocoder.NeurocoderLinear) and type(split.heads.value) is torch.nn.Linear
    logits, value = split(observations)
    assert logits.shape == (16, 3)
    torch.testing.assert_close(value, plain(observations)[1])
    value.sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in split.heads.policy.parameters())
    assert split.heads.value.weight.grad is not None and split.fc[0].weight.grad is not None


def test_lowrank_heads_control_is_the_ordered_factorised_form_without_a_memory():
    """The control's output layer is bias + sum_n sigma_n (h . u_n) v_n with sigma positive and
    descending: rank at most r, no Neurocoder layer anywhere, near-zero initial logits, and
    every factor learns."""
    torch.manual_seed(0)
    agent = build_agent("lowrank-heads", (4, 10, 10), 5, layer_options={"rank": 3})
    assert not any(isinstance(m, neurocoder.NeurocoderLayer) for m in agent.modules())
    head = agent.heads
    sigma = neurocoder.singular_values(head.raw_sigma)
    assert (sigma > 0).all() and (sigma[:-1] > sigma[1:]).all()
    features = torch.randn(7, 128)
    expected = sum(sigma[n] * (features @ head.u[:, n]).unsqueeze(-1) * head.v[:, n] for n in range(3)) + head.bias
    torch.testing.assert_close(head(features), expected)
    weight = torch.stack([head(e) - head.bias for e in torch.eye(128)])          # (128, A + 1)
    assert torch.linalg.matrix_rank(weight.detach()) == 3
    logits, value = agent(torch.rand(16, 4, 10, 10))
    assert logits.shape == (16, 5) and value.shape == (16,) and logits.abs().max() < 0.5
    (logits.square().sum() + value.sum()).backward()
    assert all(p.grad is not None and p.grad.any() for p in head.parameters())


def test_detach_context_cuts_only_the_composers_gradient_to_the_torso():
    """The probe composes the output layer's program from the features with their gradient
    stopped: same outputs as composing from the live features, the composer still learns, but
    the features' gradient is only the one through the applied program."""
    torch.manual_seed(0)
    agent = build_agent("nc-heads", (4, 10, 10), 3, detach_context=True)
    layer = agent.heads.layer
    assert isinstance(layer, neurocoder.NeurocoderLinear) and layer.context_features == 128
    features = agent.fc(agent.features(torch.rand(16, 4, 10, 10))).detach().requires_grad_(True)
    out = agent.heads(features)
    torch.testing.assert_close(out, layer(features, context=features))
    (cut,) = torch.autograd.grad(out.square().sum(), features, retain_graph=True)
    (full,) = torch.autograd.grad(layer(features, context=features).square().sum(), features)
    assert not torch.allclose(cut, full)
    out.square().sum().backward()
    assert all(p.grad is not None for p in layer.composer.parameters())
    with pytest.raises(ValueError, match="is a probe of the nc-heads variant"):
        build_agent("plain", (4, 10, 10), 3, detach_context=True)


def test_torso_grad_scale_scales_only_the_gradient_the_torso_gets_through_the_neurocoder_layer():
    """The probe leaves the forward and the Neurocoder layer's own gradients as they are, and
    multiplies the gradient that reaches the torso's features through that layer (nc-policy: the
    policy's; the plain value row's is untouched)."""
    def build(scale):
        torch.manual_seed(0)
        return build_agent("nc-policy", (4, 10, 10), 3, torso_grad_scale=scale)

    full, scaled = build(1.0), build(0.25)
    features = torch.randn(16, 128)
    grads = {}
    for name, agent in (("full", full), ("scaled", scaled)):
        h = features.clone().requires_grad_(True)
        out = agent.heads(h)
        (policy_grad,) = torch.autograd.grad(out[:, :3].square().sum(), h, retain_graph=True)
        (value_grad,) = torch.autograd.grad(out[:, 3].square().sum(), h, retain_graph=True)
        out[:, :3].square().sum().backward()
        layer = [m for m in agent.modules() if isinstance(m, neurocoder.NeurocoderLinear)]
        assert len(layer) == 1
        grads[name] = (out.detach(), policy_grad, value_grad, [p.grad for p in layer[0].parameters()])
    torch.testing.assert_close(grads["scaled"][0], grads["full"][0], rtol=0, atol=0)
    torch.testing.assert_close(grads["scaled"][1], 0.25 * grads["full"][1])
    assert grads["full"][1].abs().max() > 0
    torch.testing.assert_close(grads["scaled"][2], grads["full"][2], rtol=0, atol=0)
    for a, b in zip(grads["scaled"][3], grads["full"][3]):
        torch.testing.assert_close(a, b)
    # nc-heads: the whole output layer is wrapped, so the value's share is scaled too.
    torch.manual_seed(0)
    heads = build_agent("nc-heads", (4, 10, 10), 3, torso_grad_scale=0.0).heads
    h = torch.randn(8, 128, requires_grad=True)
    heads(h).square().sum().backward()
    assert h.grad is None or not h.grad.any()
    with pytest.raises(ValueError, match="must be in \\[0, 1\\]"):
        PPOConfig(variant="nc-policy", torso_grad_scale=1.5).check()
    with pytest.raises(ValueError, match="does not have"):
        PPOConfig(variant="nc-fc", torso_grad_scale=0.5).check()
    with pytest.raises(ValueError, match="set for variant='plain'"):
        PPOConfig(variant="plain", torso_grad_scale=0.5).check()
    with pytest.raises(ValueError, match="has none"):
        build_agent("lowrank-heads", (4, 10, 10), 3, torso_grad_scale=0.5)


def test_constant_context_composes_one_program_for_every_input():
    """The probe's composer reads a constant: the composed weight is the same for all inputs, so
    the head is linear in the features (f(a + b) = f(a) + f(b) - f(0) with f(0) its bias)."""
    torch.manual_seed(0)
    agent = build_agent("nc-heads", (4, 10, 10), 3, constant_context=True)
    layer = agent.heads.layer
    assert layer.context_features == 1
    a, b = torch.randn(5, 128), torch.randn(5, 128)
    head = agent.heads
    torch.testing.assert_close(head(a + b), head(a) + head(b) - head(torch.zeros(5, 128)), rtol=1e-4, atol=1e-5)
    live = build_agent("nc-heads", (4, 10, 10), 3)
    assert not torch.allclose(live.heads(a + b), live.heads(a) + live.heads(b) - live.heads(torch.zeros(5, 128)),
                              rtol=1e-4, atol=1e-5)
    head(a).square().sum().backward()
    assert all(p.grad is not None for p in layer.composer.parameters())
    with pytest.raises(ValueError, match="choose one probe"):
        PPOConfig(detach_context=True, constant_context=True).check()


def test_svd_layer_init_starts_the_neurocoder_agent_as_the_plain_agent():
    """layer_init='svd': the Neurocoder head is seeded from the plain head it replaces, so at the
    start both agents compute nearly the same policy and value (a random head does not)."""
    observations = torch.rand(64, 4, 10, 10)
    outputs = {}
    for name, variant, init in (("plain", "plain", "random"), ("svd", "nc-heads", "svd"),
                                ("random", "nc-heads", "random")):
        torch.manual_seed(0)                                   # the same torso for all three
        with torch.no_grad():
            outputs[name] = build_agent(variant, (4, 10, 10), 3, init=init)(observations)
    (logits, value), (plain_logits, plain_value) = outputs["svd"], outputs["plain"]
    svd_error = (value - plain_value).abs().max()
    assert svd_error < 0.2 * plain_value.abs().mean()
    assert (logits - plain_logits).abs().max() < 0.01
    assert (outputs["random"][1] - plain_value).abs().max() > 3 * svd_error
    with pytest.raises(ValueError, match="layer_init='orthogonal'"):
        _tiny(layer_init="orthogonal").check()


def test_neurocoder_lr_scale_sets_the_neurocoder_layers_learning_rate():
    trainer = ppo_module._Seed(_tiny(variant="nc-heads", neurocoder_lr_scale=0.25), 0)
    rest, layer = trainer.optimizer.param_groups
    head = {id(p) for p in trainer.agent.heads.parameters()}
    assert {id(p) for p in layer["params"]} == head and not head & {id(p) for p in rest["params"]}
    assert layer["lr"] == 0.25 * rest["lr"] == 0.25 * trainer.cfg.lr
    trainer.train_update()
    trainer.train_update()                       # annealed from the second update on; the ratio stays
    assert layer["lr"] == pytest.approx(0.25 * rest["lr"]) and rest["lr"] < trainer.cfg.lr
    same = ppo_module._Seed(_tiny(variant="nc-heads"), 0)
    assert len(same.optimizer.param_groups) == 1   # scale 1: one group, as before the option
    plain = ppo_module._Seed(_tiny(variant="plain", neurocoder_lr_scale=0.25), 0)
    assert len(plain.optimizer.param_groups) == 1 and plain.optimizer.param_groups[0]["lr"] == plain.cfg.lr
    with pytest.raises(ValueError, match="neurocoder_lr_scale=0"):
        _tiny(neurocoder_lr_scale=0).check()


def test_routing_lr_scale_slows_what_decides_the_reads():
    """routing_lr_scale: the Neurocoder layer's composer and keys (neurocoder.routing_parameters)
    get lr x neurocoder_lr_scale x routing_lr_scale; its stored programs keep lr x
    neurocoder_lr_scale; everything else lr. The plain agent refuses the setting."""
    cfg = _tiny(variant="nc-heads", routing_lr_scale=0.1, layer_options={"num_programs": 16, "rank": 4,
                                                                         "key_mode": "learned"})
    cfg.check()
    trainer = ppo_module._Seed(cfg, 0)
    groups = {group["lr_scale"]: {id(p) for p in group["params"]} for group in trainer.optimizer.param_groups}
    routing = {id(p) for _, p in neurocoder.routing_parameters(trainer.agent)}
    assert set(groups) == {1.0, 0.1} and groups[0.1] == routing
    assert id(trainer.agent.heads.memory.u_values) in groups[1.0] and id(trainer.agent.fc[0].weight) in groups[1.0]
    both = ppo_module._Seed(_tiny(variant="nc-heads", routing_lr_scale=0.1, neurocoder_lr_scale=0.5), 0)
    scales = sorted(group["lr_scale"] for group in both.optimizer.param_groups)
    assert scales == pytest.approx([0.05, 0.5, 1.0])
    with pytest.raises(ValueError, match="routing_lr_scale=0 "):
        _tiny(variant="nc-heads", routing_lr_scale=0).check()
    with pytest.raises(ValueError, match="routing_lr_scale=0.1.*no Neurocoder layer"):
        _tiny(variant="plain", routing_lr_scale=0.1).check()


def test_optimizer_steps_all_tensors_at_once_with_the_same_arithmetic():
    """The trainer's Adam takes every tensor in one foreach call (fewer fixed costs per step on a
    CPU); its updates are bit-identical to PyTorch's per-tensor loop, so earlier runs' numbers
    still follow from their seeds."""
    trainer = ppo_module._Seed(_tiny(variant="nc-heads", routing_lr_scale=0.1), 0)
    assert all(group["foreach"] for group in trainer.optimizer.param_groups)
    twin = copy.deepcopy(trainer.agent)
    loop = torch.optim.Adam(ppo_module._parameter_groups(twin, trainer.cfg.lr, 1.0, 0.1), lr=trainer.cfg.lr,
                            eps=1e-5, foreach=False)
    generator = torch.Generator().manual_seed(3)
    for _ in range(5):
        for (name, p), q in zip(trainer.agent.named_parameters(), twin.parameters()):
            p.grad = torch.randn(p.shape, generator=generator)
            q.grad = p.grad.clone()
        trainer.optimizer.step()
        loop.step()
    for (name, p), q in zip(trainer.agent.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name


def _tiny(**overrides) -> PPOConfig:
    values = dict(env="minatar:breakout", total_frames=1024, num_envs=4, num_steps=32, seeds=1, checkpoint_every=2)
    values.update(overrides)
    return PPOConfig(**values)


def test_ppo_run_folder_and_resume_after_kill(tmp_path, monkeypatch):
    straight = run_ppo(_tiny(variant="nc-heads"), tmp_path / "straight", quiet=True)
    assert straight["frames"] == 1024 and straight["seeds"] == 1
    metrics = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [m["update"] for m in metrics] == list(range(1, 9)) and all(m["steps_per_second"] > 0 for m in metrics)
    original = ppo_module._Seed.train_update
    calls = {"n": 0}

    def dies_at_update_6(self):
        calls["n"] += 1
        if calls["n"] == 6:                         # after the checkpoint of update 4 and one more update
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(ppo_module._Seed, "train_update", dies_at_update_6)
    with pytest.raises(KeyboardInterrupt):
        run_ppo(_tiny(variant="nc-heads"), tmp_path / "killed", quiet=True)
    monkeypatch.setattr(ppo_module._Seed, "train_update", original)
    resumed = run_ppo(_tiny(variant="nc-heads"), tmp_path / "killed", resume=True, quiet=True)
    episodes = lambda d: [(e["frame"], e["return"]) for e in map(json.loads, (d / "episodes.jsonl").read_text().splitlines())]
    assert episodes(tmp_path / "killed") == episodes(tmp_path / "straight")
    assert resumed["final_return"] == straight["final_return"]
    run_ppo(_tiny(), tmp_path / "plain", quiet=True)
    table = rl_tables(load_runs([tmp_path / "straight", tmp_path / "plain"]))
    assert "minatar:breakout" in table and "~10 / ~17.5" in table
    seed_rate = lambda d: json.loads((d / "seeds" / "seed-00.json").read_text())["steps_per_second"]
    ratio = seed_rate(tmp_path / "straight") / seed_rate(tmp_path / "plain")
    assert f"{seed_rate(tmp_path / 'straight'):.0f} ({ratio:.2f}x)" in table   # per seed, vs plain's same seed
    # Runs started from Python name no preset: their rows name what differs from PPOConfig's
    # defaults (checkpoint_every, which changes no figure, left out).
    summary = "Neurocoder heads (num_envs=4, num_steps=32, total_frames=1024) >= plain on"
    assert f"{summary} 1 of 1" in table or f"{summary} 0 of 1" in table
    assert "| plain (num_envs=4, num_steps=32, total_frames=1024) |" in table
    # Per-update diagnostics from metrics.jsonl: 8 updates per run, clip fraction, KL, entropy.
    diagnostics = table.split("How far each PPO update moved the policy")[1]
    rows = [line for line in diagnostics.splitlines() if line.startswith("| minatar:breakout")]
    shared = " (num_envs=4, num_steps=32, total_frames=1024)"
    assert [row.split(" | ")[1:3] for row in rows] == [["plain" + shared, "8"], ["nc-heads" + shared, "8"]]
    # The last three columns: the mean explained variance, gradient norm before clipping and share
    # of clipped minibatches over the 8 updates (of "straight": nc-heads).
    logged = [m["explained_variance"] for m in metrics if m["explained_variance"] is not None]
    assert logged and all(v <= 1.0 for v in logged)
    straight_row = [row for row in rows if " nc-heads (" in row][0]
    mean = lambda key: sum(m[key] for m in metrics) / len(metrics)
    assert straight_row.split(" | ")[-3:] == [f"{sum(logged) / len(logged):.3f}", f"{mean('grad_norm'):.3f}",
                                              f"{mean('clipped_fraction'):.2f} |"]
    # How soon each agent scores: a row per run; the entropy at the first update is metrics' first.
    early = table.split("How soon each agent starts scoring")[1].split("####")[0]
    early_rows = [line.split(" | ") for line in early.splitlines() if line.startswith("| minatar:breakout")]
    assert [row[1] for row in early_rows] == ["plain" + shared, "nc-heads" + shared]
    assert float(early_rows[1][-1].rstrip(" |")) == pytest.approx(metrics[0]["entropy"], abs=5e-4)
    assert all(row[2] == "256" for row in early_rows)                 # a quarter of the 1,024 frames
    # A Neurocoder agent seeded from the plain head's SVD is its own row, with its own count.
    run_ppo(_tiny(variant="nc-heads", layer_init="svd"), tmp_path / "svd", quiet=True)
    table = rl_tables(load_runs([tmp_path / "straight", tmp_path / "plain", tmp_path / "svd"]))
    labels = [line.split(" | ")[1] for line in table.splitlines() if line.startswith("| minatar:breakout")]
    assert labels[:3] == ["plain" + shared, "nc-heads" + shared, "nc-heads svd-init" + shared]
    assert f"seeded from the plain head (layer_init=svd){shared} >= plain on" in table and " of 1 MinAtar" in table
    write_report(load_runs([tmp_path / "straight", tmp_path / "plain"]), tmp_path / "report")
    assert (tmp_path / "report" / "rl_returns.png").is_file()


def test_explained_variance():
    returns = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert explained_variance(returns, returns) == pytest.approx(1.0)            # perfect values
    assert explained_variance(returns, torch.full((4,), 2.5)) == pytest.approx(0.0)  # a constant
    assert explained_variance(returns, -returns) < 0                           # worse than a constant
    assert explained_variance(torch.ones(4), returns) is None                 # nothing to explain


def test_bad_agent_config():
    with pytest.raises(ValueError, match="variant='nc-everything'"):
        _tiny(variant="nc-everything").check()
    with pytest.raises(ValueError, match="num_minibatches"):
        _tiny(num_minibatches=3).check()
    with pytest.raises(ValueError, match="target_kl=0"):
        _tiny(target_kl=0).check()


def test_neurocoder_settings_on_the_plain_agent_are_refused():
    """Settings of Neurocoder layers given to the plain agent, which has none, are refused by
    name instead of being recorded in the run folder as if they had applied."""
    _tiny(variant="plain").check()
    _tiny(variant="nc-heads", layer_options={"num_programs": 8, "rank": 2}, layer_init="svd").check()
    for setting, shown in ((dict(layer_options={"num_programs": 8, "rank": 4}), "layer_options="),
                           (dict(layer_init="svd"), "layer_init='svd'"),
                           (dict(neurocoder_lr_scale=0.5), "neurocoder_lr_scale=0.5"),
                           (dict(orthogonality_weight=1.0), "orthogonality_weight=1.0")):
        with pytest.raises(ValueError, match=f"{shown}.*variant='plain', which has no Neurocoder layer"):
            _tiny(variant="plain", **setting).check()
    with pytest.raises(ValueError, match="does not apply to variant='lowrank-heads'"):
        _tiny(variant="lowrank-heads", layer_init="svd").check()
    with pytest.raises(ValueError, match="does not apply to variant='nc-added-heads'.*added beside the plain head"):
        _tiny(variant="nc-added-heads", layer_init="svd").check()
    _tiny(variant="nc-added-heads").check()


def test_target_kl_stops_the_update_epochs_early():
    """Without a target every update runs all its epochs; a target below any KL a step makes
    stops each update after its first epoch (the KL of the epoch's last minibatch is checked).
    The estimate is logged either way, and is >= 0 (it is a sum of x - 1 - log x >= 0)."""
    records = {}
    for target in (None, 1e-12):
        trainer = ppo_module._Seed(_tiny(variant="nc-heads", target_kl=target, update_epochs=3), 0)
        records[target] = [trainer.train_update()[0] for _ in range(3)]
    assert [r["epochs"] for r in records[None]] == [3, 3, 3]
    assert [r["epochs"] for r in records[1e-12]] == [1, 1, 1]
    for r in records[None] + records[1e-12]:
        assert 0 <= r["approx_kl"] <= r["max_approx_kl"]
    assert records[None][0]["max_approx_kl"] > 1e-12


def test_updates_log_the_gradient_norm_before_clipping():
    """grad_norm is the mean norm before clipping; clipped_fraction the share of minibatches
    above max_grad_norm: all of them under a tiny threshold, none under a huge one."""
    logged = {}
    for threshold in (1e-9, 1e9):
        trainer = ppo_module._Seed(_tiny(variant="nc-heads", max_grad_norm=threshold), 0)
        logged[threshold] = trainer.train_update()[0]
    assert logged[1e-9]["clipped_fraction"] == 1.0 and logged[1e9]["clipped_fraction"] == 0.0
    assert logged[1e-9]["grad_norm"] > 1e-9 and logged[1e9]["grad_norm"] > 0


@pytest.mark.slow
def test_ppo_learns_cartpole(tmp_path):
    """The agent learns: CartPole's return rises well above a random policy's (~22)."""
    result = run_ppo(PPOConfig(env="CartPole-v1", total_frames=40_000, num_envs=4, num_steps=128, lr=2.5e-3,
                               seeds=1), tmp_path / "cartpole", quiet=True)
    print(f"\nCartPole final return {result['final_return_mean']:.1f}")
    assert result["final_return_mean"] > 100


@pytest.mark.slow
def test_atari_short_run(tmp_path):
    result = run_ppo(PPOConfig(env="atari:pong", total_frames=512, num_envs=2, num_steps=32, num_minibatches=2,
                               update_epochs=1, seeds=1), tmp_path / "pong", quiet=True)
    seed = json.loads((tmp_path / "pong" / "seeds" / "seed-00.json").read_text())
    assert result["frames"] == 512 and seed["agent_steps"] == 128        # 4 emulator frames per agent step


def test_unknown_atari_game_is_named_with_the_rom_it_may_mean():
    with pytest.raises(ValueError, match=r"unknown Atari game 'MsPacman': .*did you mean 'ms_pacman'\?"):
        make_vector_env("atari:MsPacman", 1, 0)
    with pytest.raises(ValueError, match=r"unknown Atari game 'nosuch': ALE names its ROMs in snake_case \("):
        make_vector_env("atari:nosuch", 1, 0)


def test_report_reads_gzipped_episodes(tmp_path):
    """Archived results keep episodes.jsonl gzipped; the report reads either form alike."""
    import gzip

    from neurocoder.report_rl import read_episodes

    lines = [{"seed": 0, "frame": 64 * i, "return": float(i), "length": 3} for i in range(5)]
    text = "\n".join(json.dumps(line) for line in lines) + "\n"
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "episodes.jsonl").write_text(text)
    (tmp_path / "packed").mkdir()
    (tmp_path / "packed" / "episodes.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    assert read_episodes(tmp_path / "plain") == read_episodes(tmp_path / "packed") == lines
    assert read_episodes(tmp_path / "missing") == []


def test_report_keeps_a_row_for_each_run_of_the_same_game_and_variant(tmp_path):
    """Two folders of one game and variant (another setting, say) are two rows, neither dropped."""
    runs = []
    for name, value in (("first", 1.5), ("second", 2.5)):
        (tmp_path / name / "seeds").mkdir(parents=True)
        runs.append({"path": str(tmp_path / name), "config": {"kind": "rl", "env": "minatar:asterix",
                                                              "variant": "nc-heads"},
                     "final_return_mean": value, "final_return_std": 0.0, "seeds": 1, "frames": 10,
                     "steps_per_second": 100.0, "parameters": 7})
    table = rl_tables(runs)
    assert "| nc-heads (first) | 1.50 +- 0.00" in table
    assert "| nc-heads (second) | 2.50 +- 0.00" in table


def test_report_labels_same_named_folders_by_the_setting_that_differs(tmp_path):
    """Two tables' folders of the same name (results/minatar/asterix-nc-heads and
    results/minatar-residual/asterix-nc-heads) are two rows named by the option that differs
    (the folder name alone would give both the same label, and one row would hide the other);
    with the same settings, parent and folder name tell them apart."""
    def runs_with(options_by_parent):
        runs = []
        for parent, options, value in options_by_parent:
            folder = tmp_path / parent / "asterix-nc-heads"
            (folder / "seeds").mkdir(parents=True, exist_ok=True)
            runs.append({"path": str(folder), "config": {"kind": "rl", "env": "minatar:asterix", "variant": "nc-heads",
                                                         "threads": 1, "layer_options": options},
                         "final_return_mean": value, "final_return_std": 0.0, "seeds": 1, "frames": 10,
                         "steps_per_second": 100.0, "parameters": 7})
        return runs

    table = rl_tables(runs_with([("minatar", {"rank": 4}, 1.5), ("minatar-residual", {"rank": 4, "residual": True}, 2.5)]))
    rows = [line for line in table.splitlines() if line.startswith("| minatar:asterix | nc-heads")]
    assert len(rows) == 2
    assert "| nc-heads | 1.50 +- 0.00" in table        # the run that left the option unset: the plain label
    assert "| nc-heads (layer_options.residual=true) | 2.50 +- 0.00" in table
    table = rl_tables(runs_with([("a", {}, 1.5), ("b", {}, 2.5)]))
    assert "| nc-heads (a/asterix-nc-heads) | 1.50" in table and "| nc-heads (b/asterix-nc-heads) | 2.50" in table


def test_report_labels_a_lone_run_by_the_settings_set_over_its_preset(tmp_path):
    """A run alone in its row (one seed's screen) is named by the top-level settings --set changed
    from its preset, not only by its layer options: a run with routing_lr_scale=0.1 never reads
    as the preset's agent. Seeds are not named; a folder without a known preset (a run started
    from Python) names what differs from PPOConfig's defaults instead."""
    from dataclasses import asdict

    from neurocoder.experiments.registry import make_config

    def run(name, overrides, preset="minatar-asterix"):
        folder = tmp_path / name
        (folder / "seeds").mkdir(parents=True)
        config = {"kind": "rl", "preset": preset, **asdict(make_config("minatar-asterix", overrides))}
        return {"path": str(folder), "config": config, "final_return_mean": 1.0, "final_return_std": 0.0,
                "seeds": 1, "frames": 10, "steps_per_second": 100.0, "parameters": 7}

    table = rl_tables([run("a", ["variant=nc-heads", "routing_lr_scale=0.1", "layer_options.key_mode=learned",
                                 "seed=3", "seeds=1"])])
    assert '| nc-heads (layer_options.key_mode="learned", routing_lr_scale=0.1) | 1.00' in table
    table = rl_tables([run("b", ["variant=nc-heads", "routing_lr_scale=0.1"], preset=None)])
    assert "| nc-heads (routing_lr_scale=0.1) | 1.00" in table
    # Two runs of one variant that share the setting: each label still names it.
    table = rl_tables([run("c", ["variant=nc-heads", "routing_lr_scale=0.1"]),
                       run("d", ["variant=nc-heads", "routing_lr_scale=0.1", "layer_options.residual=true"])])
    assert "| nc-heads (routing_lr_scale=0.1) | 1.00" in table
    assert "| nc-heads (layer_options.residual=true, routing_lr_scale=0.1) | 1.00" in table
    # A layer option both runs changed over the preset is named too.
    table = rl_tables([run("e", ["variant=nc-heads", "layer_options.rank=8"]),
                       run("f", ["variant=nc-heads", "layer_options.rank=8", "routing_lr_scale=0.1"])])
    assert "| nc-heads (layer_options.rank=8, routing_lr_scale=1.0) | 1.00" in table
    assert "| nc-heads (layer_options.rank=8, routing_lr_scale=0.1) | 1.00" in table


def test_report_counts_games_won_for_every_neurocoder_row(tmp_path):
    """The "N of M MinAtar games" line is given for each Neurocoder row, also one named by the
    settings it ran with, each against the plain agent of its game."""
    runs = []
    returns = {("asterix", "plain", None): 2.0, ("asterix", "nc-heads", None): 1.0,
               ("asterix", "nc-heads", True): 2.5, ("breakout", "plain", None): 5.0,
               ("breakout", "nc-heads", None): 6.0, ("breakout", "nc-heads", True): 7.0}
    for (game, variant, residual), value in returns.items():
        folder = tmp_path / f"{game}-{variant}-{residual}"
        (folder / "seeds").mkdir(parents=True)
        options = {"num_programs": 16, "rank": 4, **({"residual": True} if residual else {})}
        runs.append({"path": str(folder), "config": {"kind": "rl", "env": f"minatar:{game}", "variant": variant,
                                                     "layer_options": options},
                     "final_return_mean": value, "final_return_std": 0.0, "seeds": 1, "frames": 10,
                     "steps_per_second": 100.0, "parameters": 7})
    table = rl_tables(runs)
    assert "\nNeurocoder heads >= plain on 1 of 2 MinAtar games here" in table
    assert "\nNeurocoder heads (layer_options.residual=true) >= plain on 2 of 2 MinAtar games here" in table
    assert "plain >= plain" not in table and "plain (" not in table.split("|")[-1]


def test_report_names_the_options_a_lone_run_set(tmp_path):
    """A single run of a variant that set layer options is not labelled as the variant's default
    configuration; options equal to the trainer's defaults are not named."""
    runs = []
    for name, variant, options in (("a", "nc-heads", {"num_programs": 16, "rank": 4}),
                                   ("b", "nc-two-heads", {"num_programs": 16, "rank": 4, "sharpness": 20})):
        (tmp_path / name / "seeds").mkdir(parents=True)
        runs.append({"path": str(tmp_path / name), "config": {"kind": "rl", "env": "minatar:asterix", "variant": variant,
                                                              "layer_options": options},
                     "final_return_mean": 1.0, "final_return_std": 0.0, "seeds": 1, "frames": 10,
                     "steps_per_second": 100.0, "parameters": 7})
    table = rl_tables(runs)
    assert "| minatar:asterix | nc-heads | 1.00 +- 0.00" in table
    assert "| minatar:asterix | nc-two-heads (layer_options.sharpness=20) | 1.00 +- 0.00" in table


def test_report_compares_a_row_with_the_plain_agent_of_the_same_frame_budget(tmp_path):
    """Explorations mix frame budgets: a row's steps/s ratio is taken against the plain run with
    its own budget, and a row whose budget no plain run shares gets none."""
    runs = []
    for name, variant, frames, rate in (("plain-short", "plain", 300, 100.0), ("nc-short", "nc-heads", 300, 70.0),
                                        ("nc-long", "nc-heads", 3000, 50.0)):
        (tmp_path / name / "seeds").mkdir(parents=True)
        runs.append({"path": str(tmp_path / name),
                     "config": {"kind": "rl", "env": "minatar:asterix", "variant": variant, "total_frames": frames},
                     "final_return_mean": 1.0, "final_return_std": 0.0, "seeds": 1, "frames": frames,
                     "steps_per_second": rate, "parameters": 7})
    rows = {line.split(" | ")[1]: line for line in rl_tables(runs).splitlines() if line.startswith("| minatar:asterix")}
    assert set(rows) == {"plain (total_frames=300)", "nc-heads (total_frames=300)", "nc-heads (total_frames=3000)"}
    vs_plain = {label: row.split(" | ")[6] for label, row in rows.items()}    # the "vs plain" column
    assert vs_plain == {"plain (total_frames=300)": "", "nc-heads (total_frames=300)": "0.70x",
                        "nc-heads (total_frames=3000)": ""}
    assert "~17 / ~19" in rows["plain (total_frames=300)"]          # the published numbers stay beside the plain row


def test_agent_gradient_probe_shares_the_squared_norm_out(capsys):
    """scripts/probe_agent_gradients.py (README, games): per window, the tensors' shares of the
    squared gradient norm sum to 1 and name the agent's parameters, and the clipping call is
    restored afterwards."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "probe_agent_gradients", Path(__file__).resolve().parents[1] / "scripts" / "probe_agent_gradients.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    real = ppo_module.nn.utils.clip_grad_norm_
    records = probe.main(["--env", "minatar:breakout", "--updates", "3", "--every", "2", "--set", "num_envs=4",
                          "--set", "num_steps=32"])
    assert [r["update"] for r in records] == [2, 3]
    names = {n for n, _ in build_agent("nc-heads", (4, 10, 10), 3).named_parameters()}
    for record in records:
        assert sum(record["shares"].values()) == pytest.approx(1.0)
        assert set(record["shares"]) <= names and any(n.startswith("heads.memory") for n in record["shares"])
        assert record["grad_norm"] > 0 and 0 <= record["clipped_fraction"] <= 1
    assert ppo_module.nn.utils.clip_grad_norm_ is real
    assert "gradient norm before clipping" in capsys.readouterr().out


def test_probe_head_rank_script(tmp_path):
    """scripts/probe_head_rank.py (README, games): the spectrum of each output layer, a plain one's
    from its weight, a Neurocoder one's from the weight it composes per observation; the
    effective rank lies between 1 and the number of singular values."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "probe_head_rank", Path(__file__).resolve().parents[1] / "scripts" / "probe_head_rank.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    torch.testing.assert_close(probe.effective_rank(torch.tensor([[2.0, 2.0, 2.0], [1.0, 0.0, 0.0]])),
                               torch.tensor([3.0, 1.0]))
    small = ["--env", "minatar:breakout", "--updates", "2", "--every", "1", "--set", "num_envs=4", "--set", "num_steps=32"]
    plain = probe.main(small + ["--variant", "plain"])
    records = probe.main(small + ["--variant", "nc-two-heads", "--out", str(tmp_path / "rank.jsonl")])
    assert [r["update"] for r in records] == [0, 1, 2] and len((tmp_path / "rank.jsonl").read_text().splitlines()) == 3
    layer = plain[-1]["layers"]["heads"]
    assert len(layer["singular_values"]) == 4 and len(layer["policy_singular_values"]) == 3 and "sigma" not in layer
    policy, value = records[-1]["layers"]["heads.policy"], records[-1]["layers"]["heads.value"]
    assert set(records[-1]["layers"]) == {"heads.policy", "heads.value"}
    assert 1.0 <= policy["policy_effective_rank"] <= 3.0 + 1e-6 and len(policy["sigma"]) == 4
    assert value["effective_rank"] == pytest.approx(1.0) and "policy_singular_values" not in value
    assert 0.0 < policy["largest_read_u"] <= 1.0


def test_return_curves_put_one_legend_under_all_panels(tmp_path, monkeypatch):
    """One legend for the whole figure, under every panel (per-panel legends of long labels covered
    the curves), naming each variant once, with one colour per variant across panels; the saved
    image takes the legend in (it grows with the number of entries)."""
    pytest.importorskip("matplotlib")
    from neurocoder import report as report_module
    from neurocoder.report_rl import rl_figures

    def runs(count, envs=("minatar:asterix",)):
        made = []
        for env in envs:
            for i in range(count):
                folder = tmp_path / f"n{count}" / env.replace(":", "-") / f"run{i}"
                (folder / "seeds").mkdir(parents=True)
                episodes = [{"seed": 0, "frame": 50 * (j + 1), "return": float(i + j), "length": 3} for j in range(20)]
                (folder / "episodes.jsonl").write_text("\n".join(json.dumps(e) for e in episodes) + "\n")
                made.append({"path": str(folder), "config": {"kind": "rl", "env": env, "variant": "nc-heads",
                                                             "seed": i},
                             "final_return_mean": 1.0, "final_return_std": 0.0, "seeds": 1, "frames": 1000,
                             "steps_per_second": 100.0, "parameters": 7})
        return made

    plt = report_module.pyplot()
    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))     # keep them to inspect
    sizes = {}
    for count in (2, 12):
        (tmp_path / f"out{count}").mkdir()
        [path] = rl_figures(runs(count, ("minatar:asterix", "minatar:breakout")), tmp_path / f"out{count}")
        import matplotlib.image
        sizes[count] = matplotlib.image.imread(path).shape[0]          # pixel rows
    figure = figures[-1]
    assert len(figure.legends) == 1 and not any(ax.get_legend() for ax in figure.axes)
    assert len(figure.legends[0].get_texts()) == 12
    renderer = figure.canvas.get_renderer()
    legend_top = figure.legends[0].get_window_extent(renderer).y1
    assert legend_top <= min(ax.get_window_extent(renderer).y0 for ax in figure.axes if ax.get_visible())
    first, second = (ax for ax in figure.axes if ax.lines)
    assert [line.get_color() for line in first.lines] == [line.get_color() for line in second.lines]
    assert sizes[12] > sizes[2]
    for fig in figures:
        close(fig)


def test_minatar_contexts_script_counts_the_distinct_pooled_contexts():
    """scripts/minatar_contexts.py (README, games): distinct contexts over all frames, per
    minibatch and per rollout step, each between 1 and the frames it counts over."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "minatar_contexts", Path(__file__).resolve().parents[1] / "scripts" / "minatar_contexts.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    counts = script.main(["--games", "breakout", "asterix", "--steps", "4"])
    for game, c in counts.items():
        assert c["frames"] == 128 and c["minibatch"] == 32 and c["channels"] == 4
        assert 1 <= c["per_step"] <= 32 and 1 <= c["per_minibatch"] <= min(32, c["distinct"]) <= c["distinct"] <= 128
    # The count is exact: the same frames counted by torch.unique.
    envs = make_vector_env("minatar:breakout", 32, 0)
    generator = torch.Generator().manual_seed(0)
    observations, frames = envs.reset(), []
    for _ in range(4):
        frames.append(observations.clone())
        observations, *_ = envs.step(torch.randint(envs.num_actions, (32,), generator=generator).numpy())
    contexts = torch.stack(frames).mean(dim=(3, 4)).flatten(0, 1)
    assert counts["breakout"]["distinct"] == torch.unique(contexts, dim=0).shape[0]
