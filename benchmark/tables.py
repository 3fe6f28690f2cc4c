"""Results in the paper's shape: one row per method preset, one column per task.

Each cell is the task's headline metric (`top1` in percent for classification tasks); records
of several runs of the same preset (seeds) are averaged.
"""
from __future__ import annotations

import pandas as pd

# Metric keys that can head a column, in order of preference; a task with another headline adds it.
HEADLINES = ("top1",)


def headline(metrics: dict) -> float | None:
    for key in HEADLINES:
        if isinstance(metrics.get(key), (int, float)):
            return float(metrics[key])
    return None


def paper_table(records: list[dict]) -> pd.DataFrame:
    """Rows: method preset; columns: tasks in the order they first ran; cells: mean headline."""
    rows = [{"method": r["preset"], "task": r["task"], "value": headline(r["metrics"])}
            for r in records if r["status"] == "ok" and r["task"] != "pretrain"]
    rows = [row for row in rows if row["value"] is not None]
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows)
    order = list(dict.fromkeys(frame["task"]))
    table = frame.pivot_table(index="method", columns="task", values="value", aggfunc="mean")
    return table[order]
