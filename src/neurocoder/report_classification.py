"""Object-recognition report: tables and figures read from classification run folders.

Nothing is recomputed: accuracies come from ``results.json``, the read analysis from
``analysis.pt`` (written by the trainer for the first seed of Neurocoder variants).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from .report_common import first_distinct

__all__ = ["classification_tables", "classification_summary", "classification_figures", "PUBLISHED_MNIST1D"]

VARIANT_ORDER = ["plain", "nc-head", "nc-fc", "nc-conv", "nsm-head", "moe-head"]
VARIANT_LABELS = {"plain": "plain", "nc-head": "Neurocoder head", "nc-fc": "Neurocoder in every FC layer",
                  "nc-conv": "Neurocoder FC + convolutions", "nsm-head": "NSM head", "moe-head": "MoE head"}
DATASET_ORDER = ["fashion-mnist", "mnist", "mnist1d"]
BACKBONE_ORDER = ["mlp", "lenet", "resnet20", "cnn1d"]
# R3 of ../shared/REFERENCE_RESULTS.md (Greydanus 2020, approximate).
PUBLISHED_MNIST1D = {"mlp": "~68", "cnn1d": "~94"}


def _classification_runs(runs: list[dict]) -> list[dict]:
    return [r for r in runs if r.get("config", {}).get("kind") == "classification"]


def _grouped(runs: list[dict]) -> dict[tuple[str, str, str], dict[str, dict]]:
    """(data set, backbone, tag) -> variant -> run, in report order (data sets, then backbones).

    The tag is empty unless two runs of one (data set, backbone, variant) are given (say the
    10k-digit and the full-MNIST tables together): then each run of that data set and backbone is
    tagged with the folder holding it, so each set becomes a table of its own with its own plain
    reference, and no run hides another."""
    by_table: dict[tuple, list[dict]] = defaultdict(list)
    for run in _classification_runs(runs):
        by_table[(run["config"]["dataset"], run["config"]["backbone"])].append(run)
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for (dataset, backbone), members in by_table.items():
        variants = [run["config"]["variant"] for run in members]
        tags = [""] * len(members)
        if len(set(variants)) < len(variants):
            parents = [Path(run["path"]).resolve().parent for run in members]
            tags = first_distinct([[p.name for p in parents], [str(p).strip("/").replace("/", "-") for p in parents],
                                   [Path(run["path"]).name for run in members]], paired_with=variants)
        for run, tag, variant in zip(members, tags, variants):
            groups[(dataset, backbone, tag)][variant] = run
    order = sorted(groups, key=lambda k: (DATASET_ORDER.index(k[0]) if k[0] in DATASET_ORDER else 9,
                                          BACKBONE_ORDER.index(k[1]) if k[1] in BACKBONE_ORDER else 9, k[2]))
    return {key: groups[key] for key in order}


def _shown(dataset: str, tag: str) -> str:
    """The data set as a table names it: with the folder that tells two sets of its runs apart."""
    return f"{dataset} ({tag})" if tag else dataset


def _analysis(run: dict) -> dict | None:
    path = Path(run["path"]) / "analysis.pt"
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def classification_summary(runs: list[dict]) -> str:
    """Markdown: one row per (data set, backbone), one column per variant: test accuracy mean +-
    std over seeds, bold where it beats the plain backbone by more than the larger of the two
    standard deviations."""
    groups = _grouped(runs)
    if not groups:
        return ""
    variants = [v for v in VARIANT_ORDER if any(v in g for g in groups.values())]
    lines = ["| data set | backbone | epochs | seeds | " + " | ".join(variants) + " | R3 |",
             "|" + "---|" * (len(variants) + 5)]
    for (dataset, backbone, tag), members in groups.items():
        plain = members.get("plain")
        cells = []
        for variant in variants:
            run = members.get(variant)
            if run is None:
                cells.append("")
                continue
            text = f"{run['test_accuracy_mean']:.2f} +- {run['test_accuracy_std']:.2f}"
            if plain is not None and variant != "plain":
                delta = run["test_accuracy_mean"] - plain["test_accuracy_mean"]
                if delta > max(run["test_accuracy_std"], plain["test_accuracy_std"]):
                    text = f"**{text}**"
            cells.append(text)
        first = next(iter(members.values()))
        seeds = sorted({r["seeds"] for r in members.values()})
        published = PUBLISHED_MNIST1D.get(backbone, "") if dataset == "mnist1d" else ""
        lines.append(f"| {_shown(dataset, tag)} | {backbone} | {first['config']['epochs']} | {'/'.join(map(str, seeds))} | "
                     + " | ".join(cells) + f" | {published} |")
    return "\n".join(lines) + "\n"


def classification_tables(runs: list[dict]) -> str:
    """Markdown: per (data set, backbone) a row per variant with test accuracy mean +- std over
    seeds, the difference to the plain backbone (and whether it exceeds the larger of the two
    seed standard deviations), parameters and seconds per epoch; then the read analysis."""
    groups = _grouped(runs)
    if not groups:
        return ""
    parts = []
    for (dataset, backbone, tag), members in groups.items():
        first = next(iter(members.values()))
        cfg, data = first["config"], first["data"]
        parts.append(f"### {_shown(dataset, tag)}, {backbone}: test accuracy (%)\n")
        parts.append(f"Data: {data['source']}; train {data['train_samples']:,} / validation {data['val_samples']:,} / "
                     f"test {data['test_samples']:,}; augmentation: {data['augmentation']}. {cfg['epochs']} epochs, "
                     f"batch {cfg['batch_size']}, {cfg['optimizer']} lr {cfg['lr']:g} with cosine decay.")
        header = ["variant", "test accuracy", "vs plain", "beats plain by > std", "parameters", "s/epoch", "seeds"]
        if dataset == "mnist1d" and backbone in PUBLISHED_MNIST1D:
            header.append("published (R3)")
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        plain = members.get("plain")
        for variant in sorted(members, key=lambda v: VARIANT_ORDER.index(v) if v in VARIANT_ORDER else 9):
            run = members[variant]
            row = [VARIANT_LABELS.get(variant, variant),
                   f"{run['test_accuracy_mean']:.2f} +- {run['test_accuracy_std']:.2f}"]
            if plain is not None and variant != "plain":
                delta = run["test_accuracy_mean"] - plain["test_accuracy_mean"]
                noise = max(run["test_accuracy_std"], plain["test_accuracy_std"])
                row += [f"{delta:+.2f}", "yes" if delta > noise else "no"]
            else:
                row += ["", ""]
            row += [f"{run['parameters']:,}", f"{run['seconds_per_epoch']:.1f}", str(run["seeds"])]
            if "published (R3)" in header:
                row.append(PUBLISHED_MNIST1D[backbone] if variant == "plain" else "")
            lines.append("| " + " | ".join(row) + " |")
        parts.append("\n".join(lines))
        analysis_lines = []
        for variant in sorted(members, key=lambda v: VARIANT_ORDER.index(v) if v in VARIANT_ORDER else 9):
            analysis = _analysis(members[variant])
            if not analysis:
                continue
            for layer, info in analysis["layers"].items():
                analysis_lines.append(
                    f"| {VARIANT_LABELS.get(variant, variant)} | {layer} | {info['entropy']:.2f} / "
                    f"{info['max_entropy']:.2f} | {info['distinct_programs']} of {info['num_programs']} | "
                    f"{info['effective_programs']:.1f} |")
            similarity = analysis.get("weight_similarity")
            if similarity:
                analysis_lines.append(
                    f"| {VARIANT_LABELS.get(variant, variant)} | {similarity['layer']}: composed-weight cosine, "
                    f"same class {similarity['within_class']:.3f}, other classes {similarity['between_class']:.3f} "
                    f"| | | |")
        if analysis_lines:
            parts.append("\nWhat the Neurocoder layers read (first seed, test samples): read entropy (nats, of "
                         "log P for a flat read), slots that are some sample's most-read slot (>= 1% of samples), "
                         "effective number of slots used (exp entropy of the mean usage):\n\n"
                         "| variant | layer | read entropy | distinct programs | effective programs |\n"
                         "|---|---|---|---|---|\n" + "\n".join(analysis_lines))
        parts.append("")
    return "\n\n".join(parts)


def classification_figures(runs: list[dict], out: Path) -> list[Path]:
    """Accuracy bars per (data set, backbone); slot usage by class and composed-weight similarity
    for each Neurocoder run that has an analysis."""
    groups = _grouped(runs)
    if not groups:
        return []
    from .report import pyplot

    plt = pyplot()
    if plt is None:
        return []
    made = []
    keys = list(groups)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.3 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        members = groups[key]
        variants = sorted(members, key=lambda v: VARIANT_ORDER.index(v) if v in VARIANT_ORDER else 9)
        means = [members[v]["test_accuracy_mean"] for v in variants]
        stds = [members[v]["test_accuracy_std"] for v in variants]
        colors = ["#777777" if v == "plain" else "#1f77b4" if v.startswith("nc") else "#ff7f0e" for v in variants]
        ax.bar(range(len(variants)), means, yerr=stds, color=colors, capsize=3)
        ax.set_xticks(range(len(variants)))
        ax.set_xticklabels(variants, rotation=45, ha="right", fontsize=8)
        low = min(m - s for m, s in zip(means, stds))
        ax.set_ylim(max(0, low - 2), min(100, max(m + s for m, s in zip(means, stds)) + 1))
        ax.set_title(f"{_shown(key[0], key[2])}, {key[1]}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%), mean +- std over seeds")
    fig.tight_layout()
    path = out / "classification_accuracy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    made.append(path)
    for key in keys:
        for variant, run in groups[key].items():
            analysis = _analysis(run)
            if not analysis:
                continue
            layers = analysis["layers"]
            similarity = analysis.get("weight_similarity")
            panels = len(layers) + (1 if similarity else 0)
            fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.2), squeeze=False)
            for ax, (layer, info) in zip(axes[0], layers.items()):
                image = ax.imshow(info["usage_by_class"].numpy(), aspect="auto", cmap="magma")
                ax.set_title(f"{layer}: usage by class", fontsize=8)
                ax.set_xlabel("program slot (U bank)")
                ax.set_ylabel("class")
                fig.colorbar(image, ax=ax)
            if similarity:
                ax = axes[0][-1]
                image = ax.imshow(similarity["cosine"].numpy(), cmap="viridis")
                ax.set_title(f"{similarity['layer']}: cosine of composed weights\n(10 test samples per class)",
                             fontsize=8)
                ax.set_xlabel("sample (sorted by class)")
                fig.colorbar(image, ax=ax)
            fig.suptitle(f"{_shown(key[0], key[2])}, {key[1]}, {variant}", fontsize=9)
            fig.tight_layout()
            path = out / f"reads_{key[0]}{'-' + key[2] if key[2] else ''}_{key[1]}_{variant}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            made.append(path)
    return made
