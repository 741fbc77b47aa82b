"""What the per-experiment reports share: grouping run folders into table rows."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable

__all__ = ["group_runs", "member_order"]


def group_runs(runs: list[dict], kind: str, group_field: str,
               member_field: str | Callable[[dict], str]) -> dict[str, dict[str, dict]]:
    """Run folders of one ``kind`` as {config[group_field]: {label: run}}, the label being
    config[member_field] (or ``member_field(config)`` when it is a function). Several runs of the
    same group and member (other settings, other seeds) keep one entry each, labelled
    ``"member (folder name)"``, instead of overwriting."""
    member = member_field if callable(member_field) else (lambda config: config[member_field])
    mine = [run for run in runs if run.get("config", {}).get("kind") == kind]
    count = Counter((run["config"][group_field], member(run["config"])) for run in mine)
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for run in mine:
        group, label = run["config"][group_field], member(run["config"])
        if count[group, label] > 1:
            label = f"{label} ({Path(run['path']).name})"
        groups[group][label] = run
    return groups


def member_order(order: list[str]):
    """A sort key for :func:`group_runs` labels: members in ``order`` first, a labelled repeat
    after its member, unknown members last."""
    def key(label: str) -> tuple[int, str]:
        member = label.split(" (")[0]
        return (order.index(member) if member in order else len(order)), label
    return key
