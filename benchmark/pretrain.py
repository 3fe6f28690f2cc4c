"""The pretraining loop shared by every method.

Per iteration: learning rate (warmup + cosine) and weight decay (cosine) set from the step, the
method's own per-step settings (`before_step`), forward + loss under optional bf16 autocast,
backward, the method's gradient preparation (clipping), AdamW, then the method's post-step
update (EMA). Checkpoints are written atomically every
`checkpoint_every` steps, at the end, and at the step boundary right after a preemption or
timeout signal (benchmark/core/interrupt.py), and hold everything needed to continue exactly:
weights (EMA included), optimiser, step, RNG states, the losses a resumed run reports and the
resolved config. Schedules are pure functions of the step, so the step is their whole state.

A periodic checkpoint due after step k is written once the loss of step k + 1 has been seen to
be finite (with the RNG state from before that step), so a run that diverges keeps a
checkpoint whose weights still train; a non-finite loss, or a non-finite weight when a
checkpoint is due, stops the run with DivergenceError.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmark.core import checkpoint as ckpt
from benchmark.core import distributed, interrupt
from benchmark.core.data import UNREADABLE_LOG, DataSource
from benchmark.core.errors import DataError, DivergenceError
from benchmark.core.faults import fault_point
from benchmark.core.layers import to_device, use_attention
from benchmark.core.loading import stop_workers, train_loader
from benchmark.core.progress import progress_bar
from benchmark.core.schedules import cosine, warmup_cosine
from benchmark.core.seeding import rng_state, set_rng_state
from benchmark.step import forward_loss, make_optimizer, step_function, update
from methods.base import Method

LAST = "last.pt"


@dataclass
class Schedule:
    total_steps: int
    warmup_steps: int
    steps_per_epoch: int

    @classmethod
    def of(cls, cfg, dataset_size: int) -> Schedule:
        per_epoch = dataset_size // cfg.batch_size
        if per_epoch == 0:
            raise DataError(
                f"pretrain.batch_size={cfg.batch_size} is larger than the training set ({dataset_size} images)"
            )
        # ipe_scale stretches the schedules past the trained epochs, as the official I-JEPA does.
        total = int(round(cfg.epochs * per_epoch * cfg.ipe_scale))
        return cls(max(1, total), int(round(cfg.warmup_epochs * per_epoch)), per_epoch)


def set_hyperparameters(opt: torch.optim.Optimizer, cfg, schedule: Schedule, step: int) -> tuple[float, float]:
    """lr and weight decay of (0-based) step `step`, read at step + cfg.schedule_offset."""
    at = step + cfg.schedule_offset
    lr = warmup_cosine(
        at,
        schedule.total_steps,
        schedule.warmup_steps,
        cfg.start_lr,
        cfg.lr,
        cfg.final_lr,
        # A schedule written before the setting existed warms up as I-JEPA and MAE do.
        bool(cfg.get("warmup_reaches_peak", False)),
    )
    wd = cosine(at, schedule.total_steps, cfg.weight_decay, cfg.final_weight_decay)
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        if group.get("apply_wd", True):
            group["weight_decay"] = wd
    return lr, wd


def pretrain(
    method: Method,
    source: DataSource,
    cfg,
    seed: int,
    device: torch.device,
    checkpoint_dir: Path,
    config: dict,
    workers: int = 0,
    show_progress: bool = True,
    max_steps: int | None = None,
) -> dict:
    """Train `method` on the train split of `source`; resumes from checkpoint_dir/last.pt if present.

    max_steps stops early (after writing a checkpoint) without changing the schedules; it exists
    so that an interrupted run can be reproduced exactly. In a data-parallel world (several
    processes, benchmark/core/distributed.py) every rank calls this; only rank 0 writes files.
    """
    world = distributed.current()  # plan_run has checked that the batch splits over its ranks
    dataset = source.split("train")
    if world.is_main:
        dataset.log_skipped(checkpoint_dir.parent / UNREADABLE_LOG)
    schedule = Schedule.of(cfg, len(dataset))
    steps_to_run = int(cfg.epochs * schedule.steps_per_epoch)
    method.to(device)
    opt = make_optimizer(method, cfg)
    step = 0
    # The first loss and the last epoch's losses, so that a resumed run reports what an
    # uninterrupted one would.
    first_loss: float | None = None
    losses: list[float] = []
    if world.is_main:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
    last = checkpoint_dir / LAST
    log_path = checkpoint_dir.parent / "train_log.jsonl"
    if last.exists():
        state = ckpt.load(last)
        saved = state.get("method", {}).get("method") if isinstance(state.get("method"), dict) else None
        if saved != method.name:
            raise ckpt.foreign_run(last, saved, method.name)
        ckpt.load_weights(method, state["method"]["weights"], f"checkpoint {last}")
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        set_rng_state(state["rng"])
        first_loss, losses = state.get("first_loss"), list(state.get("recent_losses", []))
    if world.is_main:  # a run killed before its first checkpoint restarts at 0: its lines go too
        truncate_log(log_path, step)
    saved_step = step if last.exists() else None

    def save(at_step: int, rng: dict) -> None:
        nonlocal saved_step
        bad = next(
            (name for name, t in method.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()),
            None,
        )
        if bad is not None:
            raise DivergenceError(f"weight {bad} is not finite after step {at_step}; {_last_good(last, saved_step)}")
        saved_step = at_step
        if not world.is_main:
            return
        ckpt.save(
            last,
            {
                "method": method.checkpoint_state(),
                "optimizer": opt.state_dict(),
                "step": at_step,
                "total_steps": schedule.total_steps,
                "rng": rng,
                "first_loss": first_loss,
                "recent_losses": losses[-schedule.steps_per_epoch :],
                "config": config,
            },
        )

    step_fn = step_function(method, bool(cfg.compile), device)
    restore_attention = use_attention(method, cfg.attention, device, bool(cfg.bf16))
    method.train()
    started, start_step = time.perf_counter(), step
    stop_at = steps_to_run if max_steps is None else min(steps_to_run, max_steps)
    log_to = log_path if world.is_main else os.devnull
    with (
        progress_bar("pretrain", stop_at, step, enabled=show_progress and world.is_main) as bar,
        open(log_to, "a") as log,
        interrupt.served_by_loop(),
    ):
        while step < stop_at:
            epoch, batch_in_epoch = divmod(step, schedule.steps_per_epoch)
            loader = train_loader(
                dataset,
                method.train_transform(),
                method.collate,
                cfg.batch_size,
                seed,
                epoch,
                start=batch_in_epoch,
                workers=workers,
                pin_memory=device.type == "cuda",
                rank=world.rank,
                world_size=world.size,
            )
            try:
                for batch in loader:
                    rng = rng_state()
                    lr, wd = set_hyperparameters(opt, cfg, schedule, step)
                    method.before_step(step, schedule.steps_per_epoch)
                    loss = forward_loss(step_fn, to_device(batch, device), device, bool(cfg.bf16))
                    # The mean over ranks: what is logged, and non-finite on every rank if on one.
                    mean_loss = distributed.mean(loss)
                    if not torch.isfinite(mean_loss):
                        raise DivergenceError(
                            f"pretraining loss is {mean_loss.item()} at step {step}; {_last_good(last, saved_step)}"
                        )
                    if cfg.checkpoint_every and step > start_step and step % cfg.checkpoint_every == 0:
                        save(step, rng)
                    update(method, opt, loss, cfg.clip_grad, step / schedule.total_steps)
                    step += 1
                    losses.append(mean_loss.item())
                    if first_loss is None:
                        first_loss = losses[-1]
                    bar.advance(loss=losses[-1])
                    if step % cfg.log_every == 0 or step == stop_at:
                        log.write(
                            json.dumps({"step": step, "epoch": epoch, "loss": losses[-1], "lr": lr, "weight_decay": wd})
                            + "\n"
                        )
                        log.flush()
                    fault_point(f"step:{step}")
                    asked = agreed_request(interrupt.take())
                    if asked:  # a preemption does not wait for the next loss
                        save(step, rng_state())
                    if asked == interrupt.STOP:
                        raise interrupt.Interrupted(step, last)
                    if step >= stop_at:
                        break
            except BaseException:  # a stop or a failure: workers mid-batch are not waited for
                stop_workers(loader)
                raise
    restore_attention()  # evaluation runs with the kernels a loaded checkpoint would get
    distributed.check_in_sync(method)
    save(step, rng_state())
    elapsed = time.perf_counter() - started
    trained = step - start_step
    tail = losses[-max(1, schedule.steps_per_epoch) :]
    return {
        "steps": step,
        "total_steps": schedule.total_steps,
        "epochs": cfg.epochs,
        "final_loss": sum(tail) / len(tail) if tail else None,
        "first_loss": first_loss,
        "train_seconds": elapsed,
        "images_per_second": trained * cfg.batch_size / elapsed if trained else None,
        "unreadable_skipped": count_logged(checkpoint_dir.parent / UNREADABLE_LOG),
        "checkpoint": str(last),
    }


_REQUESTS = (None, interrupt.CHECKPOINT, interrupt.STOP)  # in increasing urgency


def agreed_request(asked: str | None) -> str | None:
    """The most urgent request over all ranks, so every rank saves or stops at the same step."""
    return _REQUESTS[distributed.any_rank(_REQUESTS.index(asked))]


def _last_good(last: Path, saved_step: int | None) -> str:
    return f"last good checkpoint: {last} (step {saved_step})" if saved_step is not None else "no checkpoint written"


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines past `step` (and a line torn by a crash): the resumed run writes them again."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry["step"] <= step:
            kept.append(line + "\n")
    data = "".join(kept).encode()
    ckpt.atomic_write(path, lambda f: f.write(data))


def count_logged(path: Path) -> int:
    """Distinct files in a skip log (a file may fail once per epoch and per worker)."""
    return len(set(path.read_text().splitlines())) if path.exists() else 0
