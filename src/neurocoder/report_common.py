"""What the per-experiment reports share: grouping run folders into table rows."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Callable

__all__ = ["BOOKKEEPING_SETTINGS", "group_runs", "member_order", "flat_settings", "differing_settings",
           "explicit_options", "first_distinct"]


# What an option a config did not set compares as: unequal to any value a config did set.
_UNSET = "\0unset"
# Settings that never change a run's figures (where it ran, how often it saved): never in a label.
BOOKKEEPING_SETTINGS = frozenset({"kind", "preset", "threads", "data_dir", "checkpoint_every"})


def flat_settings(config: dict, skip: set[str] | frozenset = frozenset()) -> dict:
    """A run's settings with option groups opened: ``{"layer_options": {"rank": 2}}`` becomes
    ``{"layer_options.rank": 2}``, so a label can name the option that differs, not the whole
    group; keys in ``skip`` are left out. An option a run did not set is absent (its preset's
    default)."""
    flat = {}
    for key, value in config.items():
        if key in skip:
            continue
        if isinstance(value, dict):
            flat.update({f"{key}.{sub}": inner for sub, inner in value.items()})
        else:
            flat[key] = value
    return flat


def _open_empty_groups(configs: list[dict]) -> list[dict]:
    """``configs`` with an option group left as None (``nc_options=None``: no options given, the
    model's own) written as {}, where another config holds that group as a dict, so that a label
    names the options that differ rather than ``nc_options=null``."""
    groups = {key for config in configs for key, value in config.items() if isinstance(value, dict)}
    return [{key: ({} if value is None and key in groups else value) for key, value in config.items()}
            for config in configs]


def _differing_parts(configs: list[dict], skip: set[str] | frozenset = frozenset(),
                     defaults: dict | None = None) -> list[list[str]]:
    """:func:`differing_settings` as lists of ``key=value`` strings."""
    flat = [flat_settings(config, skip)
            for config in _open_empty_groups([{**(defaults or {}), **c} for c in configs])]
    keys = sorted({k for settings in flat for k in settings})
    differing = [k for k in keys if len({json.dumps(f.get(k, _UNSET), sort_keys=True) for f in flat}) > 1]
    return [[f"{k}={json.dumps(f[k], sort_keys=True)}" for k in differing if k in f] for f in flat]


def differing_settings(configs: list[dict], skip: set[str] | frozenset = frozenset(),
                       defaults: dict | None = None) -> list[str]:
    """For each config, ``"key=value, ..."`` of the settings in which the configs differ (an
    option one config set and another left unset counts as differing; a config that left it
    unset does not name it). ``defaults`` fills the top-level settings a config lacks (a run
    made before the setting existed ran as its default, or as the value given here)."""
    return [", ".join(parts) for parts in _differing_parts(configs, skip, defaults)]


def _explicit_parts(config: dict, defaults: dict | None = None) -> list[str]:
    """:func:`explicit_options` as a list of ``key.option=value`` strings."""
    defaults = defaults or {}
    named = []
    for key, value in sorted(config.items()):
        if not isinstance(value, dict) or key in BOOKKEEPING_SETTINGS:
            continue
        default = defaults.get(key) if isinstance(defaults.get(key), dict) else {}
        named += [f"{key}.{sub}={json.dumps(inner, sort_keys=True)}" for sub, inner in sorted(value.items())
                  if sub not in default or json.dumps(default[sub], sort_keys=True) != json.dumps(inner, sort_keys=True)]
    return named


def first_distinct(candidates: list[list[str]], paired_with: list | None = None) -> list[str]:
    """The first of ``candidates`` (name lists, one name per run) whose names are all different,
    or, given ``paired_with``, whose (paired_with[i], name) pairs are; else the last. How runs that
    would share a row are told apart (settings, then seeds or folders), so none hides another."""
    for names in candidates:
        keys = list(zip(paired_with, names)) if paired_with is not None else names
        if len(set(keys)) == len(keys):
            return names
    return candidates[-1]


# Top-level settings that tell runs of one method apart without changing the method.
_REPEATS = {"seed", "seeds"}


def _preset_parts(config: dict, skip: set[str], defaults: dict | None = None) -> list[str]:
    """``key=value`` of the settings in which a run differs from the preset it was started from
    (what ``--set`` changed), e.g. ``routing_lr_scale=0.1`` or ``nc_options.rank=6``. A folder
    that names no known preset (a run started from the Python API) is compared with ``defaults``,
    the config class's defaults, instead; [] without either. A top-level setting the folder
    predates is not named (it ran as the default)."""
    from .experiments.registry import PRESETS      # reports sit above the experiments; lazy import
    preset = PRESETS.get(config.get("preset") or "")
    if preset is None and defaults is None:
        return []
    base = flat_settings(asdict(preset[1]) if preset is not None else defaults)
    return [f"{key}={json.dumps(value, sort_keys=True)}" for key, value in sorted(flat_settings(config).items())
            if key.split(".", 1)[0] not in skip | _REPEATS and (key in base or "." in key)
            and json.dumps(value, sort_keys=True) != json.dumps(base.get(key, _UNSET), sort_keys=True)]


def explicit_options(config: dict, defaults: dict | None = None) -> str:
    """``"key=value, ..."`` of the entries of a config's option groups (dict-valued settings such
    as ``layer_options``) that differ from ``defaults``' group of the same name: the options a run
    set on purpose. Top-level settings are not named (every config holds all of them)."""
    return ", ".join(_explicit_parts(config, defaults))


def _deviations(configs: list[dict], skip: set[str], defaults: dict | None) -> list[list[str]]:
    """For each config, ``key=value`` of the settings that vary across ``configs`` and in which it
    differs from ``defaults`` (a setting that varies but where a run keeps the default is left
    out, so labels stay short)."""
    at_default = {f"{k}={json.dumps(v, sort_keys=True)}" for k, v in flat_settings(defaults or {}, skip).items()}
    return [[part for part in parts if part not in at_default] for parts in _differing_parts(configs, skip, defaults)]


def group_runs(runs: list[dict], kind: str, group_field: str,
               member_field: str | Callable[[dict], str], defaults: dict | None = None,
               member_keys: tuple[str, ...] = ()) -> dict[str, dict[str, dict]]:
    """Run folders of one ``kind`` as {config[group_field]: {label: run}}, the label being
    config[member_field] (or ``member_field(config)`` when it is a function, whose config keys
    ``member_keys`` names), followed by what sets the run apart, so that a row never reads as
    another configuration than the one that ran: the settings that vary across the group's runs
    where this run's value is not the default (``"nc-heads (layer_options.residual=true)"``);
    for several runs of one member, every setting in which they differ; for a lone run, the
    options it set (:func:`explicit_options`); and for every run, the settings ``--set`` changed
    from its preset (``routing_lr_scale=0.1``; seeds are not named), which a setting shared by
    every run of a group would otherwise leave unsaid. Runs of one member with the same settings
    (other seeds, another machine) are told apart by folder name, then by parent and folder name,
    so that no run hides another. ``defaults``: the config class's defaults (see
    :func:`differing_settings`)."""
    member = member_field if callable(member_field) else (lambda config: config[member_field])
    skip = (set(BOOKKEEPING_SETTINGS) | {group_field} | set(member_keys)
            | (set() if callable(member_field) else {member_field}))
    mine = [run for run in runs if run.get("config", {}).get("kind") == kind]
    by_group: dict[str, list[dict]] = defaultdict(list)
    for run in mine:
        by_group[run["config"][group_field]].append(run)

    def joined(*lists: list[str]) -> str:
        parts: list[str] = []
        for part in (p for items in lists for p in items):
            if part and part not in parts:
                parts.append(part)
        return ", ".join(sorted(parts))

    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for group, in_group in by_group.items():
        together: dict[str, list[tuple[dict, list[str]]]] = defaultdict(list)
        for run, deviation in zip(in_group, _deviations([run["config"] for run in in_group], skip, defaults)):
            together[member(run["config"])].append((run, deviation))
        for label, members in together.items():
            if len(members) == 1:
                run, deviation = members[0]
                # A lone run also names the options it set (its table row would otherwise read
                # as the member's default configuration).
                name = joined(deviation, _explicit_parts(run["config"], defaults),
                              _preset_parts(run["config"], skip, defaults))
                groups[group][f"{label} ({name})" if name else label] = run
                continue
            within = _differing_parts([run["config"] for run, _ in members], skip, defaults)
            paths = [Path(run["path"]) for run, _ in members]
            named = [joined(deviation, other, _preset_parts(run["config"], skip, defaults))
                     for (run, deviation), other in zip(members, within)]
            # Distinct names leave at most one run unnamed (it left every differing option unset).
            names = first_distinct([named, [path.name for path in paths],
                                    [f"{path.parent.name}/{path.name}" for path in paths], [str(path) for path in paths]])
            for (run, _), name in zip(members, names):
                groups[group][f"{label} ({name})" if name else label] = run
    return groups


def member_order(order: list[str]):
    """A sort key for :func:`group_runs` labels: members in ``order`` first, a labelled repeat
    after its member, unknown members last."""
    def key(label: str) -> tuple[int, str]:
        member = label.split(" (")[0]
        return (order.index(member) if member in order else len(order)), label
    return key
