"""One run: checks, then pretraining (or a checkpoint), then each task, each ending in a record.

`plan_run` does every check that can fail on the user's input (names, data folders, checkpoint,
architecture) and writes nothing. It builds no model: the method it checks against is built on
the meta device and a checkpoint is read memory-mapped, so planning costs neither the weights'
memory nor their initialisation. `execute` builds or loads the method for real and does the
compute. The CLI maps errors raised by
`plan_run` to exit code 2.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from rich.markup import escape

from benchmark.config import RESUMABLE, is_task_set
from benchmark.core import checkpoint as ckpt
from benchmark.core import distributed
from benchmark.core.data import DataSource, resolve_data
from benchmark.core.errors import ConfigError, DataError, one_line
from benchmark.core.layers import use_attention
from benchmark.core.progress import console
from benchmark.core.seeding import derive_seed, seeded
from benchmark.core.stats import bootstrap_ci
from benchmark.core.threads import use_threads
from benchmark.planning import building, checkpoint_bytes, is_planned, load_checkpoint_method, planned_method
from benchmark.pretrain import LAST, pretrain
from benchmark.records import (
    PRETRAINED,
    RANDOM_INIT,
    make_record,
    non_finite_metrics,
    now,
    step_name,
    write_evidence,
    write_record,
)
from methods import METHODS, build_method
from methods.base import Method
from tasks import TASKS, TaskContext, build_task
from tasks.base import Task
from tasks.core import GLOBAL_RNG_SEED

# Settings that may differ when a run is resumed: they do not change its results.


@dataclass
class Plan:
    cfg: DictConfig
    config: dict
    run_dir: Path
    source: DataSource
    device: torch.device
    # On the meta device while planned (shapes and capabilities, no weights); execute replaces it
    # by the real one (`materialize`).
    method: Method
    checkpoint_path: Path | None
    # The encoder tasks evaluate: checkpoint_key, or the method's default when it is null.
    encoder_key: str
    task_names: list[str]
    # Tasks of a task set (task=all) that do not apply to the method -> why.
    skipped: dict[str, str]
    # resume=true on a run whose every step already has an ok record: nothing to do.
    finished: bool = False
    # Run every task a second time on the random-init encoder of the same seed (the control).
    control: bool = False


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is available")
    return torch.device(name)


def default_run_dir(cfg: DictConfig) -> Path:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    c = cfg.choices
    return Path(cfg.results_dir) / f"{c.method}-{c.model}-{cfg.data.name}-seed{cfg.seed}-{stamp}"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def resolve_control(cfg: DictConfig) -> bool:
    """`control`: true, false, or auto (on for task=all on the built-in data)."""
    value = cfg.get("control", "auto")
    if value == "auto":
        return cfg.choices.task == "all" and cfg.data.kind == "builtin"
    if isinstance(value, bool):
        return value
    raise ConfigError(f"control must be true, false or auto, got {value!r}")


def control_method(plan: Plan) -> Method:
    """The random-init control: the method as built from the run's seed before any pretraining
    (the same weights pretraining started from), in eval mode on the run's device."""
    config = plan.config
    with seeded(plan.cfg.seed):
        method = build_method(config["method"]["name"], config["model"], config["method"], config["data"]["image_size"])
    return method.to(plan.device).eval()


def _check_resume(run_dir: Path, config: dict) -> None:
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError(f"resume=true but {run_dir} holds no config.yaml: not a run folder")
    saved = _flatten(OmegaConf.to_container(OmegaConf.load(saved_path)))
    current = _flatten(config)
    differ = sorted(
        k for k in set(saved) | set(current) if k.split(".")[0] not in RESUMABLE and saved.get(k) != current.get(k)
    )
    if differ:
        raise ConfigError(
            f"resume=true but the config differs from the one {run_dir} was started with: {', '.join(differ[:5])}"
        )
    last = run_dir / "checkpoints" / LAST
    writer = ckpt.written_by(last) if last.is_file() else config["method"]["name"]
    if writer != config["method"]["name"]:  # a checkpoint copied in from another run
        raise ckpt.foreign_run(last, writer, config["method"]["name"])


def plan_run(cfg: DictConfig, verify_checkpoint: bool = True, allow_empty: bool = False) -> Plan:
    """Everything that can be checked before compute; raises ConfigError/DataError/CheckpointError.

    A checkpoint is loaded and checked to its last byte here (`verify_checkpoint`), so a corrupt
    file is refused before anything is written, and the run uses what was loaded. A plan made
    only to submit the run elsewhere (a sweep, a SLURM launcher) reads the file's names and shapes
    memory-mapped instead: the job plans again, verifying, where it runs. `allow_empty`: a plan
    made only to ask which tasks apply (a sweep cell) may have nothing to run.
    """
    if cfg.method.name not in METHODS:
        raise ConfigError(f"unknown method {cfg.method.name!r} (known: {', '.join(sorted(METHODS))})")
    for name in cfg.tasks:
        if name not in TASKS:
            raise ConfigError(f"unknown task {name!r} (known: {', '.join(sorted(TASKS))}, all)")
    source = resolve_data(cfg.data, cfg.cache_dir, generate=False)
    if cfg.data.kind == "folder":  # header scan: an unreadable image fails here, not mid-run
        for split in ("train", "val"):
            source.split(split)
    if not cfg.checkpoint and cfg.pretrain.epochs > 0:
        train_size = cfg.data.num_train if cfg.data.kind == "builtin" else len(source.split("train"))
        if cfg.pretrain.batch_size > train_size:
            raise ConfigError(
                f"pretrain.batch_size={cfg.pretrain.batch_size} is larger than the training set ({train_size} images)"
            )
        ranks = distributed.planned_size()
        if cfg.pretrain.batch_size % ranks:
            raise ConfigError(
                f"pretrain.batch_size={cfg.pretrain.batch_size} does not split over {ranks} "
                f"processes (it is the global batch)"
            )
    device = pick_device(cfg.device)
    config = OmegaConf.to_container(cfg, resolve=True)
    control = resolve_control(cfg)
    config["control"] = control  # recorded as resolved, like checkpoint_key
    checkpoint_path = Path(cfg.checkpoint).expanduser().absolute() if cfg.checkpoint else None
    if checkpoint_path is not None and verify_checkpoint:
        with building(cfg):
            method = load_checkpoint_method(cfg, checkpoint_path)
    else:
        method = planned_method(cfg, config, checkpoint_path)
    tasks, skipped = [], {}
    if cfg.data.kind == "builtin":
        sizes = {"train": cfg.data.num_train, "val": cfg.data.num_val}
    else:
        sizes = {split: len(source.split(split)) for split in ("train", "val")}
    named = not is_task_set(cfg.choices.task)
    for name in cfg.tasks:
        try:
            task = build_task(name, OmegaConf.to_container(cfg.tasks[name], resolve=True))
        except (ValueError, KeyError) as exc:
            raise ConfigError(str(exc) if isinstance(exc, ConfigError) else f"tasks.{name}: {exc}") from None
        verdict = task.applies_to(method)
        if not verdict:
            if named:
                raise ConfigError(f"task {name} does not apply: {verdict.reason}")
            skipped[name] = verdict.reason
            continue
        try:
            task.check(method)
            task.check_data(source, sizes)
        except DataError:
            raise
        except ValueError as exc:
            raise ConfigError(str(exc) if isinstance(exc, ConfigError) else f"tasks.{name}: {exc}") from None
        tasks.append(name)
    if not tasks and not allow_empty and not (cfg.pretrain.epochs > 0 and not cfg.checkpoint):
        raise ConfigError(
            "nothing to run: no task applies and there is no pretraining "
            f"(task={cfg.choices.task}, checkpoint={cfg.checkpoint}, pretrain.epochs={cfg.pretrain.epochs})"
        )
    encoder_key = cfg.checkpoint_key or method.default_encoder_key
    if encoder_key == "target_encoder" and not method.capabilities.target_encoder:
        raise ConfigError(f"method {cfg.method.name} has no target encoder: use checkpoint_key=encoder")
    # The key actually used goes into the saved config and every record, never a bare null.
    config["checkpoint_key"] = encoder_key

    # Absolute, so records still point at their files when read from elsewhere.
    run_dir = (Path(cfg.run_dir).expanduser() if cfg.run_dir else default_run_dir(cfg)).absolute()
    if run_dir.exists():
        if not cfg.resume:
            raise ConfigError(f"run folder already exists: {run_dir} (resume=true continues it)")
        if not run_dir.is_dir():
            raise ConfigError(f"run folder {run_dir} is a file, not a folder")
        _check_resume(run_dir, config)
    elif cfg.resume and cfg.run_dir:
        raise ConfigError(f"resume=true but the run folder does not exist: {run_dir}")
    ckpt.check_writable_folder(run_dir, "run folder")
    if cfg.data.kind == "builtin" and not source.root.exists():  # generated at the start of the run
        ckpt.check_writable_folder(source.root, "data cache (cache_dir, or $BENCH_CACHE)")
    steps = (["pretrain"] if checkpoint_path is None and cfg.pretrain.epochs > 0 else []) + tasks
    if steps[:1] == ["pretrain"]:  # a full disk fails here, not at the first checkpoint
        ckpt.check_room(run_dir, checkpoint_bytes(method), "run folder")
    steps += [step_name(task, RANDOM_INIT) for task in tasks] if control else []
    finished = cfg.resume and run_dir.exists() and all(_ok_record(run_dir, step) for step in steps)
    return Plan(
        cfg, config, run_dir, source, device, method, checkpoint_path, encoder_key, tasks, skipped, finished, control
    )


def materialize(plan: Plan) -> Method:
    """The plan's method for real: built from the run's seed (the weights pretraining starts from
    and the random-init control rebuilds), or loaded from its checkpoint, every value checked;
    a checkpoint that planning loaded already is used as it is."""
    cfg = plan.cfg
    torch.manual_seed(cfg.seed)
    if not is_planned(plan.method):
        return plan.method
    if plan.checkpoint_path is not None:
        return load_checkpoint_method(cfg, plan.checkpoint_path)
    return build_method(cfg.method.name, plan.config["model"], plan.config["method"], cfg.data.image_size)


def _ok_record(run_dir: Path, step: str) -> bool:
    try:
        return json.loads((run_dir / "records" / f"{step}.json").read_text()).get("status") == "ok"
    except (OSError, ValueError):
        return False


def _create_run_dir(plan: Plan) -> None:
    if plan.run_dir.exists():
        return
    plan.run_dir.parent.mkdir(parents=True, exist_ok=True)
    base, n = plan.run_dir, 1
    while True:
        try:
            plan.run_dir.mkdir()
            break
        except FileExistsError:  # two runs started in the same second
            n += 1
            plan.run_dir = base.with_name(f"{base.name}-{n}")
    text = OmegaConf.to_yaml(OmegaConf.create(plan.config)).encode()
    ckpt.atomic_write(plan.run_dir / "config.yaml", lambda f: f.write(text))


LOCK_FILE = ".lock"


@contextmanager
def run_lock(run_dir: Path):
    """Hold the run folder for this process: a second run or resume of it is refused (ConfigError).

    An advisory lock on <run_dir>/.lock, released by the kernel when the holder exits however it
    exits, so a lock left by a killed process never blocks a later resume.
    """
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise ConfigError(f"run folder {run_dir} is in use by another process (pid {holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def execute(plan: Plan) -> list[dict]:
    """Run the plan; returns the records written (a failed step writes a failed record, then raises).

    One rank of a data-parallel job (benchmark/core/distributed.py) pretrains with the others; rank 0
    alone creates the run folder, holds its lock, writes records and runs the evaluation tasks.
    """
    cfg = plan.cfg
    use_threads(cfg.threads)
    world, plan.device = distributed.setup(plan.device)
    plan.method = materialize(plan)
    if world.active:
        # Every rank has planned (and checked the folder) before rank 0 creates it; a default
        # folder name holds a timestamp, so rank 0's is the one.
        plan.run_dir = distributed.broadcast(plan.run_dir)
        if world.is_main:
            _create_run_dir(plan)
            if cfg.data.kind == "builtin":
                resolve_data(cfg.data, cfg.cache_dir)  # generated once, for all ranks (shared disk)
        distributed.barrier()
        if not world.is_main:
            return _follow(plan)
    _create_run_dir(plan)
    with run_lock(plan.run_dir):
        return _execute_main(plan)


def _execute_main(plan: Plan) -> list[dict]:
    cfg = plan.cfg
    if cfg.resume:  # leftovers of writes a crash interrupted; this run is the folder's only writer
        ckpt.remove_stale_temporaries(plan.run_dir)
    if cfg.data.kind == "builtin":
        resolve_data(cfg.data, cfg.cache_dir)  # generated on first use
    source = plan.source
    records = []

    def record(
        task: str,
        metrics: dict,
        started: str,
        seconds: float,
        status: str = "ok",
        error: str | None = None,
        examples: dict | None = None,
        init: str = PRETRAINED,
    ) -> dict:
        ckpt_path = plan.checkpoint_path or plan.run_dir / "checkpoints" / LAST
        rec = make_record(
            run_id=plan.run_dir.name,
            run_dir=plan.run_dir,
            task=task,
            config=plan.config,
            metrics=metrics,
            status=status,
            started=started,
            wall_seconds=seconds,
            checkpoint_path=str(ckpt_path),
            checkpoint_key=plan.encoder_key,
            device=str(plan.device),
            error=error,
            examples=examples,
            init=init,
        )
        write_record(plan.run_dir, rec)
        records.append(rec)
        return rec

    def guarded(task: str, fn, init: str = PRETRAINED):
        started, t0 = now(), time.perf_counter()
        examples = None
        try:
            metrics = fn()
            evidence = metrics.pop("evidence", None)
            bad = non_finite_metrics(metrics)
            if bad:  # a NaN accuracy or loss would rank silently on a leaderboard
                raise FloatingPointError(f"non-finite metrics: {', '.join(bad[:5])}")
            if evidence is not None:
                metrics["ci95"] = list(bootstrap_ci(evidence))
                examples = write_evidence(plan.run_dir, step_name(task, init), evidence)
        except Exception as exc:
            record(task, {}, started, time.perf_counter() - t0, status="failed", error=one_line(exc), init=init)
            raise
        return record(task, metrics, started, time.perf_counter() - t0, examples=examples, init=init)

    if plan.checkpoint_path is None:
        console.print(
            f"[bold]pretraining[/] {escape(f'{cfg.choices.method} on {cfg.data.name} -> {plan.run_dir}')}",
            soft_wrap=True,
        )
        guarded(
            "pretrain",
            lambda: pretrain(
                plan.method,
                source,
                cfg.pretrain,
                cfg.seed,
                plan.device,
                plan.run_dir / "checkpoints",
                plan.config,
                cfg.workers,
                cfg.progress,
            ),
        )
    plan.method.to(plan.device).eval()
    ctx = task_context(plan, cfg.progress)
    for task in task_order(plan):
        console.print(f"[bold]task[/] {task.name}")
        guarded(task.name, lambda task=task: run_task(task, plan.method, ctx, cfg.attention))
    if plan.control:
        # A context of its own: the control's frozen tokens are cached for its tasks, and the
        # pretrained encoder's are let go.
        control, ctx = control_method(plan), task_context(plan, cfg.progress)
        for task in task_order(plan):
            console.print(f"[bold]task[/] {task.name} [dim](random-init control)[/]")
            guarded(task.name, lambda task=task: run_task(task, control, ctx, cfg.attention), init=RANDOM_INIT)
    return records


def task_context(plan: Plan, show_progress: bool) -> TaskContext:
    cfg = plan.cfg
    return TaskContext(
        source=plan.source,
        device=plan.device,
        encoder_key=plan.encoder_key,
        seed=cfg.seed,
        run_dir=plan.run_dir,
        workers=cfg.workers,
        show_progress=show_progress,
        token_cache_bytes=int(cfg.token_cache_gb * 2**30),
        attention=cfg.attention,
    )


def task_order(plan: Plan) -> list[Task]:
    """The plan's tasks in the order they run. In a data-parallel job the data-parallel tasks come
    first, while every rank is there to run them; then rank 0 runs the others alone (a task's
    result does not depend on what ran before it: each runs under its own seeded RNG)."""
    tasks = [build_task(name, plan.config["tasks"][name]) for name in plan.task_names]
    if not distributed.current().active:
        return tasks
    return [t for t in tasks if t.data_parallel] + [t for t in tasks if not t.data_parallel]


def run_task(task: Task, method: Method, ctx: TaskContext, attention: str) -> dict:
    """One task with the attention kernel its precision calls for (`attention`, per task: the
    task's mixed precision decides `auto`); the method's own kernels are restored afterwards.

    The task runs under torch's global RNG seeded from the run's seed and the task's name (drop
    path and dropout draw from it), so its result does not depend on what ran before it in this
    process: pretraining, other tasks, or nothing (a run from a checkpoint)."""
    mixed = task.cfg.get("precision", "bf16" if task.cfg.get("bf16") else "fp32") != "fp32"
    restore = use_attention(method, attention, ctx.device, mixed)
    try:
        with seeded(derive_seed(ctx.seed, sum(map(ord, task.name)), GLOBAL_RNG_SEED)):
            return task.run(method, ctx)
    finally:
        restore()


def _follow(plan: Plan) -> list[dict]:
    """A non-zero rank's part of a run: pretraining (when there is any) and the data-parallel
    tasks, in step with rank 0; nothing written."""
    if plan.checkpoint_path is None:
        pretrain(
            plan.method,
            plan.source,
            plan.cfg.pretrain,
            plan.cfg.seed,
            plan.device,
            plan.run_dir / "checkpoints",
            plan.config,
            plan.cfg.workers,
            False,
        )
    plan.method.to(plan.device).eval()
    arms = [plan.method] + ([control_method(plan)] if plan.control else [])
    for method in arms:
        ctx = task_context(plan, show_progress=False)
        for task in task_order(plan):
            if task.data_parallel:
                run_task(task, method, ctx, plan.cfg.attention)
    return []
