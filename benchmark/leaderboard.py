"""Leaderboards: records from any number of result folders, as the paper's tables.

Rows are method presets (with model and data, and any config keys named in `by`), columns are
task/metric, cells are mean +- std over seeds, and the best value of each column is highlighted.
Written as Markdown, LaTeX, HTML and CSV; benchmark/spectrum.py draws the
invariance-equivariance figure from the same records.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from benchmark.core.stats import Evidence, paired_difference, t_interval
from benchmark.records import (  # noqa: F401 (API)
    LOWER_IS_BETTER,
    PRETRAINED,
    RANDOM_INIT,
    data_label,
    headline,
    headline_metric,
    is_control,
    read_records,
)
from tasks import TASKS

ROW_KEYS = ["method", "preset", "model", "data"]


def _config_value(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _date(value: str | None) -> dt.datetime | None:
    if value is None:
        return None
    parsed = dt.datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def load_frame(
    folders: list[str | Path],
    methods: list[str] | None = None,
    tasks: list[str] | None = None,
    datasets: list[str] | None = None,
    since: str | None = None,
    until: str | None = None,
    by: list[str] | None = None,
    all_metrics: bool = False,
    problems: list[str] | None = None,
) -> pd.DataFrame:
    """One row per (successful record, metric): the long form every table is pivoted from.

    Filters match method name or preset, task, dataset, and the finish time (ISO dates).
    Pretraining records are left out unless asked for by tasks=[..., 'pretrain'].
    """
    start, end = _date(since), _date(until)
    rows = []
    for r in read_records(*folders, problems=problems):
        if r.get("status") != "ok":
            continue
        if tasks is None and r["task"] == "pretrain" or tasks is not None and r["task"] not in tasks:
            continue
        if methods and r["method"] not in methods and r["preset"] not in methods:
            continue
        if datasets and r["data"] not in datasets and data_label(r) not in datasets:
            continue
        finished = _date(r["finished"])
        if start and finished < start or end and finished > end:
            continue
        metrics = r["metrics"] if all_metrics else dict([headline(r)])
        head = headline(r)[0]
        ci = r["metrics"].get("ci95") or [math.nan, math.nan]
        evidence = str(Path(r["run_dir"]) / "records" / r["examples"]["file"]) if r.get("examples") else None
        extra = {key: str(_config_value(r.get("config", {}), key)) for key in by or []}
        eval_set = (r.get("examples") or {}).get("fingerprint") or ""
        for metric, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value is None:
                continue
            rows.append(
                {
                    **{k: r[k] for k in ROW_KEYS},
                    "data": data_label(r),
                    **extra,
                    "init": RANDOM_INIT if is_control(r) else PRETRAINED,
                    "task": r["task"],
                    "metric": metric,
                    "value": float(value),
                    "seed": r["seed"],
                    "run_id": r["run_id"],
                    "finished": r["finished"],
                    "run_dir": r.get("run_dir"),
                    # The headline's own interval over val examples and the evidence behind it.
                    "ci_low": ci[0] if metric == head else math.nan,
                    "ci_high": ci[1] if metric == head else math.nan,
                    "evidence": evidence if metric == head else None,
                    # What the task was evaluated on (val examples, labels, draws): numbers compare
                    # only within one evaluation set.
                    "eval_set": eval_set,
                    "git_commit": r.get("git_commit"),
                }
            )
    columns = (
        ROW_KEYS
        + list(by or [])
        + [
            "init",
            "task",
            "metric",
            "value",
            "seed",
            "run_id",
            "finished",
            "run_dir",
            "ci_low",
            "ci_high",
            "evidence",
            "eval_set",
            "git_commit",
        ]
    )
    return pd.DataFrame(rows, columns=columns)


def paper_table(records: list[dict]) -> pd.DataFrame:
    """The paper's shape for one run or a few: rows method preset, columns tasks in the order they
    ran, cells the mean headline over the records given (seeds).

    `table.attrs["metrics"]` maps each task column to its headline metric.
    """
    rows = [
        {
            "method": r["preset"] + (" (random init)" if is_control(r) else ""),
            "task": r["task"],
            "metric": metric,
            "value": value,
        }
        for r in records
        if r["status"] == "ok" and r["task"] in TASKS
        for metric, value in [headline(r)]
        if value is not None
    ]
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows)
    order = list(dict.fromkeys(frame["task"]))
    table = frame.pivot_table(index="method", columns="task", values="value", aggfunc="mean")[order]
    table.attrs["metrics"] = dict(zip(frame["task"], frame["metric"]))
    return table


@dataclass
class Board:
    """Statistics over seeds, indexed by row keys, one column per (task, metric).

    low / high: the 95% interval of the mean, Student-t over seeds when a cell has several, the
    record's own bootstrap interval over val examples when it has one. `separated` says, per
    column, whether the best row is distinguishable from the runner-up (see `significance`).
    """

    mean: pd.DataFrame
    std: pd.DataFrame
    n: pd.DataFrame
    low: pd.DataFrame
    high: pd.DataFrame
    separated: dict = field(default_factory=dict)
    # Tasks shown in several columns, one per evaluation set (see `split_eval_sets`).
    split: list = field(default_factory=list)
    sources: list = field(default_factory=list)
    commits: list = field(default_factory=list)

    def best(self) -> dict[tuple, set]:
        """For each column, the rows holding the best mean (all of them on a tie)."""
        out = {}
        for column in self.mean.columns:
            values = self.mean[column].dropna()
            if len(values):
                top = values.min() if column[1] in LOWER_IS_BETTER else values.max()
                out[column] = set(values.index[values == top])
        return out

    def runner_up(self, column: tuple) -> tuple | None:
        values = self.mean[column].dropna().sort_values(ascending=column[1] in LOWER_IS_BETTER)
        return values.index[1] if len(values) > 1 else None

    def bold(self) -> dict[tuple, set]:
        """The best cell of each column, when it is distinguishable from the runner-up."""
        return {c: rows for c, rows in self.best().items() if len(rows) == 1 and self.separated.get(c, False)}

    def tied(self) -> dict[tuple, set]:
        """Cells not distinguishable from their column's best: the best and the runner-up."""
        out = {}
        for column, rows in self.best().items():
            second = self.runner_up(column)
            if second is not None and not self.separated.get(column, False):
                out[column] = rows | {second}
        return out


def _seed_interval(values: pd.Series, ci_low: pd.Series, ci_high: pd.Series) -> tuple[float, float]:
    if len(values) > 1:
        return t_interval(list(values))[1:]
    return float(ci_low.iloc[0]), float(ci_high.iloc[0])


GAIN = " gain"  # suffix of the metric of a gain-over-random-init column: "top1 gain"


def board(frame: pd.DataFrame, by: list[str] | None = None) -> Board:
    """Rows: configurations; columns: each task's headline (and any other metric asked for), and,
    where random-init control records exist, the task's gain over its control."""
    if "init" in frame:
        controls, frame = frame[frame["init"] == RANDOM_INIT], frame[frame["init"] != RANDOM_INIT]
    else:
        controls = frame.iloc[0:0]
    if frame.empty:
        raise ValueError("no records match: nothing to tabulate")
    frame, controls, split = split_eval_sets(frame, controls)
    keys = ROW_KEYS + list(by or [])
    # Several records of one seed (a cell evaluated twice): the latest counts.
    latest = frame.sort_values("finished").groupby(keys + ["task", "metric", "seed"], as_index=False).last()
    grouped = latest.groupby(keys + ["task", "metric"])
    stats = grouped["value"].agg(["mean", "std", "count"])
    bounds = grouped.apply(
        lambda g: pd.Series(_seed_interval(g["value"], g["ci_low"], g["ci_high"]), index=["low", "high"]),
        include_groups=False,
    )
    stats = stats.join(bounds)
    pivot = {name: stats[name].unstack(["task", "metric"]) for name in ("mean", "std", "count", "low", "high")}
    b = Board(pivot["mean"], pivot["std"], pivot["count"], pivot["low"], pivot["high"])
    if not controls.empty:
        _add_gains(b, latest, controls.sort_values("finished").groupby(keys + ["task", "metric", "seed"]).last(), keys)
    b.separated = significance(b, latest, keys)
    b.commits = sorted({str(c) for c in frame["git_commit"].dropna()})
    b.split = split
    return b


def split_eval_sets(frame: pd.DataFrame, controls: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """A task evaluated on more than one evaluation set becomes one column per set, so that no
    column ranks, pairs or marks numbers measured on different examples. Returns the renamed
    frames and the tasks split.

    The sets are told apart by the data configuration (the data column) and, within one, by the
    records' evidence fingerprints where two records of the same seed differ (a task's own
    draws, MRR's crops and banks, follow the seed: across seeds a fingerprint may change with
    the evaluation set staying the same). Columns are tagged with the data configuration, and
    with the fingerprint where that does not tell them apart."""
    if "eval_set" not in frame:
        return frame, controls, []
    frame, controls = frame.copy(), controls.copy()
    split = []
    for task in sorted(frame["task"].unique()):
        mine = frame[frame["task"] == task]
        per_seed = mine.groupby(["data", "seed"])["eval_set"].nunique()
        by_fingerprint = set(per_seed[per_seed > 1].index.get_level_values("data"))
        if mine["data"].nunique() < 2 and not by_fingerprint:
            continue
        split.append(task)
        for part in (frame, controls):
            pick = part["task"] == task
            part.loc[pick, "task"] = [
                f"{task} [{d}{' ' + (e[:8] or 'no evidence') if d in by_fingerprint else ''}]"
                for d, e in zip(part.loc[pick, "data"], part.loc[pick, "eval_set"])
            ]
    return frame, controls, split


def _add_gains(b: Board, latest: pd.DataFrame, controls: pd.DataFrame, keys: list[str]) -> None:
    """A '<headline> gain' column after each task column that has control records: pretrained
    minus random init, paired over seeds and val examples (benchmark/compare.py's bootstrap)."""
    controls = controls.reset_index()
    added = []
    for task, metric in list(b.mean.columns):
        pick = latest[(latest["task"] == task) & (latest["metric"] == metric)]
        theirs = controls[(controls["task"] == task) & (controls["metric"] == metric)]
        if theirs.empty:
            continue
        column = (task, metric + GAIN)
        for idx in b.mean.index:
            mine, control = _evidence_by_seed(pick, keys, idx), _evidence_by_seed(theirs, keys, idx)
            seeds = sorted(set(mine) & set(control))
            if not seeds:
                continue
            try:
                read = lambda path: Evidence.from_bytes(Path(path).read_bytes())  # noqa: E731
                diff = paired_difference([(read(mine[s]), read(control[s])) for s in seeds])
            except (OSError, ValueError):
                continue
            for frame_, value in ((b.mean, diff.mean), (b.low, diff.low), (b.high, diff.high), (b.n, len(seeds))):
                frame_.loc[idx, column] = value
            b.std.loc[idx, column] = math.nan
            added.append(column)
    if added:
        pairs = [(col, (col[0], col[1] + GAIN)) for col in b.mean.columns if not col[1].endswith(GAIN)]
        kept = [c for pair in pairs for c in pair if c in b.mean]
        order = pd.MultiIndex.from_tuples(kept, names=b.mean.columns.names)
        for name in ("mean", "std", "n", "low", "high"):
            setattr(b, name, getattr(b, name).reindex(columns=order))


def _evidence_by_seed(pick: pd.DataFrame, keys: list[str], row: tuple) -> dict[int, str]:
    """seed -> evidence file of one board row's records in `pick`."""
    mine = pick[(pick[keys].astype(str) == pd.Series(row, index=keys).astype(str)).all(axis=1)]
    return {seed: path for seed, path in zip(mine["seed"], mine["evidence"]) if path}


def significance(b: Board, latest: pd.DataFrame, keys: list[str]) -> dict[tuple, bool]:
    """Per column: is the best row distinguishable from the runner-up?

    With per-example evidence on both rows: the paired bootstrap over the seeds they share and the
    val examples (benchmark/core/stats.py), distinguishable when the 95% interval of the difference
    excludes 0. Without it (records of older versions, training losses): when both rows have
    several seeds and their 95% intervals over seeds do not overlap. Otherwise: not shown as
    distinguishable.
    """
    out = {}
    for column, rows in b.best().items():
        second = b.runner_up(column)
        if second is None or len(rows) > 1:
            out[column] = False
            continue
        (top,) = rows
        pick = latest[(latest["task"] == column[0]) & (latest["metric"] == column[1])]
        a_runs, b_runs = _evidence_by_seed(pick, keys, top), _evidence_by_seed(pick, keys, second)
        seeds = sorted(set(a_runs) & set(b_runs))
        if seeds:
            try:
                pairs = [
                    (
                        Evidence.from_bytes(Path(a_runs[s]).read_bytes()),
                        Evidence.from_bytes(Path(b_runs[s]).read_bytes()),
                    )
                    for s in seeds
                ]
                out[column] = paired_difference(pairs).verdict() != "not distinguishable"
                continue
            except (OSError, ValueError):
                pass  # evidence missing or on other examples: fall back to the seeds
        if b.n.at[top, column] > 1 and b.n.at[second, column] > 1:
            lower = column[1] in LOWER_IS_BETTER
            out[column] = (
                (b.high.at[top, column] < b.low.at[second, column])
                if lower
                else (b.low.at[top, column] > b.high.at[second, column])
            )
        else:
            out[column] = False
    return out
