"""Results in the paper's shape: one row per method preset, one column per task.

Each cell is the task's headline metric (`top1` in percent for classification tasks, `miou` in
percent for segmentation, `mrr` for the world-model retrieval); records of several runs of the
same preset (seeds) are averaged.
"""
from __future__ import annotations

import pandas as pd

# Metric keys that can head a column, in order of preference; a task with another headline adds it.
HEADLINES = ("top1", "miou", "mrr")


def headline_key(metrics: dict) -> str | None:
    return next((key for key in HEADLINES if isinstance(metrics.get(key), (int, float))), None)


def headline(metrics: dict) -> float | None:
    key = headline_key(metrics)
    return None if key is None else float(metrics[key])


def paper_table(records: list[dict]) -> pd.DataFrame:
    """Rows: method preset; columns: tasks in the order they first ran; cells: mean headline.

    `table.attrs["metrics"]` maps each task column to its headline metric key.
    """
    rows = [{"method": r["preset"], "task": r["task"], "value": headline(r["metrics"]),
             "metric": headline_key(r["metrics"])}
            for r in records if r["status"] == "ok" and r["task"] != "pretrain"]
    rows = [row for row in rows if row["value"] is not None]
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows)
    order = list(dict.fromkeys(frame["task"]))
    table = frame.pivot_table(index="method", columns="task", values="value", aggfunc="mean")[order]
    table.attrs["metrics"] = dict(zip(frame["task"], frame["metric"]))
    return table
