"""`bench leaderboard`: tables (Markdown, LaTeX, HTML, CSV) and the MRR spectrum plot."""

from __future__ import annotations

from benchmark.cli.common import EXIT_OK, EXIT_USAGE, _fail, err, out
from benchmark.tables import print_wide


def cmd_leaderboard(args) -> int:
    from pathlib import Path

    from benchmark import formats, spectrum
    from benchmark import leaderboard as lb

    missing = [f for f in args.folders if not Path(f).is_dir()]
    if missing:
        return _fail(f"results folder not found: {missing[0]}", EXIT_USAGE)
    problems: list[str] = []
    try:
        frame = lb.load_frame(
            args.folders,
            methods=args.method,
            tasks=args.task,
            datasets=args.data,
            since=args.since,
            until=args.until,
            by=args.by,
            all_metrics=args.all_metrics,
            problems=problems,
        )
    except ValueError as exc:  # a malformed --since/--until date
        return _fail(f"bad date: {exc}", EXIT_USAGE)
    for line in problems:
        err.print(f"skipped {line}", highlight=False, markup=False, soft_wrap=True)
    if frame.empty:
        return _fail(f"no successful records match in {', '.join(args.folders)}", EXIT_USAGE)
    board = lb.board(frame, by=args.by)
    out_dir = Path(args.out) if args.out else Path(args.folders[0]) / "leaderboard"
    board.sources = [str(Path(f).resolve()) for f in args.folders]
    title = f"Leaderboard: {', '.join(Path(f).resolve().name for f in args.folders)}"
    runs = frame["run_dir"].nunique()
    print_wide(formats.to_rich(board, f"{runs} runs: mean [95% CI]; bold: best and distinguishable; ≈: not"))
    if board.split:
        out.print(
            formats.legend(board).removeprefix(formats.LEGEND).strip(), highlight=False, markup=False, soft_wrap=True
        )
    figures = []
    points = spectrum.spectrum_points(frame, by=args.by)
    if not points.empty and len(points.columns) > 1:
        figures.append(out_dir / "spectrum.png")
        references = spectrum.spectrum_references(frame, by=args.by)
        for what, r in spectrum.spectrum_plot(points, figures[-1], references).items():
            if r == r:  # defined: 3 or more runs with a spread
                out.print(
                    f"correlation of mrr with {what}: {r:+.2f} over {len(points)} runs", highlight=False, markup=False
                )
    written = formats.write_tables(board, out_dir, args.digits, title, tuple(figures)) + figures
    out.print(f"wrote {', '.join(str(p) for p in written)}", highlight=False, markup=False, soft_wrap=True)
    return EXIT_OK
