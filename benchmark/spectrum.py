"""The invariance-equivariance spectrum (the IWM paper's figure): per run, world-model MRR against
linear-probe and predictor-finetuning accuracy, drawn with their correlations, from a leaderboard
frame (benchmark/leaderboard.py, `load_frame`).

A method without a world model (DINO: no predictor, so no MRR) has no place on the x axis; it sits
at the invariant end. Its accuracies are drawn as references across each panel: a line at the
mean over its seeds and a band for the 95% interval, so the paper's reading (invariant methods win
the linear probe, equivariant ones the predictor tasks) can be checked against it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from benchmark.core.stats import t_interval
from benchmark.leaderboard import ROW_KEYS
from benchmark.records import RANDOM_INIT

SPECTRUM_X = ("mrr", "mrr")
SPECTRUM_Y = (("linear", "top1"), ("predictor_ft", "top1"))


def _wide(frame: pd.DataFrame, by: list[str] | None) -> pd.DataFrame:
    keys = ROW_KEYS + list(by or []) + ["seed"]
    if "init" in frame:  # random-init controls are not points of the spectrum
        frame = frame[frame["init"] != RANDOM_INIT]
    if frame.empty:
        return pd.DataFrame()
    return frame.pivot_table(index=keys, columns=["task", "metric"], values="value", aggfunc="last")


def spectrum_points(frame: pd.DataFrame, by: list[str] | None = None) -> pd.DataFrame:
    """Per (row, seed): MRR and the accuracies it is plotted against; rows without MRR dropped."""
    wide = _wide(frame, by)
    wanted = [c for c in (SPECTRUM_X, *SPECTRUM_Y) if c in wide.columns]
    if SPECTRUM_X not in wanted:
        return pd.DataFrame()
    return wide[wanted].dropna(subset=[SPECTRUM_X])


def spectrum_references(frame: pd.DataFrame, by: list[str] | None = None) -> pd.DataFrame:
    """Per (row, seed) of the rows that have no MRR at all (no world model): their accuracies."""
    wide = _wide(frame, by)
    ys = [c for c in SPECTRUM_Y if c in wide.columns]
    if not ys:
        return pd.DataFrame()
    row_levels = [name for name in wide.index.names if name != "seed"]
    has_mrr = (
        wide[SPECTRUM_X].notna().groupby(level=row_levels).transform("any")
        if SPECTRUM_X in wide.columns
        else pd.Series(False, index=wide.index)
    )
    return wide.loc[~has_mrr, ys].dropna(how="all")


def correlations(points: pd.DataFrame) -> dict[str, float]:
    """Pearson correlation of MRR with each accuracy (NaN with fewer than 3 runs)."""
    out = {}
    for y in SPECTRUM_Y:
        if y in points.columns:
            pair = points[[SPECTRUM_X, y]].dropna()
            out[f"{y[0]} {y[1]}"] = pair[SPECTRUM_X].corr(pair[y]) if len(pair) >= 3 else float("nan")
    return out


def spectrum_plot(points: pd.DataFrame, path: Path, references: pd.DataFrame | None = None) -> dict[str, float]:
    """MRR (x) against each accuracy (y), one panel per accuracy, a colour per leaderboard row, and
    the `references` rows (no MRR) as horizontal bands; returns the correlations (over the runs
    with MRR only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corr = correlations(points)
    ys = [y for y in SPECTRUM_Y if y in points.columns]
    # One colour and label per leaderboard row (its keys, --by ones included): the mean over its
    # seeds, with 95% interval bars over seeds when it has several, its seeds as faint points.
    row_levels = [name for name in points.index.names if name != "seed"]
    fig, axes = plt.subplots(1, len(ys), figsize=(6 * len(ys), 4.5), squeeze=False)
    for ax, y in zip(axes[0], ys):
        pair = points[[SPECTRUM_X, y]].dropna()
        for i, (row, mine) in enumerate(pair.groupby(level=row_levels, sort=True)):
            label = row_label(row, row_levels)
            colour = f"C{i % 10}"
            xs, ys_ = mine[SPECTRUM_X].tolist(), mine[y].tolist()
            ax.scatter(xs, ys_, color=colour, alpha=0.35, s=14)
            x_mean, x_low, x_high = t_interval(xs)
            y_mean, y_low, y_high = t_interval(ys_)
            ax.errorbar(
                [x_mean],
                [y_mean],
                xerr=[[x_mean - x_low], [x_high - x_mean]],
                yerr=[[y_mean - y_low], [y_high - y_mean]],
                fmt="o",
                color=colour,
                capsize=3,
                label=f"{label} (n={len(xs)})",
            )
        drawn = pair.groupby(level=row_levels).ngroups
        if references is not None and y in references.columns:
            ref = references[y].dropna()
            for j, (row, mine) in enumerate(ref.groupby(level=row_levels, sort=True)):
                mean, low, high = t_interval(mine.tolist())
                colour = f"C{(drawn + j) % 10}"
                ax.axhline(mean, color=colour, linestyle="--")
                if high > low:
                    ax.axhspan(low, high, color=colour, alpha=0.12)
                ax.plot(
                    [],
                    [],
                    color=colour,
                    linestyle="--",
                    label=f"{row_label(row, row_levels)}: no world model (n={len(mine)})",
                )
        ax.set_xlabel("world model MRR (equivariance)")
        ax.set_ylabel(f"{y[0]} {y[1]}")
        r = corr[f"{y[0]} {y[1]}"]
        ax.set_title(
            f"{y[0]} {y[1]} against MRR: "
            + (
                f"r = {r:+.2f} over {len(pair)} runs"
                if r == r
                else f"{len(pair)} runs (r needs 3 or more)"
                if len(pair) < 3
                else f"{len(pair)} runs (r undefined: no spread)"
            )
        )
        ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return corr


def row_label(row, row_levels: list[str]) -> str:
    """A leaderboard row's name in a legend: its keys but the model and the data."""
    row = row if isinstance(row, tuple) else (row,)
    return " / ".join(str(v) for v, name in zip(row, row_levels) if name not in ("model", "data"))
