"""Video-game report: returns and speed read from PPO run folders (nothing is recomputed)."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from .report_common import group_runs, member_order

__all__ = ["rl_tables", "rl_figures", "read_episodes", "PUBLISHED_MINATAR"]

VARIANT_ORDER = ["plain", "nc-heads", "nc-heads svd-init", "nc-two-heads", "nc-policy", "nc-fc", "lowrank-heads", "nc-added-heads", "nc-conv"]
VARIANT_NAMES = {"nc-heads": "Neurocoder heads",
                 "nc-heads svd-init": "Neurocoder heads seeded from the plain head (layer_init=svd)",
                 "nc-two-heads": "Neurocoder policy head and Neurocoder value head (two layers)",
                 "nc-policy": "Neurocoder policy head (plain value)",
                 "nc-fc": "Neurocoder in every fully connected layer",
                 "lowrank-heads": "Low-rank output layer without a memory (control)",
                 "nc-added-heads": "Plain output layer plus a Neurocoder layer (scale from 0)",
                 "nc-conv": "Neurocoder convolution in the torso (plain heads)"}
# R4 of ../shared/REFERENCE_RESULTS.md: returns at 5M frames read off Young & Tian's curves.
PUBLISHED_MINATAR = {"asterix": ("~17", "~19"), "breakout": ("~10", "~17.5"), "freeway": ("~50", "~47"),
                     "seaquest": ("~20", "~15.5"), "space_invaders": ("~43", "~185")}


def _variant_label(config: dict) -> str:
    """The variant, marked when its Neurocoder layers were seeded from the plain layers' SVD
    (``layer_init=svd``), which makes it a different agent at the start."""
    svd = config.get("layer_init") == "svd" and config["variant"] != "plain"
    return config["variant"] + (" svd-init" if svd else "")


def _rl_runs(runs: list[dict]) -> dict[str, dict[str, dict]]:
    """{env: {variant label: run}} (see :func:`neurocoder.report_common.group_runs`)."""
    from .train.rl.ppo import PPOConfig          # settings a folder predates ran as these defaults
    return group_runs(runs, "rl", "env", _variant_label, asdict(PPOConfig()), member_keys=("variant", "layer_init"))


_variant_order = member_order(VARIANT_ORDER)


def _seed_speeds(run: dict) -> list[float]:
    """Environment steps per second of each finished seed of a run folder, in seed order."""
    files = sorted((Path(run["path"]) / "seeds").glob("seed-*.json"))
    return [json.loads(f.read_text())["steps_per_second"] for f in files]


def _row_name(label: str) -> str:
    """A row label in words: ``"nc-two-heads (layer_options.residual=true)"`` ->
    ``"Neurocoder policy head and ... (two layers) (layer_options.residual=true)"``."""
    base = max((v for v in VARIANT_NAMES if label == v or label.startswith(v + " (")), key=len, default=None)
    return label if base is None else VARIANT_NAMES[base] + label[len(base):]


def _is_plain(label: str) -> bool:
    return label == "plain" or label.startswith("plain (")


def _plain_reference(members: dict[str, dict], run: dict) -> dict | None:
    """The plain agent a row is compared with: the one plain run of the same frame budget, else
    the plain run at the default settings (the bare ``plain`` label), else none; so a row is never
    compared with a plain agent trained for another number of frames by accident of labels."""
    same_budget = [other for label, other in members.items() if _is_plain(label) and other["frames"] == run["frames"]]
    if len(same_budget) == 1:
        return same_budget[0]
    return members.get("plain")


def rl_tables(runs: list[dict]) -> str:
    """Markdown: per environment a row per variant: final return (mean of the last 100 episodes,
    mean +- std over seeds), steps per second and its ratio to the plain agent, and R4's
    published numbers (at 5M frames) beside MinAtar games."""
    groups = _rl_runs(runs)
    if not groups:
        return ""
    header = ["environment", "variant", "final return (last 100 episodes)", "seeds", "frames", "steps/s",
              "vs plain", "steps/s by seed (vs plain's same seed)", "parameters",
              "published DQN / AC at 5M frames (R4)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    wins, games = Counter(), Counter()           # per Neurocoder variant, over MinAtar games
    for env in sorted(groups):
        members = groups[env]
        game = env.split(":", 1)[1] if env.startswith("minatar:") else None
        for variant in sorted(members, key=_variant_order):
            run = members[variant]
            is_plain = _is_plain(variant)
            plain = _plain_reference(members, run)
            speed = f"{run['steps_per_second'] / plain['steps_per_second']:.2f}x" if plain and not is_plain else ""
            published = " / ".join(PUBLISHED_MINATAR[game]) if game in PUBLISHED_MINATAR and is_plain else ""
            # Per seed, because seeds of one run may have run on different machines (a resumed run):
            # only seeds that ran side by side compare fairly.
            mine, theirs = _seed_speeds(run), _seed_speeds(plain) if plain and not is_plain else []
            by_seed = ", ".join(f"{rate:.0f}" + (f" ({rate / theirs[i]:.2f}x)" if i < len(theirs) else "")
                                for i, rate in enumerate(mine))
            lines.append(f"| {env} | {variant} | {run['final_return_mean']:.2f} +- {run['final_return_std']:.2f} | "
                         f"{run['seeds']} | {run['frames']:,} | {run['steps_per_second']:.0f} | {speed} | "
                         f"{by_seed} | {run['parameters']:,} | {published} |")
        for label, run in members.items():
            plain = None if _is_plain(label) else _plain_reference(members, run)
            if game and plain:
                games[label] += 1
                wins[label] += run["final_return_mean"] >= plain["final_return_mean"]
    text = "### Video games (PPO)\n\n" + "\n".join(lines) + "\n"
    for label in sorted(games, key=_variant_order):
        text += (f"\n{_row_name(label)} >= plain on {wins[label]} of {games[label]} MinAtar games here (final "
                 f"return, mean over seeds).\n")
    # Each folder's per-update metrics, read once for both tables below.
    metrics = {run["path"]: _read_jsonl_maybe_gz(Path(run["path"]), "metrics.jsonl")
               for members in groups.values() for run in members.values()}
    return text + _early_table(groups, metrics) + _diagnostics_table(groups, metrics)


def _early_table(groups: dict[str, dict[str, dict]], metrics: dict[str, list[dict]]) -> str:
    """How soon each agent starts scoring: the mean return of the episodes that ended within the
    first quarter of the run's frames, per seed (and their mean), and the policy's entropy at the
    first update (mean over seeds); '-' where a folder keeps no such episodes or no metrics."""
    lines = []
    for env in sorted(groups):
        for variant in sorted(groups[env], key=_variant_order):
            run = groups[env][variant]
            folder = Path(run["path"])
            quarter = run["frames"] / 4
            by_seed: dict[int, list[float]] = {}
            for episode in read_episodes(folder):
                if episode["frame"] <= quarter:
                    by_seed.setdefault(episode.get("seed", 0), []).append(episode["return"])
            means = [sum(r) / len(r) for _, r in sorted(by_seed.items())]
            first = {}
            for m in metrics[run["path"]]:
                first.setdefault(m.get("seed", 0), m.get("entropy"))
            entropies = [e for e in first.values() if e is not None]
            if not means and not entropies:
                continue
            lines.append(f"| {env} | {variant} | {quarter:,.0f} | {_mean_or_dash(means, 2)} | "
                         f"{', '.join(f'{m:.2f}' for m in means) or '-'} | {_mean_or_dash(entropies, 3)} |")
    return _section("How soon each agent starts scoring",
                    ["environment", "variant", "first quarter (frames)", "return in it (mean over seeds)", "by seed",
                     "policy entropy at the first update"], lines)


def _diagnostics_table(groups: dict[str, dict[str, dict]], metrics: dict[str, list[dict]]) -> str:
    """How far each update moved the policy, from the per-update metrics of the run folders that
    keep them: clip fraction and approximate KL averaged over every update of every seed, and the
    policy's entropy at the last update (mean over seeds), and how much of the return variance the
    value head explains (mean over updates), the gradient's norm before clipping and the share of
    minibatches whose gradient was clipped ('-' for runs made before these were logged). Empty when
    no folder has metrics."""
    lines = []
    for env in sorted(groups):
        for variant in sorted(groups[env], key=_variant_order):
            updates = [m for m in metrics[groups[env][variant]["path"]] if "clip_fraction" in m]
            if not updates:
                continue
            mean = lambda key: sum(m[key] for m in updates) / len(updates)
            last = {}
            for m in updates:                                 # in order: each seed's last update wins
                last[m.get("seed", 0)] = m["entropy"]
            kl = f"{mean('approx_kl'):.4f}" if all("approx_kl" in m for m in updates) else "-"
            explained = [m["explained_variance"] for m in updates if m.get("explained_variance") is not None]
            norms = [m["grad_norm"] for m in updates if "grad_norm" in m]
            clipped = [m["clipped_fraction"] for m in updates if "clipped_fraction" in m]
            lines.append(f"| {env} | {variant} | {len(updates)} | {mean('clip_fraction'):.3f} | {kl} | "
                         f"{sum(last.values()) / len(last):.3f} | {_mean_or_dash(explained, 3)} | "
                         f"{_mean_or_dash(norms, 3)} | {_mean_or_dash(clipped, 2)} |")
    return _section("How far each PPO update moved the policy",
                    ["environment", "variant", "updates", "clip fraction (mean)", "approximate KL per minibatch (mean)",
                     "policy entropy at the end", "value's explained variance (mean)",
                     "gradient norm before clipping (mean)", "minibatches clipped"], lines)


def _mean_or_dash(values: list[float], digits: int) -> str:
    return f"{sum(values) / len(values):.{digits}f}" if values else "-"


def _section(title: str, columns: list[str], lines: list[str]) -> str:
    """A markdown subsection holding one table; empty without rows."""
    if not lines:
        return ""
    header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return f"\n#### {title}\n\n" + header + "\n".join(lines) + "\n"


def _read_jsonl_maybe_gz(folder: Path, name: str) -> list[dict]:
    """``folder/name`` or ``folder/name.gz`` (how archived results keep it small) as a list of
    records; [] when neither is there."""
    import gzip

    plain, packed = folder / name, folder / (name + ".gz")
    if plain.is_file():
        text = plain.read_text()
    elif packed.is_file():
        text = gzip.decompress(packed.read_bytes()).decode()
    else:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_episodes(folder: Path) -> list[dict]:
    """The episodes of a run folder: ``episodes.jsonl``, or ``episodes.jsonl.gz``; [] when
    neither is there."""
    return _read_jsonl_maybe_gz(folder, "episodes.jsonl")


def rl_figures(runs: list[dict], out: Path) -> list[Path]:
    """Episodic return against frames, per environment: the mean over seeds of binned returns,
    with the spread (min..max over seeds)."""
    groups = _rl_runs(runs)
    if not groups:
        return []
    from .report import pyplot

    plt = pyplot()
    if plt is None:
        return []
    import numpy as np

    envs = sorted(groups)
    columns = min(3, len(envs))
    rows = -(-len(envs) // columns)
    # One colour per variant across every panel, and one legend under the whole figure: per-panel
    # legends of long labels (explorations name their settings) covered the curves.
    variants = sorted({v for env in envs for v in groups[env]}, key=_variant_order)
    colours = {v: f"C{i % 10}" for i, v in enumerate(variants)}
    fig, axes = plt.subplots(rows, columns, figsize=(4.4 * columns, 3.3 * rows), squeeze=False)
    for ax in axes.flat[len(envs):]:
        ax.axis("off")
    drawn = {}
    for ax, env in zip(axes.flat, envs):
        for variant in sorted(groups[env], key=_variant_order):
            run = groups[env][variant]
            episodes = read_episodes(Path(run["path"]))
            if not episodes:
                continue
            frames = run["frames"]
            edges = np.linspace(0, frames, 21)
            curves = []
            for seed in sorted({e["seed"] for e in episodes}):
                mine = [e for e in episodes if e["seed"] == seed]
                x = np.array([e["frame"] for e in mine])
                y = np.array([e["return"] for e in mine])
                binned = [y[(x > lo) & (x <= hi)].mean() if ((x > lo) & (x <= hi)).any() else np.nan
                          for lo, hi in zip(edges[:-1], edges[1:])]
                curves.append(binned)
            curves = np.array(curves, dtype=float)
            centres = (edges[:-1] + edges[1:]) / 2
            with warnings.catch_warnings():   # bins where no episode ended stay gaps (NaN)
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, low, high = np.nanmean(curves, 0), np.nanmin(curves, 0), np.nanmax(curves, 0)
            # Games whose episodes all end together (Freeway: 2,500 frames) leave bins empty:
            # draw through them rather than break the curve.
            ok = ~np.isnan(mean)
            drawn[variant], = ax.plot(centres[ok], mean[ok], marker=".", color=colours[variant], label=variant)
            ax.fill_between(centres[ok], low[ok], high[ok], alpha=0.15, color=colours[variant])
        ax.set_title(env, fontsize=9)
        ax.set_xlabel("frames")
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("episodic return")
    fig.suptitle("mean over seeds of the returns of episodes ending in each frame bin; band: min..max over seeds",
                 fontsize=8)
    fig.tight_layout()
    labels = [v for v in variants if v in drawn]
    fig.legend([drawn[v] for v in labels], labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize=7,
               ncol=1 if max(map(len, labels), default=0) > 40 else min(3, len(labels)))
    path = out / "rl_returns.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")       # takes in the legend under the panels
    plt.close(fig)
    return [path]
