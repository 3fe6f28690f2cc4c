"""One run: checks, then pretraining (or a checkpoint), then each task, each ending in a record.

`plan_run` does every check that can fail on the user's input (names, data folders, checkpoint,
architecture) and writes nothing; `execute` does the compute. The CLI maps errors raised by
`plan_run` to exit code 2.
"""
from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from benchmark import checkpoint as ckpt
from benchmark.config import ConfigError
from benchmark.data import DataError, DataSource, resolve_data
from benchmark.pretrain import LAST, pretrain
from benchmark.progress import console
from benchmark.records import make_record, now, write_record
from methods import METHODS, build_method, method_from_state
from methods.base import Method
from tasks import TASKS, TaskContext, build_task

# Settings that may differ when a run is resumed: they do not change its results.
RESUMABLE_DIFFERENCES = {"resume", "progress", "workers", "device", "run_dir"}
ARCHITECTURE_KEYS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")


@dataclass
class Plan:
    cfg: DictConfig
    config: dict
    run_dir: Path
    device: torch.device
    method: Method
    checkpoint_path: Path | None
    task_names: list[str]


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


def _check_resume(run_dir: Path, config: dict) -> None:
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError(f"resume=true but {run_dir} holds no config.yaml: not a run folder")
    saved = _flatten(OmegaConf.to_container(OmegaConf.load(saved_path)))
    current = _flatten(config)
    differ = sorted(k for k in set(saved) | set(current)
                    if k.split(".")[0] not in RESUMABLE_DIFFERENCES and saved.get(k) != current.get(k))
    if differ:
        raise ConfigError(f"resume=true but the config differs from the one {run_dir} was started with: "
                          f"{', '.join(differ[:5])}")


def _load_checkpoint_method(cfg: DictConfig, path: Path) -> Method:
    state = ckpt.load(path)
    method_state = state.get("method") if isinstance(state, dict) else None
    if not isinstance(method_state, dict) or "weights" not in method_state:
        raise ckpt.CheckpointError(f"{path} is not a checkpoint written by bench run (no 'method' entry)")
    if method_state["method"] != cfg.method.name:
        raise ckpt.CheckpointError(f"{path} holds method {method_state['method']!r} but method={cfg.method.name}")
    differ = [f"{k}={method_state['model_cfg'].get(k)} (config {cfg.model.get(k)})" for k in ARCHITECTURE_KEYS
              if method_state["model_cfg"].get(k) != cfg.model.get(k)]
    if method_state["image_size"] != cfg.data.image_size:
        differ.append(f"image_size={method_state['image_size']} (config data.image_size={cfg.data.image_size})")
    if differ:
        raise ckpt.CheckpointError(f"{path} does not match model={cfg.choices.model}: {', '.join(differ)}")
    return method_from_state(method_state)


def plan_run(cfg: DictConfig) -> Plan:
    """Everything that can be checked before compute; raises ConfigError/DataError/CheckpointError."""
    if cfg.method.name not in METHODS:
        raise ConfigError(f"unknown method {cfg.method.name!r} (known: {', '.join(sorted(METHODS))})")
    for name in cfg.tasks:
        if name not in TASKS:
            raise ConfigError(f"unknown task {name!r} (known: {', '.join(sorted(TASKS))}, all)")
    resolve_data(cfg.data, cfg.cache_dir, generate=False)
    device = pick_device(cfg.device)
    config = OmegaConf.to_container(cfg, resolve=True)
    checkpoint_path = Path(cfg.checkpoint).expanduser().absolute() if cfg.checkpoint else None
    torch.manual_seed(cfg.seed)
    try:
        if checkpoint_path is not None:
            method = _load_checkpoint_method(cfg, checkpoint_path)
        else:
            method = build_method(cfg.method.name, config["model"], config["method"], cfg.data.image_size)
    except (ValueError, KeyError) as exc:
        if isinstance(exc, (ckpt.CheckpointError, DataError)):
            raise
        raise ConfigError(f"cannot build method {cfg.method.name}: {exc}") from None
    tasks = [name for name in cfg.tasks if build_task(name, cfg.tasks[name]).applies_to(method)]
    if checkpoint_path is None and cfg.checkpoint_key == "target_encoder" and method.target_encoder is None:
        raise ConfigError(f"method {cfg.method.name} has no target encoder: use checkpoint_key=encoder")

    # Absolute, so records still point at their files when read from elsewhere.
    run_dir = (Path(cfg.run_dir).expanduser() if cfg.run_dir else default_run_dir(cfg)).absolute()
    if run_dir.exists():
        if not cfg.resume:
            raise ConfigError(f"run folder already exists: {run_dir} (resume=true continues it)")
        _check_resume(run_dir, config)
    elif cfg.resume and cfg.run_dir:
        raise ConfigError(f"resume=true but the run folder does not exist: {run_dir}")
    return Plan(cfg, config, run_dir, device, method, checkpoint_path, tasks)


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
    OmegaConf.save(OmegaConf.create(plan.config), plan.run_dir / "config.yaml")


def execute(plan: Plan) -> list[dict]:
    """Run the plan; returns the records written (a failed step writes a failed record, then raises)."""
    cfg = plan.cfg
    _create_run_dir(plan)
    source: DataSource = resolve_data(cfg.data, cfg.cache_dir)
    records = []

    def record(task: str, metrics: dict, started: str, seconds: float, status: str = "ok",
               error: str | None = None) -> dict:
        ckpt_path = plan.checkpoint_path or plan.run_dir / "checkpoints" / LAST
        rec = make_record(run_id=plan.run_dir.name, run_dir=plan.run_dir, task=task, config=plan.config,
                          metrics=metrics, status=status, started=started, wall_seconds=seconds,
                          checkpoint_path=str(ckpt_path), checkpoint_key=cfg.checkpoint_key,
                          device=str(plan.device), error=error)
        write_record(plan.run_dir, rec)
        records.append(rec)
        return rec

    def guarded(task: str, fn):
        started, t0 = now(), time.perf_counter()
        try:
            metrics = fn()
        except Exception as exc:
            record(task, {}, started, time.perf_counter() - t0, status="failed", error=f"{type(exc).__name__}: {exc}")
            raise
        return record(task, metrics, started, time.perf_counter() - t0)

    if plan.checkpoint_path is None:
        console.print(f"[bold]pretraining[/] {cfg.choices.method} on {cfg.data.name} -> {plan.run_dir}", soft_wrap=True)
        guarded("pretrain", lambda: pretrain(plan.method, source, cfg.pretrain, cfg.seed, plan.device,
                                             plan.run_dir / "checkpoints", plan.config, cfg.workers, cfg.progress))
    plan.method.to(plan.device).eval()
    ctx = TaskContext(source=source, device=plan.device, encoder_key=cfg.checkpoint_key, seed=cfg.seed,
                      run_dir=plan.run_dir, workers=cfg.workers, show_progress=cfg.progress,
                      token_cache_bytes=int(cfg.token_cache_gb * 2**30))
    for name in plan.task_names:
        console.print(f"[bold]task[/] {name}")
        task = build_task(name, cfg.tasks[name])
        guarded(name, lambda: task.run(plan.method, ctx))
    return records
