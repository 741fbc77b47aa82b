"""Synthetic-program report: tables and figures read from program run folders (no recomputation)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from .report_common import BOOKKEEPING_SETTINGS, differing_settings, first_distinct, group_runs, member_order

__all__ = ["program_tables", "program_figures"]

MODEL_ORDER = ["mlp", "nsm", "moe", "nc-ff", "nc-rnn"]
MODEL_LABELS = {"mlp": "MLP (same size)", "nsm": "NSM", "moe": "MoE", "nc-ff": "Neurocoder, feed-forward",
                "nc-rnn": "Neurocoder, recurrent"}
COLUMNS = {
    "modular": [("test_error", "test error (relative MSE)", 4), ("nmi", "NMI(regime, most-read slot)", 3)],
    "reuse": [("seen_error", "error, seen combinations", 4), ("unseen_error", "error, unseen combinations", 4),
              ("similarity_sharing_a_piece", "read similarity: pairs sharing a piece", 3),
              ("similarity_sharing_none", "sharing none", 3)],
    "shift": [("recovery_first", "recovery steps, first appearance", 1),
              ("recovery_recurring", "recovery steps, recurring program", 1),
              ("error_after_switch_first", "error after switch, first", 3),
              ("error_after_switch_recurring", "error after switch, recurring", 3),
              ("final_error", "error at the end", 4)],
    "remember": [("A_error_before_B", "error on A before B", 4), ("A_error_after_B", "error on A after B", 4),
                 ("B_error", "error on B", 4)],
}
TITLES = {"modular": "1. Modular programs", "reuse": "2. Reuse and composition", "shift": "3. Pattern shift",
          "remember": "4. Remembering"}


def _program_runs(runs: list[dict]) -> dict[str, dict[str, dict]]:
    """{task: {model label: run}} (see :func:`neurocoder.report_common.group_runs`)."""
    from .train.programs import ProgramConfig    # settings a folder predates ran as these defaults
    return group_runs(runs, "programs", "task", "model", asdict(ProgramConfig()))


_model_order = member_order(MODEL_ORDER)


def _model_label(label: str) -> str:
    """'nc-ff (folder)' -> 'Neurocoder, feed-forward (folder)'."""
    model, _, rest = label.partition(" (")
    return MODEL_LABELS.get(model, model) + (f" ({rest}" if rest else "")


def program_tables(runs: list[dict]) -> str:
    """Markdown: per task, a row per model with each figure's mean +- std over seeds."""
    groups = _program_runs(runs)
    parts = []
    for task in [t for t in COLUMNS if t in groups]:
        members = groups[task]
        columns = COLUMNS[task]
        header = ["model", "parameters"] + [label for _, label, _ in columns] + ["seeds"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for model in sorted(members, key=_model_order):
            run = members[model]
            row = [_model_label(model), f"{run['parameters']:,}"]
            for key, _, digits in columns:
                stats = run["summary"].get(key)
                row.append(f"{stats['mean']:.{digits}f} +- {stats['std']:.{digits}f}" if stats else "-")
            row.append(str(run["seeds"]))
            lines.append("| " + " | ".join(row) + " |")
        parts.append(f"### {TITLES[task]}\n\n" + "\n".join(lines) + "\n")
    return "\n".join(parts)


def _figure_labels(members: dict[str, dict]) -> dict[str, str]:
    """Legend labels for a figure over several runs: each model's name and only the settings in
    which the plotted runs differ. The tables keep the full labels (every setting ``--set``
    changed); in a legend, settings every run shares made labels of 200 characters that squeezed
    the plot to a strip. Where two short labels would read alike, the full ones."""
    from .train.programs import ProgramConfig
    labels = list(members)
    skip = set(BOOKKEEPING_SETTINGS) | {"model", "seed", "seeds"}
    differing = differing_settings([members[label]["config"] for label in labels], skip, asdict(ProgramConfig()))
    short = [_model_label(label.partition(" (")[0]) + (f" ({shown})" if shown else "")
             for label, shown in zip(labels, differing)]
    return dict(zip(labels, first_distinct([short, [_model_label(label) for label in labels]])))


def _seeds(run: dict) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((Path(run["path"]) / "seeds").glob("seed-*.json"))]


def program_figures(runs: list[dict], out: Path) -> list[Path]:
    """Error around the switches (pattern shift), slot usage by hidden program (modular)."""
    groups = _program_runs(runs)
    if not groups:
        return []
    from .report import pyplot

    plt = pyplot()
    if plt is None:
        return []
    import numpy as np

    made = []
    # Folders archived without their per-seed files have nothing to draw.
    shift = {m: _seeds(r) for m, r in groups.get("shift", {}).items()}
    shift = {m: seeds for m, seeds in shift.items() if seeds}
    if shift:
        legend = _figure_labels({m: groups["shift"][m] for m in shift})
        # Several settings, or labels that name their settings: the legend goes under the plot
        # (inside it, long labels ran off the figure's edge).
        long_labels = max(len(label) for label in legend.values()) > 40
        many = len(shift) > 5 or long_labels
        fig, ax = plt.subplots(figsize=(10, 3.8))
        switches = []
        for model in sorted(shift, key=_model_order):
            seeds = shift[model]
            errors = np.array([s["errors"] for s in seeds])                 # (seeds, steps)
            smooth = np.apply_along_axis(lambda e: np.convolve(e, np.ones(10) / 10, mode="same"), 1, errors)
            mean = smooth.mean(0)
            line, = ax.plot(mean, label=legend[model], lw=1)
            ax.fill_between(range(len(mean)), smooth.min(0), smooth.max(0), alpha=0.12, color=line.get_color())
            switches = seeds[0]["switches"]
        for s in switches:
            ax.axvline(s, color="k", lw=0.5, alpha=0.4)
        ax.set_yscale("log")
        ax.axhline(0.1, color="r", lw=0.6, ls="--", alpha=0.6)
        ax.set_xlabel("online step (vertical lines: program switches; programs cycle A, B, C)")
        ax.set_ylabel("relative error (10-step mean)")
        ax.set_title("pattern shift: error around switches (mean over seeds, band = min..max)", fontsize=9)
        if many:
            ax.legend(fontsize=7, ncol=1 if long_labels else 2, loc="upper center", bbox_to_anchor=(0.5, -0.2))
        else:
            ax.legend(fontsize=7, ncol=5)
        fig.tight_layout()
        path = out / "programs_shift_errors.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")       # takes in a legend under the plot
        plt.close(fig)
        made.append(path)
    if "modular" in groups:
        usage = {m: _seeds(r) for m, r in groups["modular"].items()}
        members = {m: r for m, r in groups["modular"].items() if usage[m] and "usage_by_program" in usage[m][0]}
        if members:
            order = sorted(members, key=_model_order)
            fig, axes = plt.subplots(1, len(order), figsize=(3.6 * len(order), 2.6), squeeze=False)
            for ax, model in zip(axes[0], order):
                image = ax.imshow(np.array(usage[model][0]["usage_by_program"]), aspect="auto", cmap="magma")
                ax.set_title(_model_label(model), fontsize=8)
                ax.set_xlabel("slot / stored matrix / expert")
                ax.set_ylabel("hidden program")
                fig.colorbar(image, ax=ax)
            fig.suptitle("modular programs: mean read per hidden program (first seed)", fontsize=9)
            fig.tight_layout()
            path = out / "programs_modular_usage.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            made.append(path)
    return made
