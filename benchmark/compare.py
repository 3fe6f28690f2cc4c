"""`bench compare A B`: is one side better than the other, task by task, and by how much?

Each side is any set of folders holding records (a run folder, a sweep folder, a results
folder) with the runs of ONE configuration, possibly at several seeds. For every task both sides
have, runs are paired by seed, each pair must have been evaluated on the same val examples (the
evidence fingerprints agree), and the difference A - B of the headline gets a 95% interval
from a bootstrap that resamples the seed pairs and, within each, the val examples (paired:
the same examples for A and B). The verdict says whether the interval excludes 0.

The same machinery gives each side's gain over its random-init control (`control_gains`): the
pretrained records against the control records of the same runs (records/<task>.random_init.json),
paired by seed and val example.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from benchmark.core.stats import Difference, paired_difference
from benchmark.records import LOWER_IS_BETTER, headline, is_control, read_evidence, read_records
from tasks import TASKS


class CompareError(ValueError):
    """Sides that cannot be compared (nothing in common, several configurations on one side)."""


@dataclass
class Gain:
    """Pretrained minus random-init control of one task, paired by seed and val example."""

    task: str
    metric: str
    pretrained: float  # mean headline over the paired seeds
    random_init: float
    seeds: list[int]
    difference: Difference

    @property
    def verdict(self) -> str:
        verdict = self.difference.verdict(self.metric in LOWER_IS_BETTER)
        return {"A better": "pretrained better", "B better": "random init better"}.get(verdict, verdict)


@dataclass
class Row:
    task: str
    metric: str
    a: float
    b: float
    seeds: list[int]
    difference: Difference | None  # None: refused
    verdict: str
    # Each side's gain over its random-init control, where the side has control records.
    gain_a: Gain | None = None
    gain_b: Gain | None = None


def by_task_and_seed(records: list[dict]) -> dict[str, dict[int, dict]]:
    """task -> seed -> the latest successful record."""
    out: dict[str, dict[int, dict]] = {}
    for r in sorted((r for r in records if r.get("status") == "ok"), key=lambda r: r["finished"]):
        out.setdefault(r["task"], {})[r["seed"]] = r
    return out


def control_gains(records: list[dict]) -> dict[str, Gain]:
    """task -> gain over the random-init control, for the records of ONE configuration (a run, or
    its seeds). Tasks without control records, or whose evidence does not pair, are left out."""
    main = by_task_and_seed([r for r in records if not is_control(r)])
    control = by_task_and_seed([r for r in records if is_control(r)])
    gains = {}
    for task, runs in main.items():
        seeds = sorted(set(runs) & set(control.get(task, {})))
        if task not in TASKS or not seeds:
            continue
        pairs = [(read_evidence(runs[s]), read_evidence(control[task][s])) for s in seeds]
        if any(x is None or y is None for x, y in pairs):
            continue
        try:
            diff = paired_difference(pairs)
        except ValueError:
            continue
        metric = headline(runs[seeds[0]])[0]
        gains[task] = Gain(
            task,
            metric,
            sum(headline(runs[s])[1] for s in seeds) / len(seeds),
            sum(headline(control[task][s])[1] for s in seeds) / len(seeds),
            seeds,
            diff,
        )
    return gains


def side(folders: list[str | Path], label: str) -> tuple[dict[str, dict[int, dict]], dict[str, Gain]]:
    """(task -> seed -> the latest successful record, task -> gain over the random-init control)
    for one configuration."""
    records = [r for r in read_records(*folders) if r.get("status") == "ok"]
    if not any(not is_control(r) for r in records):
        raise CompareError(f"{label}: no successful records under {', '.join(map(str, folders))}")
    configs = {(r["preset"], r["model"], r["data"]) for r in records}
    if len(configs) > 1:
        names = ", ".join(" / ".join(c) for c in sorted(configs))
        raise CompareError(f"{label} holds runs of several configurations ({names}): give each side one of them")
    return by_task_and_seed([r for r in records if not is_control(r)]), control_gains(records)


def compare(
    a_folders: list[str | Path], b_folders: list[str | Path], tasks: tuple[str, str] | None = None
) -> tuple[list[Row], list[str]]:
    """(one row per task both sides hold, the reasons of any refusal). `tasks` = (task of A, task
    of B) compares two tasks scored on the same val examples instead (e.g. the pretrained and the
    random predictor of the same runs)."""
    (a, gains_a), (b, gains_b) = side(a_folders, "A"), side(b_folders, "B")
    rows, refused = [], []
    if tasks is None:
        # Evaluation tasks only: pretraining's headline is a training loss, with no val examples.
        matched = [(t, t) for t in a if t in b and t in TASKS]
    else:
        for task, held, label in ((tasks[0], a, "A"), (tasks[1], b, "B")):
            if task not in held or task not in TASKS:
                raise CompareError(f"{label} has no records of task {task} (it has: {', '.join(held)})")
        matched = [tasks]
    for task_a, task_b in matched:
        task = task_a if task_a == task_b else f"{task_a} vs {task_b}"
        seeds = sorted(set(a[task_a]) & set(b[task_b]))
        metric = headline(next(iter(a[task_a].values())))[0]
        if headline(next(iter(b[task_b].values())))[0] != metric:
            raise CompareError(f"{task}: the two tasks report different headline metrics")
        if not seeds:
            refused.append(f"{task}: no seed in common (A: {sorted(a[task_a])}, B: {sorted(b[task_b])})")
            continue
        pairs = [(read_evidence(a[task_a][s]), read_evidence(b[task_b][s])) for s in seeds]
        mean_a = sum(headline(a[task_a][s])[1] for s in seeds) / len(seeds)
        mean_b = sum(headline(b[task_b][s])[1] for s in seeds) / len(seeds)
        if any(x is None or y is None for x, y in pairs):
            refused.append(f"{task}: a record has no per-example evidence (written before the harness kept it)")
            continue
        try:
            diff = paired_difference(pairs)
        except ValueError as exc:
            refused.append(f"{task}: {exc}")
            continue
        verdict = diff.verdict(metric in LOWER_IS_BETTER)
        rows.append(Row(task, metric, mean_a, mean_b, seeds, diff, verdict, gains_a.get(task_a), gains_b.get(task_b)))
    if not rows and not refused:
        raise CompareError(f"A and B have no evaluation task in common (A: {', '.join(a)}; B: {', '.join(b)})")
    return rows, refused
