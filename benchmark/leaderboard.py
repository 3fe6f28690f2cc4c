"""Leaderboards: records from any number of result folders, as the paper's tables.

Rows are method presets (with model and data, and any config keys named in `by`), columns are
task/metric, cells are mean +- std over seeds, and the best value of each column is highlighted.
Written as Markdown, LaTeX, HTML and CSV; `spectrum_plot` draws the invariance-equivariance
figure (MRR against linear and predictor-finetuning accuracy) with the correlations.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from benchmark.records import LOWER_IS_BETTER, headline, headline_metric, read_records  # noqa: F401 (API)
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
        if datasets and r["data"] not in datasets:
            continue
        finished = _date(r["finished"])
        if start and finished < start or end and finished > end:
            continue
        metrics = r["metrics"] if all_metrics else dict([headline(r)])
        extra = {key: str(_config_value(r.get("config", {}), key)) for key in by or []}
        for metric, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value is None:
                continue
            rows.append(
                {
                    **{k: r[k] for k in ROW_KEYS},
                    **extra,
                    "task": r["task"],
                    "metric": metric,
                    "value": float(value),
                    "seed": r["seed"],
                    "run_id": r["run_id"],
                    "finished": r["finished"],
                    "run_dir": r.get("run_dir"),
                }
            )
    columns = ROW_KEYS + list(by or []) + ["task", "metric", "value", "seed", "run_id", "finished", "run_dir"]
    return pd.DataFrame(rows, columns=columns)


def paper_table(records: list[dict]) -> pd.DataFrame:
    """The paper's shape for one run or a few: rows method preset, columns tasks in the order they
    ran, cells the mean headline over the records given (seeds).

    `table.attrs["metrics"]` maps each task column to its headline metric.
    """
    rows = [
        {"method": r["preset"], "task": r["task"], "metric": metric, "value": value}
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
    """mean / std / n over seeds, indexed by row keys, one column per (task, metric)."""

    mean: pd.DataFrame
    std: pd.DataFrame
    n: pd.DataFrame

    def best(self) -> dict[tuple, set]:
        """For each column, the rows holding the best mean (all of them on a tie)."""
        out = {}
        for column in self.mean.columns:
            values = self.mean[column].dropna()
            if len(values):
                top = values.min() if column[1] in LOWER_IS_BETTER else values.max()
                out[column] = set(values.index[values == top])
        return out


def board(frame: pd.DataFrame, by: list[str] | None = None) -> Board:
    if frame.empty:
        raise ValueError("no records match: nothing to tabulate")
    keys = ROW_KEYS + list(by or [])
    # Several records of one seed (a cell evaluated twice): the latest counts.
    latest = frame.sort_values("finished").groupby(keys + ["task", "metric", "seed"], as_index=False).last()
    grouped = latest.groupby(keys + ["task", "metric"])["value"]
    stats = grouped.agg(["mean", "std", "count"])
    pivot = {name: stats[name].unstack(["task", "metric"]) for name in ("mean", "std", "count")}
    return Board(pivot["mean"], pivot["std"], pivot["count"])


def cell_text(mean: float, std: float, n: float, digits: int = 2) -> str:
    if math.isnan(mean):
        return ""
    if n > 1 and not math.isnan(std):
        return f"{mean:.{digits}f} ± {std:.{digits}f}"
    return f"{mean:.{digits}f}"


def _cells(b: Board, digits: int) -> tuple[list[str], list[str], list[list[str]], list[list[bool]]]:
    """(row labels, column labels, texts, is-best) shared by every format."""
    best = b.best()
    rows = [" / ".join(str(v) for v in (idx if isinstance(idx, tuple) else (idx,))) for idx in b.mean.index]
    columns = [f"{task} {metric}" for task, metric in b.mean.columns]
    texts, marks = [], []
    for idx in b.mean.index:
        texts.append([cell_text(b.mean.at[idx, c], b.std.at[idx, c], b.n.at[idx, c], digits) for c in b.mean.columns])
        marks.append([idx in best.get(c, ()) for c in b.mean.columns])
    return rows, columns, texts, marks


def row_header(b: Board) -> str:
    return " / ".join(b.mean.index.names)


def to_markdown(b: Board, digits: int = 2) -> str:
    rows, columns, texts, marks = _cells(b, digits)
    lines = ["| " + " | ".join([row_header(b), *columns]) + " |", "|" + "---|" * (len(columns) + 1)]
    for label, row, mark in zip(rows, texts, marks):
        shown = [f"**{t}**" if m and t else t for t, m in zip(row, mark)]
        lines.append("| " + " | ".join([label, *shown]) + " |")
    return "\n".join(lines) + "\n"


def _latex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#")):
        text = text.replace(a, b)
    return text


def to_latex(b: Board, digits: int = 2) -> str:
    rows, columns, texts, marks = _cells(b, digits)
    lines = [
        r"\begin{tabular}{l" + "c" * len(columns) + "}",
        r"\toprule",
        " & ".join(_latex_escape(c) for c in [row_header(b), *columns]) + r" \\",
        r"\midrule",
    ]
    for label, row, mark in zip(rows, texts, marks):
        shown = [t.replace("±", r"$\pm$") for t in row]
        shown = [rf"\textbf{{{t}}}" if m and t else t for t, m in zip(shown, mark)]
        lines.append(" & ".join([_latex_escape(label), *shown]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def to_html(b: Board, digits: int = 2) -> str:
    from html import escape

    rows, columns, texts, marks = _cells(b, digits)
    head = "".join(f"<th>{escape(c)}</th>" for c in [row_header(b), *columns])
    body = []
    for label, row, mark in zip(rows, texts, marks):
        shown = [f"<b>{escape(t)}</b>" if m and t else escape(t) for t, m in zip(row, mark)]
        body.append(f"<tr><th>{escape(label)}</th>" + "".join(f"<td>{t}</td>" for t in shown) + "</tr>")
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>\n"


def to_csv(b: Board) -> str:
    """Numbers, not text: mean, std and n per column."""
    parts = {"mean": b.mean, "std": b.std, "n": b.n}
    wide = pd.concat(parts, axis=1)
    wide.columns = [f"{task}/{metric}/{stat}" for stat, task, metric in wide.columns]
    return wide.sort_index(axis=1).to_csv()


def to_rich(b: Board, title: str, digits: int = 2):
    from rich.table import Table

    rows, columns, texts, marks = _cells(b, digits)
    table = Table(title=title)
    table.add_column(row_header(b))
    for c in columns:
        table.add_column(c, justify="right")
    for label, row, mark in zip(rows, texts, marks):
        table.add_row(label, *[f"[bold green]{t}[/]" if m and t else t for t, m in zip(row, mark)])
    return table


def write_tables(b: Board, out_dir: Path, digits: int = 2) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix, text in (
        ("md", to_markdown(b, digits)),
        ("tex", to_latex(b, digits)),
        ("html", to_html(b, digits)),
        ("csv", to_csv(b)),
    ):
        path = out_dir / f"leaderboard.{suffix}"
        path.write_text(text)
        written.append(path)
    return written


# ---- the invariance-equivariance spectrum (the paper's figure) ------------------------------

SPECTRUM_X = ("mrr", "mrr")
SPECTRUM_Y = (("linear", "top1"), ("predictor_ft", "top1"))


def spectrum_points(frame: pd.DataFrame, by: list[str] | None = None) -> pd.DataFrame:
    """Per (row, seed): MRR and the accuracies it is plotted against; rows without MRR dropped."""
    keys = ROW_KEYS + list(by or []) + ["seed"]
    wide = frame.pivot_table(index=keys, columns=["task", "metric"], values="value", aggfunc="last")
    wanted = [c for c in (SPECTRUM_X, *SPECTRUM_Y) if c in wide.columns]
    if SPECTRUM_X not in wanted:
        return pd.DataFrame()
    return wide[wanted].dropna(subset=[SPECTRUM_X])


def correlations(points: pd.DataFrame) -> dict[str, float]:
    """Pearson correlation of MRR with each accuracy (NaN with fewer than 3 runs)."""
    out = {}
    for y in SPECTRUM_Y:
        if y in points.columns:
            pair = points[[SPECTRUM_X, y]].dropna()
            out[f"{y[0]} {y[1]}"] = pair[SPECTRUM_X].corr(pair[y]) if len(pair) >= 3 else float("nan")
    return out


def spectrum_plot(points: pd.DataFrame, path: Path) -> dict[str, float]:
    """MRR (x) against each accuracy (y), one panel per accuracy; returns the correlations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corr = correlations(points)
    ys = [y for y in SPECTRUM_Y if y in points.columns]
    fig, axes = plt.subplots(1, len(ys), figsize=(5 * len(ys), 4), squeeze=False)
    for ax, y in zip(axes[0], ys):
        pair = points[[SPECTRUM_X, y]].dropna()
        labels = pair.index.get_level_values("preset")
        for preset in sorted(set(labels)):
            mine = pair[labels == preset]
            ax.scatter(mine[SPECTRUM_X], mine[y], label=preset)
        ax.set_xlabel("world model MRR (equivariance)")
        ax.set_ylabel(f"{y[0]} {y[1]}")
        ax.set_title(f"r = {corr[f'{y[0]} {y[1]}']:+.2f}")
        ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return corr
