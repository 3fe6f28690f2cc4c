"""How a leaderboard is written: each metric at one precision, cells with their intervals, the
legend, and the Markdown, LaTeX, HTML, CSV and console forms of a `leaderboard.Board`. The
printed tables of `bench run` and `bench compare` (benchmark/tables.py) format their numbers here
too."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from benchmark.leaderboard import GAIN, Board

# Decimals per metric: percentages to a tenth, MRR and losses to a thousandth.
DIGITS = {"mrr": 3, "final_loss": 3}


def digits_of(metric: str, override: int | None = None) -> int:
    return override if override is not None else DIGITS.get(metric.removesuffix(GAIN), 1)


def cell_text(mean: float, low: float, high: float, digits: int = 1, signed: bool = False) -> str:
    """'82.0 [77.0, 87.0]': the mean and its 95% interval (the mean alone when there is none);
    signed ('+1.5 [-1.3, +4.3]') for a difference."""
    if math.isnan(mean):
        return ""
    sign = "+" if signed else ""
    if math.isnan(low) or math.isnan(high):
        return f"{mean:{sign}.{digits}f}"
    return f"{mean:{sign}.{digits}f} [{low:{sign}.{digits}f}, {high:{sign}.{digits}f}]"


def column_label(task: str, metric: str) -> str:
    return task if metric == task else f"{task} {metric}"


def _cells(b: Board, digits: int | None) -> tuple[list[str], list[str], list[list[str]], list[list[str]]]:
    """(row labels, column labels, texts, marks: 'best' / 'tied' / '') shared by every format."""
    bold, tied = b.bold(), b.tied()
    rows = [" / ".join(str(v) for v in (idx if isinstance(idx, tuple) else (idx,))) for idx in b.mean.index]
    columns = [column_label(task, metric) for task, metric in b.mean.columns]
    texts, marks = [], []
    for idx in b.mean.index:
        texts.append(
            [
                cell_text(
                    b.mean.at[idx, c], b.low.at[idx, c], b.high.at[idx, c], digits_of(c[1], digits), c[1].endswith(GAIN)
                )
                for c in b.mean.columns
            ]
        )
        marks.append(
            ["best" if idx in bold.get(c, ()) else "tied" if idx in tied.get(c, ()) else "" for c in b.mean.columns]
        )
    return rows, columns, texts, marks


LEGEND = (
    "Cells: mean [95% CI] over the seeds of a cell (Student-t), or over the val examples (bootstrap) for "
    "one seed. Bold: best, and distinguishable from the runner-up (paired bootstrap over shared seeds and "
    "val examples, 95%). ≈: not distinguishable from the column's best. A 'gain' column: the task's result "
    "minus the same task on the random-init encoder of the same seeds (the control), paired over seeds and "
    "val examples; pretraining made a difference where its interval excludes 0."
)


def legend(b: Board) -> str:
    """LEGEND, plus what any split column means."""
    if not b.split:
        return LEGEND
    return (
        f"{LEGEND} {', '.join(b.split)}: evaluated on different evaluation sets (val examples, labels or "
        "settings), so each set has a column of its own, tagged in brackets; numbers in different columns "
        "are not comparable and are never ranked or paired together."
    )


def row_header(b: Board) -> str:
    return " / ".join(b.mean.index.names)


def _marked(text: str, mark: str, bold: str) -> str:
    return bold.format(text) if mark == "best" and text else f"{text} ≈" if mark == "tied" and text else text


def to_markdown(b: Board, digits: int | None = None) -> str:
    rows, columns, texts, marks = _cells(b, digits)
    lines = ["| " + " | ".join([row_header(b), *columns, "seeds"]) + " |", "|" + "---|" * (len(columns) + 2)]
    for idx, label, row, mark in zip(b.mean.index, rows, texts, marks):
        shown = [_marked(t, m, "**{}**") for t, m in zip(row, mark)]
        lines.append("| " + " | ".join([label, *shown, seeds_text(b, idx)]) + " |")
    return "\n".join(lines) + "\n\n" + legend(b) + "\n"


def seeds_text(b: Board, idx) -> str:
    """The number of seeds behind the row's cells ('3', or '1-3' when cells differ)."""
    counts = sorted({int(v) for v in b.n.loc[idx].dropna()})
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


def _latex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#")):
        text = text.replace(a, b)
    return text


def to_latex(b: Board, digits: int | None = None) -> str:
    rows, columns, texts, marks = _cells(b, digits)
    lines = [
        r"\begin{tabular}{l" + "c" * len(columns) + "}",
        r"\toprule",
        " & ".join(_latex_escape(c) for c in [row_header(b), *columns]) + r" \\",
        r"\midrule",
    ]
    for label, row, mark in zip(rows, texts, marks):
        shown = [_marked(t, m, r"\textbf{{{}}}").replace("≈", r"$\approx$") for t, m in zip(row, mark)]
        lines.append(" & ".join([_latex_escape(label), *shown]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


HTML_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
caption { caption-side: bottom; text-align: left; padding-top: 0.8em; color: #555; max-width: 60em; }
th, td { padding: 0.35em 0.8em; border-bottom: 1px solid #ddd; text-align: right; white-space: nowrap; }
th:first-child, thead th { text-align: left; }
thead th { border-bottom: 2px solid #444; }
td.best { font-weight: bold; background: #e8f5e9; }
td.tied { color: #555; }
"""


def to_html(b: Board, digits: int | None = None, title: str = "Leaderboard", figures: tuple = ()) -> str:
    """A complete page: the table, a caption saying what a cell is, n, and where it came from, then
    the figures (PNG files), embedded so that the page stands alone."""
    import base64
    from html import escape

    rows, columns, texts, marks = _cells(b, digits)
    head = "".join(f"<th>{escape(c)}</th>" for c in [row_header(b), *columns, "seeds"])
    body = []
    for idx, label, row, mark in zip(b.mean.index, rows, texts, marks):
        cells = "".join(f'<td class="{m}">{escape(_marked(t, m, "{}"))}</td>' for t, m in zip(row, mark))
        body.append(f"<tr><th>{escape(label)}</th>{cells}<td>{seeds_text(b, idx)}</td></tr>")
    provenance = f"Records from {', '.join(map(str, b.sources)) or 'the folders given'}"
    provenance += f"; harness commit {', '.join(b.commits)}." if b.commits else "."
    caption = f"{legend(b)} The seeds column gives n per cell. {provenance}"
    return (
        f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{escape(title)}</title>\n'
        f"<style>{HTML_STYLE}</style>\n</head>\n<body>\n<h1>{escape(title)}</h1>\n<table>\n"
        f"<caption>{escape(caption)}</caption>\n<thead><tr>{head}</tr></thead>\n<tbody>\n"
        + "\n".join(body)
        + "\n</tbody>\n</table>\n"
        + "".join(
            f'<figure><img alt="{escape(Path(f).stem)}" src="data:image/png;base64,'
            f'{base64.b64encode(Path(f).read_bytes()).decode()}"><figcaption>{escape(Path(f).name)}</figcaption></figure>\n'
            for f in figures
        )
        + "</body>\n</html>\n"
    )


def to_csv(b: Board) -> str:
    """Numbers, not text: mean, std and n per column."""
    parts = {"mean": b.mean, "std": b.std, "n": b.n, "ci_low": b.low, "ci_high": b.high}
    wide = pd.concat(parts, axis=1)
    wide.columns = [f"{task}/{metric}/{stat}" for stat, task, metric in wide.columns]
    return wide.sort_index(axis=1).to_csv()


def to_rich(b: Board, title: str, digits: int | None = None):
    from rich.markup import escape
    from rich.table import Table

    rows, columns, texts, marks = _cells(b, digits)
    table = Table(title=title)
    table.add_column(row_header(b))
    for c in columns:  # escaped: a column's [evaluation set] tag is not markup
        table.add_column(escape(c), justify="right")
    for label, row, mark in zip(rows, texts, marks):
        table.add_row(escape(label), *[_marked(escape(t), m, "[bold green]{}[/]") for t, m in zip(row, mark)])
    return table


def write_tables(
    b: Board, out_dir: Path, digits: int | None = None, title: str = "Leaderboard", figures: tuple = ()
) -> list[Path]:
    """leaderboard.{md,tex,html,csv} in out_dir; the HTML page embeds `figures`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix, text in (
        ("md", to_markdown(b, digits)),
        ("tex", to_latex(b, digits)),
        ("html", to_html(b, digits, title, figures)),
        ("csv", to_csv(b)),
    ):
        path = out_dir / f"leaderboard.{suffix}"
        path.write_text(text)
        written.append(path)
    return written
