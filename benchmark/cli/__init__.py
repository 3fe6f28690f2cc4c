"""`bench`: the command line.

    bench run [overrides...]      pretrain (or load checkpoint=PATH), then run the selected tasks
    bench list                    registered methods, tasks, datasets and the other config groups
    bench config [overrides...]   print the resolved config without running anything
    bench perf [options] [overrides...]   time the training step of each method and the eval path
    bench export CKPT OUT         write a bench checkpoint in its method's official release layout
    bench sweep SWEEP [overrides] submit a grid of runs (launcher=slurm) or run it here (launcher=local)
    bench status SWEEP            every unit of a sweep: pending / running / done / failed
    bench leaderboard FOLDERS...  tables (Markdown, LaTeX, HTML, CSV) and the MRR spectrum plot
    bench compare A B             paired difference per task with a 95% CI: A better / B better / not
                                  distinguishable

Exit codes: 0 done, 1 a run failed while computing (its record says why), 2 bad input
(unknown name, bad override, missing data folder, unreadable or mismatched checkpoint),
reported in one line before any compute.
"""

from __future__ import annotations

import argparse

from benchmark.cli.common import EXIT_USAGE, _fail
from benchmark.cli.compare import cmd_compare
from benchmark.cli.export import cmd_export
from benchmark.cli.leaderboard import cmd_leaderboard
from benchmark.cli.listing import cmd_list
from benchmark.cli.perf_cmd import cmd_perf
from benchmark.cli.run import cmd_run
from benchmark.cli.show_config import cmd_config
from benchmark.cli.status import cmd_status
from benchmark.cli.sweep import cmd_sweep

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench", description="Pretrain and evaluate IWM, I-JEPA and MAE side by side."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="pretrain (or load checkpoint=PATH) and run tasks",
        description="Hydra overrides, e.g. method=ijepa task=all model=vit_small pretrain.epochs=2 seed=1",
    )
    run.add_argument("overrides", nargs="*")
    sub.add_parser("list", help="registered methods, tasks, datasets and config presets")
    config = sub.add_parser("config", help="print the resolved config for the given overrides")
    config.add_argument("overrides", nargs="*")
    perf = sub.add_parser(
        "perf",
        help="time the training step of each method, and the evaluation path",
        description="Config overrides (e.g. model=vit_small pretrain.batch_size=16) apply to "
        "every training-step case on top of the reference configuration.",
    )
    perf.add_argument("overrides", nargs="*")
    perf.add_argument(
        "--methods",
        default=None,
        help="comma-separated method presets of bench list (default: ijepa,iwm,mae; with --data-path also dino)",
    )
    perf.add_argument("--precision", default="fp32,bf16", help="fp32, bf16 or both (default)")
    perf.add_argument(
        "--variants", default="eager,fast", help="of eager, fast, compiled (fast compiled); default eager,fast"
    )
    perf.add_argument("--steps", type=int, default=10, help="timed steps per case")
    perf.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    perf.add_argument("--rounds", type=int, default=None, help="repeat all cases, interleaved (default 1; data path 3)")
    perf.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    perf.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    perf.add_argument("--gpu-cases", action="store_true", help="ViT-B/16 224 px cases instead of the CPU ones")
    perf.add_argument("--compile", action="store_true", help="torch.compile the step of the fast variant")
    perf.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for model FLOP utilisation")
    perf.add_argument("--rtol-fp32", type=float, default=1e-4, help="loss tolerance of fast vs eager, fp32")
    perf.add_argument("--rtol-bf16", type=float, default=2e-2, help="loss tolerance of fast vs eager, bf16")
    perf.add_argument(
        "--probe",
        nargs="*",
        default=[],
        metavar="OVERRIDE",
        help="config overrides of the linear-probe timing (default config)",
    )
    perf.add_argument("--no-probe", action="store_true", help="skip the linear-probe timing")
    perf.add_argument(
        "--official-ijepa",
        metavar="DIR",
        default=None,
        help="a checkout of facebookresearch/ijepa: time its I-JEPA step (data path: its pipeline) against ours",
    )
    perf.add_argument("--pairs", type=int, default=6, help="paired passes of ours and the official step")
    perf.add_argument(
        "--data-path",
        action="store_true",
        help="instead: images/s per core of each method's training input pipeline at 224 px (and the official ones)",
    )
    perf.add_argument("--data-images", type=int, default=256, help="data path: generated JPEGs timed per round")
    perf.add_argument("--data-workers", type=int, default=0, help="data path: also time ours with N loader workers")
    perf.add_argument("--mfu", type=float, default=0.4, help="data path: model FLOP utilisation to size cores for")
    for option, repo in (("--official-mae", "facebookresearch/mae"), ("--official-dino", "facebookresearch/dino")):
        perf.add_argument(option, metavar="DIR", help=f"data path: a checkout of {repo}")
    perf.add_argument("--out", default="perf.json", help="where the JSON goes")
    export = sub.add_parser(
        "export",
        help="write a bench checkpoint in the official I-JEPA or MAE layout",
        description="I-JEPA/IWM -> the I-JEPA .pth.tar layout; MAE -> {'model': ...} "
        "(encoder + decoder, or the encoder alone with --encoder-only)",
    )
    export.add_argument("checkpoint", help="a checkpoint written by bench run (checkpoints/last.pt)")
    export.add_argument("out", help="the file to write (never overwritten)")
    export.add_argument("--encoder-only", action="store_true", help="MAE: the encoder alone, as mae_pretrain_vit_*.pth")
    sweep = sub.add_parser(
        "sweep",
        help="submit a sweep (grid of runs x tasks) to SLURM, or run it here",
        description="SWEEP: a name in benchmark/conf/sweep or a YAML path; then launcher=slurm|local, "
        "launcher.* (partition, account, ...), grid.KEY=[...], tasks=[...], sweep_dir=PATH, "
        "and overrides for every run",
    )
    sweep.add_argument("sweep")
    sweep.add_argument("overrides", nargs="*")
    sweep.add_argument("--retry", action="store_true", help="resubmit units whose record says failed")
    status = sub.add_parser("status", help="state of every job of a sweep")
    status.add_argument("sweep", help="sweep folder, or sweep name under results/sweeps")
    comp = sub.add_parser(
        "compare",
        help="paired difference of two sides task by task, with a 95%% CI and a verdict",
        description="A and B: folders of records (run, sweep or results folders), one configuration per side; "
        "several folders per side with --a/--b.",
    )
    comp.add_argument("a", nargs="?", help="side A (a folder)")
    comp.add_argument("b", nargs="?", help="side B (a folder)")
    comp.add_argument("--a", dest="a_more", action="append", default=[], help="another folder of side A")
    comp.add_argument("--b", dest="b_more", action="append", default=[], help="another folder of side B")
    comp.add_argument(
        "--tasks",
        metavar="TASK_A:TASK_B",
        help="compare task TASK_A of side A with task TASK_B of side B (same val examples), e.g. "
        "predictor_ft:predictor_ft_random with the same folders on both sides",
    )
    board = sub.add_parser("leaderboard", help="tables and the MRR spectrum plot from result folders")
    board.add_argument("folders", nargs="+")
    board.add_argument("--method", action="append", help="method or preset (repeatable)")
    board.add_argument("--task", action="append", help="task (repeatable; 'pretrain' for pretraining loss)")
    board.add_argument("--data", action="append", help="dataset name (repeatable)")
    board.add_argument("--since", help="records finished at or after this ISO date/time")
    board.add_argument("--until", help="records finished at or before this ISO date/time")
    board.add_argument("--by", action="append", help="config key that splits rows, e.g. pretrain.epochs")
    board.add_argument("--all-metrics", action="store_true", help="every numeric metric, not only each task's headline")
    board.add_argument("--digits", type=int, default=None, help="decimals (default: 1 for %%, 3 for MRR and losses)")
    board.add_argument("--out", help="folder for the tables and plot (default: FIRST_FOLDER/leaderboard)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors already; keep its code
        return int(exc.code or 0)
    from benchmark.config import check_command_line

    try:
        check_command_line(getattr(args, "overrides", None) or [])
    except ValueError as exc:  # ConfigError
        return _fail(str(exc), EXIT_USAGE)
    if args.command == "run":
        return cmd_run(args.overrides)
    if args.command == "perf":
        return cmd_perf(args)
    if args.command == "config":
        return cmd_config(args.overrides)
    if args.command == "export":
        return cmd_export(args.checkpoint, args.out, args.encoder_only)
    if args.command == "sweep":
        return cmd_sweep(args.sweep, args.overrides, args.retry)
    if args.command == "status":
        return cmd_status(args.sweep)
    if args.command == "compare":
        a, b = [args.a] if args.a else [], [args.b] if args.b else []
        if not (a + args.a_more) or not (b + args.b_more):
            return _fail("bench compare needs two sides: bench compare A B", EXIT_USAGE)
        return cmd_compare(a + args.a_more, b + args.b_more, args.tasks)
    if args.command == "leaderboard":
        return cmd_leaderboard(args)
    return cmd_list()
