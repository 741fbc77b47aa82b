"""Reports: tables and figures read from run folders (nothing is recomputed)."""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

from .report_common import differing_settings, first_distinct

__all__ = ["load_runs", "continual_tables", "write_report", "PUBLISHED"]

STRATEGY_LABELS = {"sgd": "SGD", "adam": "Adam", "adagrad": "Adagrad", "l2": "L2", "ewc": "EWC",
                   "online-ewc": "Online EWC", "si": "SI", "mas": "MAS", "rehearsal": "Naive rehearsal",
                   "offline": "Offline (all tasks jointly)"}
ROW_ORDER = ["Adam", "SGD", "Adagrad", "L2", "EWC", "Online EWC", "SI", "MAS", "Naive rehearsal",
             "Offline (all tasks jointly)"]
MODEL_LABELS = {"mlp": "MLP", "neurocoder-released": "Neurocoder MLP (released config)",
                "neurocoder": "Neurocoder MLP (project config)", "nsm": "NSM MLP", "moe": "MoE MLP",
                "neurocoder-hidden": "Neurocoder hidden layers, plain heads",
                "neurocoder-head": "Neurocoder heads, plain hidden layers"}

# ../shared/REFERENCE_RESULTS.md: R1 (authors' released logs) and R2 (Hsu et al. 2018), mean +- std.
PUBLISHED = {
    ("split-mnist", "domain"): {
        "columns": ["MLP (authors' logs)", "Neurocoder MLP (authors' logs)", "Hsu et al. MLP"],
        "rows": {"Adam": ["53.38 +- 1.39", "57.07 +- 0.45", "55.16 +- 1.38"],
                 "Adagrad": ["56.16 +- 1.79", "60.60 +- 0.49", "58.08 +- 1.06"],
                 "EWC": ["56.88 +- 2.18", "62.56 +- 1.07", "58.85 +- 2.59"],
                 "Online EWC": ["59.64 +- 3.13", "71.79 +- 2.04", "57.33 +- 1.44"],
                 "L2": ["63.27 +- 3.94", "(not released)", "66.00 +- 3.73"],
                 "SGD": ["", "", "63.20 +- 0.35"], "SI": ["", "", "64.76 +- 3.09"], "MAS": ["", "", "68.57 +- 6.85"],
                 "Naive rehearsal": ["", "", "95.16 +- 0.49"],
                 "Offline (all tasks jointly)": ["98.67 +- 0.15", "-", "98.59 +- 0.15"]},
    },
    ("split-mnist", "task"): {
        "columns": ["Hsu et al. MLP"],
        "rows": {"Adam": ["93.46 +- 2.01"], "SGD": ["97.98 +- 0.09"], "Adagrad": ["98.06 +- 0.53"],
                 "L2": ["98.18 +- 0.96"], "EWC": ["97.70 +- 0.81"], "Online EWC": ["98.04 +- 1.10"],
                 "SI": ["98.56 +- 0.49"], "MAS": ["99.22 +- 0.21"], "Naive rehearsal": ["99.40 +- 0.08"],
                 "Offline (all tasks jointly)": ["99.52 +- 0.16"]},
    },
    ("split-mnist", "class"): {
        "columns": ["Hsu et al. MLP"],
        "rows": {"Adam": ["19.71 +- 0.08"], "SGD": ["19.46 +- 0.04"], "Adagrad": ["19.82 +- 0.09"],
                 "L2": ["22.52 +- 1.08"], "EWC": ["19.80 +- 0.05"], "Online EWC": ["19.77 +- 0.04"],
                 "SI": ["19.67 +- 0.09"], "MAS": ["19.52 +- 0.29"], "Naive rehearsal": ["90.78 +- 0.85"],
                 "Offline (all tasks jointly)": ["97.53 +- 0.30"]},
    },
}


def _row_order(label: str) -> int:
    """Position of a method's row (ROW_ORDER first, anything else after)."""
    return ROW_ORDER.index(label) if label in ROW_ORDER else len(ROW_ORDER)


def _run_folders(path: Path, unfinished: list[Path]) -> list[Path]:
    """Run folders at or below ``path``: a folder holding ``results.json`` is a run (nothing
    below it is searched); one holding only ``config.json`` is a run not yet finished (added to
    ``unfinished``); any other folder is searched at every depth, in name order."""
    if (path / "results.json").exists():
        return [path]
    if (path / "config.json").exists():
        unfinished.append(path)
        return []
    return [run for child in sorted(p for p in path.iterdir() if p.is_dir()) for run in _run_folders(child, unfinished)]


def _is_demo(folder: Path) -> bool:
    """A `neurocoder demo` folder: its config names no experiment kind (its table is the demo's own)."""
    try:
        return "kind" not in json.loads((folder / "config.json").read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def load_runs(paths: list[str | Path]) -> list[dict]:
    """Every finished run at or below the given folders (a run folder, or a folder holding run
    folders at any depth). Unfinished runs and `neurocoder demo` folders found below a given
    folder are left out, each kind named in a note on stderr; a damaged results.json is an error
    that names it."""
    runs, demos, unfinished = [], [], []
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"report: {path} does not exist")
        if not path.is_dir():
            # Typically a shell glob such as runs/x-* that also matched the runs' .log files.
            raise ValueError(f"report: {path} is a file, not a run folder: give run folders or folders holding "
                             f"them (a glob that should match folders only ends in a slash: {path.parent}/*/)")
        found = _run_folders(path, unfinished)
        if not found:
            raise FileNotFoundError(f"report: no finished run in {path} (no results.json; an interrupted run "
                                    f"is finished with `neurocoder run ... --out {path} --resume`)")
        for folder in found:
            try:
                results = json.loads((folder / "results.json").read_text())
                if not isinstance(results, dict) or not isinstance(results.get("config"), dict):
                    if folder != path and _is_demo(folder):
                        demos.append(folder)
                        continue
                    raise ValueError("it holds no run config")
            except ValueError as error:        # JSONDecodeError is a ValueError
                raise ValueError(f"report: {folder / 'results.json'} is not a run's results ({error}); it may be "
                                 f"damaged: rerun that run, or leave {folder} out of the report") from None
            runs.append({"path": folder, **results})
    if unfinished and runs:
        print(f"report: left out {len(unfinished)} unfinished run(s) (no results.json yet; `neurocoder run ... "
              f"--out DIR --resume` finishes one): " + ", ".join(str(u) for u in unfinished), file=sys.stderr)
    if demos:
        print(f"report: left out {len(demos)} `neurocoder demo` folder(s), whose table the demo prints itself: "
              + ", ".join(str(d) for d in demos), file=sys.stderr)
    if not runs:
        raise FileNotFoundError(f"report: no experiment run in {', '.join(str(p) for p in paths)} (only demo folders)")
    return runs


def _row_label(config: dict) -> str:
    key = config["optimizer"] if config["strategy"] == "naive" else config["strategy"]
    return STRATEGY_LABELS.get(key, key)


# Settings that never tell two runs' methods apart: the model is a column, the rest is bookkeeping.
_NOT_A_SETTING = {"model", "strategy", "optimizer", "seed", "repeats", "threads", "data_dir", "data", "preset",
                  "kind", "data_source"}


def _defaults() -> dict:
    """What a setting missing from a run's recorded config meant: the value the code then ran
    with (ContinualConfig.LEGACY), else today's default."""
    from dataclasses import asdict

    from .train.continual import ContinualConfig
    return {**asdict(ContinualConfig()), **ContinualConfig.LEGACY}


def _row_labels(members: list[dict]) -> dict[int, str]:
    """The row label of each run (keyed by ``id(run)``): the method's name, and where two runs of
    one model would share a row, the settings in which that method's runs differ, so that a
    report over, say, two strengths of one strategy shows two rows instead of one run silently
    hiding the other."""
    by_label: dict[str, list[dict]] = defaultdict(list)
    for run in members:
        by_label[_row_label(run["config"])].append(run)
    labels = {}
    for label, runs in by_label.items():
        models = [r["config"]["model"] for r in runs]
        if len(models) == len(set(models)):
            labels.update({id(r): label for r in runs})
            continue
        for run, shown in zip(runs, differing_settings([r["config"] for r in runs], _NOT_A_SETTING, _defaults())):
            labels[id(run)] = f"{label} ({shown})" if shown else label
    # Runs that still share a row and a model differ only in what is not a setting (another set
    # of seeds, or a copy of the run): named by their seeds, else by their folders, so that
    # neither hides the other (scripts/pool_repeats.py pools repeat sets into one row).
    shared: dict[tuple, list[dict]] = defaultdict(list)
    for run in members:
        shared[(labels[id(run)], run["config"]["model"])].append(run)
    for (label, _), runs in shared.items():
        if len(runs) < 2:
            continue
        paths = [Path(run["path"]) for run in runs]
        names = first_distinct([[f"seed={run['config'].get('seed')}" for run in runs],
                                [f"{path.parent.name}/{path.name}" for path in paths], [str(path) for path in paths]])
        for run, name in zip(runs, names):
            labels[id(run)] = f"{label[:-1]}, {name})" if label.endswith(")") else f"{label} ({name})"
    return labels


def _label_order(label: str) -> tuple:
    """Rows in ROW_ORDER by method name; a method's variants (``"Online EWC (coef=70)"``) together."""
    name = label if label in ROW_ORDER else label.split(" (")[0]      # "Offline (all tasks jointly)" is a name
    # Numbers in a variant's settings by value ("coef=70" before "coef=700", "=5" before "=10"):
    # splitting on digit runs puts text and numbers at alternating places, so they never meet.
    natural = [int(piece) if piece.isdigit() else piece for piece in re.split(r"(\d+)", label)]
    return (_row_order(name), natural)


def _cell(stats: dict | None) -> str:
    if not stats:
        return ""
    return f"{stats['mean']:.2f} +- {stats['std']:.2f}"


def _last_drift(run: dict) -> str:
    drift = run.get("first_task_feature_drift")
    if not drift:
        return ""
    return f"{drift['mean'][-1]:.3f} +- {drift['std'][-1]:.3f}"


def continual_tables(runs: list[dict]) -> str:
    """Markdown: per (benchmark, scenario), final average accuracy laid out like R1/R2, with the
    published numbers beside ours, then forgetting and time."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        if run.get("config", {}).get("benchmark"):
            groups[(run["config"]["benchmark"], run["config"]["scenario"])].append(run)
    parts = []
    for (benchmark, scenario), members in sorted(groups.items()):
        models = [m for m in MODEL_LABELS if any(r["config"]["model"] == m for r in members)]
        cells: dict[str, dict[str, dict]] = defaultdict(dict)
        row_labels = _row_labels(members)
        for run in members:
            cells[row_labels[id(run)]][run["config"]["model"]] = run
        published = PUBLISHED.get((benchmark, scenario), {"columns": [], "rows": {}})
        data = members[0]["data"]
        repeats = sorted({r["repeats"] for r in members})
        parts.append(f"### {benchmark}, incremental {scenario}: final average accuracy (%) over all tasks\n")
        parts.append(f"Data: {data['source']}; {sum(data['train_samples_per_task'])} training samples over "
                     f"{len(data['train_samples_per_task'])} tasks. Repeats: {', '.join(map(str, repeats))}. "
                     f"Optimiser steps per task: {members[0]['steps_per_task']}.")
        fisher = sorted({r["config"].get("fisher_average", "samples (before the setting existed)")
                         for r in members if r["config"].get("strategy") in ("ewc", "online-ewc")})
        if fisher:
            parts.append(f"EWC's Fisher averaged over: {', '.join(fisher)} ('batches' is Hsu et al.'s and the "
                         f"authors' code, which R1's lambdas were set for; 'samples' is 128x weaker at batch 128).")
        # Layer options set beyond a model's preset change what the model column means: name them.
        options = sorted({f"{r['config']['model']}: " + ", ".join(f"{k}={v}" for k, v in sorted(
            r["config"]["layer_options"].items())) for r in members
            if r["config"].get("layer_options") and r["config"]["model"] != "mlp"})
        if options:
            parts.append("Layer options beyond the preset: " + "; ".join(options) + ".")
        if data.get("subset"):
            parts.append("On this data subset the optimiser steps per task equal those of the full-data protocol "
                         "(4 epochs of the full MNIST task at batch 128); the published numbers used full MNIST.")
        header = ["method"] + [MODEL_LABELS[m] for m in models]
        if "mlp" in models and "neurocoder-released" in models:
            header.append("gap (released - MLP)")
        if "mlp" in models and "neurocoder" in models:
            header.append("gap (project - MLP)")
        header += published["columns"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        ordered = sorted(cells, key=_label_order)
        for label in ordered:
            row = [label] + [_cell(cells[label][m]["final_average_accuracy"]) if m in cells[label] else ""
                             for m in models]
            if "gap (released - MLP)" in header:
                a, b = cells[label].get("neurocoder-released"), cells[label].get("mlp")
                gap = (f"{a['final_average_accuracy']['mean'] - b['final_average_accuracy']['mean']:+.2f}"
                       if a and b else "")
                published_row = published["rows"].get(label)       # a variant row has no published match
                if gap and published_row and (benchmark, scenario) == ("split-mnist", "domain"):
                    try:
                        mlp_pub, nc_pub = (float(published_row[i].split(" ")[0]) for i in (0, 1))
                        gap += f" (published {nc_pub - mlp_pub:+.2f})"
                    except (ValueError, IndexError):
                        pass
                row.append(gap)
            if "gap (project - MLP)" in header:
                a, b = cells[label].get("neurocoder"), cells[label].get("mlp")
                row.append(f"{a['final_average_accuracy']['mean'] - b['final_average_accuracy']['mean']:+.2f}"
                           if a and b else "")
            row += published["rows"].get(label, [""] * len(published["columns"]))
            lines.append("| " + " | ".join(row) + " |")
        parts.append("\n".join(lines))
        bwt_lines = ["| method | " + " | ".join(MODEL_LABELS[m] for m in models) + " |",
                     "|" + "---|" * (len(models) + 1)]
        time_lines = list(bwt_lines)
        for label in ordered:
            bwt_lines.append("| " + label + " | " + " | ".join(
                _cell(cells[label][m].get("backward_transfer")) if m in cells[label] else "" for m in models) + " |")
            time_lines.append("| " + label + " | " + " | ".join(
                (f"{cells[label][m]['wall_seconds_total'] / cells[label][m]['repeats']:.0f} s, "
                 f"{cells[label][m]['parameters']:,} params") if m in cells[label] else "" for m in models) + " |")
        parts.append("\nForgetting (backward transfer, points; negative = forgotten):\n\n" + "\n".join(bwt_lines))
        drift_lines = [line for line in bwt_lines[:2]]
        for label in ordered:
            values = [_last_drift(cells[label][m]) if m in cells[label] else "" for m in models]
            if any(values):
                drift_lines.append("| " + label + " | " + " | ".join(values) + " |")
        if len(drift_lines) > 2:
            parts.append("\nDrift of the first task's hidden features after the last task (||h - h_1|| / ||h_1||, "
                         "h_1 right after task 1; mean +- std over repeats; runs made before this was measured "
                         "are blank):\n\n" + "\n".join(drift_lines))
        parts.append("\nTraining time per repeat (this machine) and parameters:\n\n" + "\n".join(time_lines))
        parts.append("")
    return "\n\n".join(parts)


def write_report(runs: list[dict], out: str | Path) -> Path:
    """report.md and its figures in ``out``: continual-learning runs (accuracy after each task,
    usage by task) and classification runs (accuracy bars, usage by class, composed weights)."""
    from .report_classification import classification_figures, classification_summary, classification_tables
    from .report_programs import program_figures, program_tables
    from .report_rl import rl_figures, rl_tables

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = "# Neurocoder report\n\nRuns: " + ", ".join(str(r["path"]) for r in runs) + "\n\n"
    text += continual_tables(runs)
    summary = classification_summary(runs)
    if summary:
        text += "### Object recognition: test accuracy (%), bold = beats plain by more than the seed std\n\n" + summary + "\n"
    text += classification_tables(runs)
    text += program_tables(runs)
    text += rl_tables(runs)
    figures = (_figures(runs, out) + classification_figures(runs, out) + program_figures(runs, out)
               + rl_figures(runs, out))
    if figures:
        text += "\n\n" + "\n".join(f"![{f.stem}]({f.name})" for f in figures) + "\n"
    (out / "report.md").write_text(text)
    return out / "report.md"


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None when matplotlib is missing
    (reports then hold tables only)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _figures(runs: list[dict], out: Path) -> list[Path]:
    plt = pyplot()
    if plt is None:
        return []
    made = []
    groups = defaultdict(list)
    for run in runs:
        if run.get("config", {}).get("benchmark"):
            groups[(run["config"]["benchmark"], run["config"]["scenario"])].append(run)
    for (benchmark, scenario), members in groups.items():
        # Colour names the method, line style and marker the model, so many runs stay readable.
        row_labels = _row_labels(members)
        methods = sorted(set(row_labels.values()), key=_label_order)
        colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
        styles = ["-", "--", ":", "-.", (0, (5, 1)), (0, (1, 1))]
        markers = ["o", "s", "^", "D", "v", "x"]
        models = sorted({r["config"]["model"] for r in members}, key=lambda m: list(MODEL_LABELS).index(m)
                        if m in MODEL_LABELS else len(MODEL_LABELS))
        fig, ax = plt.subplots(figsize=(10, 4.8))
        for run in sorted(members, key=lambda r: (_label_order(row_labels[id(r)]), r["config"]["model"])):
            curve = run["average_accuracy_after_each_task"]
            xs = list(range(1, len(curve["mean"]) + 1))
            method, model = row_labels[id(run)], run["config"]["model"]
            label = f"{method}, {MODEL_LABELS.get(model, model)}"
            which = models.index(model)
            ax.plot(xs, curve["mean"], marker=markers[which % len(markers)], markersize=3, label=label,
                    color=colours[method], linestyle=styles[which % len(styles)])
            low = [m - s for m, s in zip(curve["mean"], curve["std"])]
            high = [m + s for m, s in zip(curve["mean"], curve["std"])]
            ax.fill_between(xs, low, high, alpha=0.08, color=colours[method])
        ax.set_xticks(range(1, max(len(r["average_accuracy_after_each_task"]["mean"]) for r in members) + 1))
        ax.set_xlabel("tasks learnt")
        ax.set_ylabel("average accuracy on tasks so far (%)")
        ax.set_title(f"{benchmark}, incremental {scenario}")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out / f"accuracy_after_each_task_{benchmark}_{scenario}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    for run in runs:
        usage = run.get("usage_by_task") or {}
        if not run.get("config", {}).get("benchmark"):
            continue
        if not usage:
            continue
        fig, axes = plt.subplots(1, len(usage), figsize=(4.5 * len(usage), 2.8), squeeze=False)
        for ax, (layer, matrix) in zip(axes[0], usage.items()):
            image = ax.imshow(matrix, aspect="auto", cmap="magma")
            ax.set_title(f"layer {layer}", fontsize=9)
            ax.set_xlabel("program slot (U bank)")
            ax.set_ylabel("task")
            fig.colorbar(image, ax=ax)
        cfg = run["config"]
        fig.suptitle(f"mean read weight per slot by task: {cfg['benchmark']} {cfg['scenario']}, "
                     f"{_row_label(cfg)}, {cfg['model']}", fontsize=9)
        fig.tight_layout()
        path = out / f"usage_by_task_{Path(run['path']).name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        made.append(path)
    return made
