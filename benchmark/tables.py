"""The tables `bench run` and `bench compare` print: a run's summary (each task's headline with
its interval, its random-init control and the gain over it, convergence, seconds), the
paper-shaped results table, the table over seeds of a `seeds=N` run, and the paired differences
of a comparison."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

METRIC_LABELS = {"miou": "mIoU"}

out = Console()


def _headline(record: dict) -> str:
    """'top1 74.0 [71.2, 76.8]': the headline with its 95% bootstrap interval over the val examples."""
    from benchmark.records import headline

    key, value = headline(record)
    if value is None:
        return ""
    ci = record["metrics"].get("ci95") or (math.nan, math.nan)
    return f"{key} {interval(value, ci[0], ci[1], key)}"


def interval(mean: float, low: float, high: float, metric: str, signed: bool = False) -> str:
    """'74.0 [71.2, 76.8]' at the metric's one precision (benchmark/formats.py's DIGITS), used by
    every table and format."""
    from benchmark.formats import cell_text, digits_of

    return cell_text(mean, low, high, digits_of(metric), signed)


def number(value: float, metric: str, signed: bool = False) -> str:
    return interval(value, math.nan, math.nan, metric, signed)


def gain_text(gain) -> tuple[str, str]:
    """('+1.5 [-1.3, +4.3]', verdict) of a gain over the random-init control."""
    d = gain.difference
    return interval(d.mean, d.low, d.high, gain.metric, signed=True), gain.verdict


def summary_table(records: list[dict]) -> Table:
    from benchmark.compare import control_gains
    from benchmark.records import is_control
    from tasks.core import CONVERGENCE_RULE

    main = [r for r in records if not is_control(r)]
    controls = {r["task"]: r for r in records if is_control(r)}
    gains = control_gains(records) if controls else {}
    first = main[0] if main else records[0]
    table = Table(title=f"{first['preset']} / {first['model']} / {first['data']} / seed {first['seed']}")
    columns = ["task", "result [95% CI over val examples]", "chance", "converged", "seconds", "status"]
    if controls:
        columns[3:3] = ["random init", "gain over random init [95% CI]", "verdict"]
    for column in columns:
        table.add_column(column, justify="right" if column in ("chance", "seconds") else "left", no_wrap=True)
    for r in main:
        m = r["metrics"]
        chance = next((number(m[k], k.removeprefix("chance_")) for k in ("chance_top1", "chance_mrr") if k in m), "")
        flag = {True: "yes", False: "NO", None: ""}[m.get("converged")] if r["task"] != "pretrain" else ""
        cells = [r["task"], _headline(r), chance, flag, f"{r['wall_seconds']:.1f}", r["status"]]
        if controls:
            control = controls.get(r["task"])
            gain = gain_text(gains[r["task"]]) if r["task"] in gains else ("", "")
            cells[3:3] = [_headline(control).partition(" ")[2] if control else "", *gain]
        table.add_row(*cells)
    if any(r["metrics"].get("converged") is not None for r in main if r["task"] != "pretrain"):
        table.caption = f"converged: the training loss has flattened ({CONVERGENCE_RULE})"
    if controls:
        table.caption = (table.caption + "; " if table.caption else "") + (
            "random init: the same task on the encoder as initialised from the run's seed, before pretraining; "
            "gain: paired over the val examples"
        )
    return table


def results_table(records: list[dict]) -> Table | None:
    """The paper's shape: rows method, columns tasks, headline metric in each cell."""
    from benchmark.leaderboard import paper_table

    frame = paper_table(records)
    if frame.empty:
        return None
    metrics = frame.attrs["metrics"]
    table = Table(title="results (top-1 %, val split; mIoU % for segmentation, MRR for mrr)")
    table.add_column("method", no_wrap=True)
    for task in frame.columns:
        metric = metrics[task]
        header = task if metric in ("top1", task) else f"{task} {METRIC_LABELS.get(metric, metric)}"
        table.add_column(header, justify="right", no_wrap=True)
    for method, row in frame.iterrows():
        table.add_row(
            method,
            *("" if value != value else number(value, metrics[task]) for task, value in row.items()),
        )
    return table


def print_wide(table: Table) -> None:
    """Never cut or wrap a column, on a terminal, piped or in a log file (rich would fit a table to
    80 columns there, cutting every header): the table gets the width its cells need."""
    needed = Console(width=100_000).measure(table).maximum
    Console(width=max(out.width, needed)).print(table)


def print_tables(records: list[dict]) -> None:
    print_wide(summary_table(records))
    results = results_table(records)
    if results is not None:
        print_wide(results)


def seeds_table(records: list[dict]) -> Table:
    """Per task: the headline's mean with a 95% Student-t interval over seeds, and each seed's value;
    with controls, the gain over random init paired over seeds and val examples."""
    from benchmark.compare import control_gains
    from benchmark.core.stats import t_interval
    from benchmark.records import headline, is_control

    by_task: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        metric, value = headline(r)
        if r["status"] == "ok" and value is not None and not is_control(r):
            by_task.setdefault(r["task"], []).append((r["seed"], value))
    gains = control_gains(records) if any(is_control(r) for r in records) else {}
    first = records[0]
    table = Table(title=f"{first['preset']} / {first['model']} / {first['data']}: mean [95% CI over seeds]")
    columns = ["task", "mean [95% CI]", "seeds", "per seed"]
    if gains:
        columns[2:2] = ["gain over random init [95% CI]", "verdict"]
    for column in columns:
        table.add_column(column, no_wrap=column != "per seed")
    for task, values in by_task.items():
        mean, low, high = t_interval([v for _, v in values])
        metric = headline(next(r for r in records if r["task"] == task))[0]
        per_seed = ", ".join(f"{s}: {number(v, metric)}" for s, v in values)
        cells = [f"{task} {metric}", interval(mean, low, high, metric), str(len(values)), per_seed]
        if gains:
            cells[2:2] = gain_text(gains[task]) if task in gains else ("", "")
        table.add_row(*cells)
    return table


def compare_table(rows: list) -> Table:
    """`bench compare`'s rows (benchmark/compare.py), with each side's gain over its control."""
    table = Table(title="A - B, paired over the same val examples (95% bootstrap CI over examples and seeds)")
    columns = ["task", "metric", "A", "B", "A - B", "95% CI", "seeds", "examples", "verdict"]
    with_gains = any(r.gain_a or r.gain_b for r in rows)
    if with_gains:
        columns += ["A gain over random init", "B gain over random init"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("task", "metric", "verdict") else "right", no_wrap=True)
    for r in rows:
        d = r.difference
        cells = [
            r.task,
            r.metric,
            number(r.a, r.metric),
            number(r.b, r.metric),
            number(d.mean, r.metric, signed=True),
            interval(d.mean, d.low, d.high, r.metric, signed=True).partition(" ")[2],
            str(len(r.seeds)),
            str(d.examples),
            r.verdict,
        ]
        if with_gains:
            cells += [", ".join(gain_text(g)) if g else "" for g in (r.gain_a, r.gain_b)]
        table.add_row(*cells)
    return table
