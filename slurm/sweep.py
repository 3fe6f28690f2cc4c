"""Sweeps: a grid of runs expanded into cells, submitted as dependent SLURM jobs, tracked on disk.

A sweep config (benchmark/conf/sweep/<name>.yaml, or any YAML path) has
    grid:       {override key: [values]}; one cell per combination (methods, presets, seeds, ...)
    tasks:      [task names]; each evaluates every cell's pretrained checkpoint
    overrides:  [key=value] shared by every cell
or, for cells that need different tasks, a list of blocks instead of grid:
    grids:      [{grid: {...}, tasks: [...]}, ...]; a block without tasks takes the top-level ones
Each cell is one pretraining job; its tasks form one job array that starts only after the
pretraining job succeeded (sbatch --dependency=afterok), so nothing waits on the login node.
A cell given a checkpoint (`checkpoint=PATH` in the grid or the overrides: a released file, or
one of ours) has no pretraining: its tasks evaluate that file at once.

Sweep folder:
    <sweep_dir>/sweep.json              cells, their overrides, and every job submitted
    <sweep_dir>/<cell>.pretrain/        the cell's pretraining run folder (bench run layout)
    <sweep_dir>/<cell>.<task>/          one run folder per task, on the cell's checkpoint
    <sweep_dir>/logs/<job id>/          submitit's logs

A unit (a cell's pretraining, or one of its tasks) is done when its record exists. Submitting
again skips done units and units whose job is still queued or running, continues units with a
run folder (checkpoint) from where they stopped, and leaves failed units alone unless retry.
Where each unit stands, and `bench status`'s table, are in slurm/states.py.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from benchmark.config import CONF_DIR, GROUPS, load_config
from benchmark.core.checkpoint import atomic_write
from benchmark.core.errors import ConfigError
from benchmark.pretrain import LAST
from benchmark.runner import plan_run
from slurm.jobs import PRETRAIN, SweepJob, overrides_for
from slurm.states import (
    DONE,
    FAILED,
    NOT_SUBMITTED,
    PENDING,
    RUNNING,
    UnitState,
    unit_dir,
    unit_states,
)
from tasks import TASKS, build_task

SWEEP_DIR = CONF_DIR / "sweep"
MANIFEST = "sweep.json"
SWEEP_KEYS = ("grid", "grids", "tasks", "overrides", "sweep_dir")
LAUNCHERS = ("local", "slurm")


@dataclass
class Cell:
    name: str
    overrides: list[str]
    tasks: list[str]
    # The sweep's tasks that do not apply to this cell's method -> why.
    skipped: dict[str, str] = field(default_factory=dict)
    # The checkpoint its tasks evaluate instead of a pretraining of their own, if given.
    checkpoint: str | None = None


@dataclass
class Sweep:
    name: str
    sweep_dir: Path
    cells: list[Cell]
    launcher: dict
    tasks: list[str] = field(default_factory=list)


def format_value(value) -> str:
    """A YAML value as Hydra override syntax."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return str(value)


def cell_name(items: list[tuple[str, str]]) -> str:
    """Readable and safe in paths and overrides: group choices by value, other keys as leaf+value."""
    parts = [value if key in GROUPS else f"{key.rpartition('.')[2]}{value}" for key, value in items]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(parts)).strip("-") or "cell"


def expand_grid(grid: dict, shared: list[str]) -> list[tuple[str, list[str]]]:
    """(cell name, overrides) for every combination of the grid, in grid order."""
    keys = list(grid)
    for key in keys:
        if not isinstance(grid[key], list) or not grid[key]:
            raise ConfigError(f"sweep grid.{key} must be a non-empty list, got {grid[key]!r}")
    cells, seen = [], {}
    for combo in itertools.product(*(grid[k] for k in keys)):
        items = [(k, format_value(v)) for k, v in zip(keys, combo)]
        name = cell_name(items)
        if name in seen:
            raise ConfigError(f"sweep cells {seen[name]} and {items} get the same folder name {name!r}")
        seen[name] = items
        cells.append((name, shared + [f"{k}={v}" for k, v in items]))
    return cells


def _sweep_file(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"sweep file not found: {path}")
        return path
    path = SWEEP_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SWEEP_DIR.glob("*.yaml")))
        raise ConfigError(f"unknown sweep {name_or_path!r} (known: {known}; or a path to a .yaml file)")
    return path


def split_overrides(args: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(sweep-level settings, launcher overrides, overrides for every cell)."""
    sweep, launcher, cell = [], [], []
    for arg in args:
        key = arg.partition("=")[0]
        top = key.split(".")[0]
        # `tasks=[...]` picks the sweep's tasks; `tasks.<task>.<key>=...` sets a task's setting.
        if key in SWEEP_KEYS or (top in SWEEP_KEYS and top != "tasks"):
            sweep.append(arg)
        elif key.split(".")[0] == "launcher":
            launcher.append(arg)
        else:
            cell.append(arg)
    return sweep, launcher, cell


def load_sweep(name_or_path: str, args: list[str]) -> Sweep:
    """The expanded, checked sweep; raises ConfigError on anything a job would fail on at once."""
    path = _sweep_file(name_or_path)
    sweep_args, launcher_args, cell_args = split_overrides(args)
    try:
        spec = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(sweep_args))
    except Exception as exc:  # YAML and dotlist errors come in several types
        raise ConfigError(f"bad sweep {path}: {' '.join(str(exc).split())}") from None
    unknown = sorted(set(spec) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"unknown sweep key {unknown[0]!r} in {path} (known: {', '.join(SWEEP_KEYS)})")
    spec = OmegaConf.to_container(spec, resolve=True)
    tasks = list(spec.get("tasks") or [])
    blocks = _blocks(spec, tasks, path)
    for task in [t for _, block_tasks in blocks for t in block_tasks]:
        if task not in TASKS:
            raise ConfigError(f"unknown task {task!r} in sweep {path.stem} (known: {', '.join(sorted(TASKS))})")
    launcher = OmegaConf.to_container(load_config(launcher_args).launcher)
    if launcher["name"] not in LAUNCHERS:
        raise ConfigError(f"sweeps run with launcher=local or launcher=slurm, got launcher={launcher['name']}")
    shared = [str(o) for o in spec.get("overrides") or []] + cell_args
    for override in shared:
        if override.partition("=")[0] in ("task", "run_dir", "resume", "launcher"):
            raise ConfigError(f"override {override!r} is set by the sweep itself (tasks: in the sweep file)")
    cells, seen = [], set()
    # Cells that differ only in their seed plan alike (a seed is the RNG's, no check reads it):
    # each distinct cell is planned once, its seeds replicate the answer.
    planned: dict[tuple, tuple[list[str], dict[str, str]]] = {}
    for grid, block_tasks in blocks:
        for name, overrides in expand_grid(grid, shared):
            if name in seen:
                raise ConfigError(f"sweep {path.stem}: two blocks of grids: make the same cell {name!r}")
            seen.add(name)
            given = [o.partition("=")[2] for o in overrides if o.partition("=")[0] == "checkpoint"]
            checkpoint = str(Path(given[-1]).expanduser().absolute()) if given and given[-1] != "null" else None
            cell_overrides = [o for o in overrides if o.partition("=")[0] != "checkpoint"]
            if checkpoint and not block_tasks:
                raise ConfigError(f"sweep {path.stem}: cell {name} evaluates checkpoint={given[-1]} but has no tasks")
            seeds = [o.partition("=")[2] for o in cell_overrides if o.partition("=")[0] == "seed"]
            if seeds and not seeds[-1].isdigit():
                raise ConfigError(f"sweep {path.stem}: cell {name}: seed must be an integer >= 0, got {seeds[-1]}")
            key = (*(o for o in cell_overrides if o.partition("=")[0] != "seed"), checkpoint, *block_tasks)
            if key not in planned:
                planned[key] = _applicable_tasks(cell_overrides, block_tasks, checkpoint)
            kept, skipped = planned[key]
            cells.append(Cell(name, cell_overrides, list(kept), dict(skipped), checkpoint))
    tasks = list(dict.fromkeys(t for _, block_tasks in blocks for t in block_tasks))
    sweep_dir = Path(spec.get("sweep_dir") or Path("results") / "sweeps" / path.stem).expanduser().absolute()
    return Sweep(path.stem, sweep_dir, cells, launcher, tasks)


def _blocks(spec: dict, tasks: list[str], path: Path) -> list[tuple[dict, list[str]]]:
    """(grid, tasks) of every block: the one grid, or each entry of grids."""
    if "grids" not in spec:
        grid = spec.get("grid")
        if not isinstance(grid, dict) or not grid:
            raise ConfigError(
                f"sweep {path.stem}: grid must map at least one override key to its values (e.g. seed: [0, 1, 2]), "
                f"got {grid!r}; a single run is `bench run`"
            )
        return [(grid, tasks)]
    if "grid" in spec:
        raise ConfigError(f"sweep {path.stem} sets both grid and grids; use one")
    blocks = spec["grids"]
    if not isinstance(blocks, list) or not blocks:
        raise ConfigError(f"sweep {path.stem}: grids must be a non-empty list of {{grid, tasks}} blocks")
    out = []
    for i, block in enumerate(blocks):
        if not isinstance(block, dict) or set(block) - {"grid", "tasks"} or "grid" not in block:
            raise ConfigError(f"sweep {path.stem}: grids[{i}] must hold a grid (and optionally tasks), got {block!r}")
        if not isinstance(block["grid"], dict) or not block["grid"]:
            raise ConfigError(f"sweep {path.stem}: grids[{i}].grid must map at least one override key to its values")
        out.append((block["grid"], list(block.get("tasks") or tasks)))
    return out


def _applicable_tasks(
    overrides: list[str], tasks: list[str], checkpoint: str | None = None
) -> tuple[list[str], dict[str, str]]:
    """Check the cell the way `bench run` would: (the tasks that apply to its method, the others -> why).

    The method is planned on the meta device and a checkpoint read by its names and shapes only:
    its bytes are read and verified by the jobs that run (a sweep over multi-GB checkpoints plans
    on a login node in seconds; docs/sweeps.md).
    """
    given = [f"checkpoint={checkpoint}"] if checkpoint else []
    cfg = load_config([*overrides_for(overrides, None), *given, "task=none"])
    plan = plan_run(cfg, verify_checkpoint=False, allow_empty=True)
    kept, skipped = [], {}
    for task in tasks:
        cfg = load_config(overrides_for(overrides, task) + [f"task={task}"])
        verdict = build_task(task, cfg.tasks[task]).applies_to(plan.method)
        if verdict:
            kept.append(task)
        else:
            skipped[task] = verdict.reason
    return kept, skipped


# ---- the sweep folder ------------------------------------------------------------------------


def read_manifest(sweep_dir: Path) -> dict:
    path = sweep_dir / MANIFEST
    if not path.is_file():
        raise ConfigError(f"not a sweep folder (no {MANIFEST}): {sweep_dir}")
    return json.loads(path.read_text())


def write_manifest(sweep_dir: Path, manifest: dict) -> None:
    data = json.dumps(manifest, indent=2).encode()
    atomic_write(sweep_dir / MANIFEST, lambda f: f.write(data))


def _new_manifest(sweep: Sweep) -> dict:
    return {
        "name": sweep.name,
        "launcher": sweep.launcher,
        "tasks": sweep.tasks,
        "cells": {
            c.name: {"overrides": c.overrides, "tasks": c.tasks, "checkpoint": c.checkpoint} for c in sweep.cells
        },
        "jobs": {},
    }


def _merge_manifest(sweep: Sweep) -> dict:
    """The existing manifest with new cells added; a cell whose settings changed is refused."""
    if not (sweep.sweep_dir / MANIFEST).is_file():
        return _new_manifest(sweep)
    manifest = read_manifest(sweep.sweep_dir)
    for cell in sweep.cells:
        old = manifest["cells"].get(cell.name)
        if old is not None and (old["overrides"], old.get("checkpoint")) != (cell.overrides, cell.checkpoint):
            changed = sorted(set(old["overrides"]) ^ set(cell.overrides)) or [f"checkpoint={cell.checkpoint}"]
            raise ConfigError(
                f"{sweep.sweep_dir} already holds cell {cell.name} with other settings "
                f"({', '.join(changed[:4])}): choose another sweep_dir"
            )
        manifest["cells"][cell.name] = {"overrides": cell.overrides, "tasks": cell.tasks, "checkpoint": cell.checkpoint}
    manifest["launcher"] = sweep.launcher
    return manifest


# ---- submission ------------------------------------------------------------------------------


def unit_job(sweep: Sweep, unit: str) -> SweepJob:
    """What runs unit "<cell>/pretrain" or "<cell>/<task>" (a job, or in-process for launcher=local)."""
    cell_name, _, what = unit.partition("/")
    cell = next(c for c in sweep.cells if c.name == cell_name)
    run_dir = unit_dir(sweep.sweep_dir, unit)
    if what == PRETRAIN:
        return SweepJob(cell.overrides, str(run_dir))
    checkpoint = cell.checkpoint or unit_dir(sweep.sweep_dir, f"{cell_name}/{PRETRAIN}") / "checkpoints" / LAST
    return SweepJob(cell.overrides, str(run_dir), task=what, checkpoint_path=str(checkpoint))


@dataclass
class Decision:
    pretrain: bool  # submit the cell's pretraining
    after: str | None  # job id the tasks wait for (afterok), if any
    tasks: list[str]  # tasks to submit
    skipped: list[str]  # units left alone, with why


def needs_submission(st: UnitState, retry: bool) -> bool:
    """Never submitted, or its job ended without a record (killed, cancelled, lost): run it again,
    continuing its run folder. A failed record is a result: only retry submits it again."""
    if st.state == DONE or st.state in (PENDING, RUNNING) and st.reason != NOT_SUBMITTED:
        return False
    return retry if st.record is not None else True


def decide(cell: Cell, states: dict[str, UnitState], retry: bool) -> Decision:
    """What to submit for one cell, given the state of its units."""
    if cell.checkpoint:  # nothing to wait for
        tasks = [t for t in cell.tasks if needs_submission(states[f"{cell.name}/{t}"], retry)]
        left = [
            f"{states[f'{cell.name}/{t}'].unit}: {states[f'{cell.name}/{t}'].state}"
            for t in cell.tasks
            if t not in tasks
        ]
        return Decision(False, None, tasks, left)
    pre = states[f"{cell.name}/{PRETRAIN}"]
    submit_pre = needs_submission(pre, retry)
    skipped = [] if submit_pre else [f"{pre.unit}: {pre.state}"]
    if pre.state == FAILED and not submit_pre:
        blocked = [f"{cell.name}/{t}: waits for failed pretraining (retry to resubmit)" for t in cell.tasks]
        return Decision(False, None, [], skipped + blocked)
    after = None if pre.state == DONE or submit_pre else pre.job_id
    tasks = []
    for task in cell.tasks:
        st = states[f"{cell.name}/{task}"]
        # A failed pretraining cancels its tasks (kill-on-invalid-dep): they come back with it.
        if needs_submission(st, retry) or (submit_pre and st.state == FAILED):
            tasks.append(task)
        else:
            skipped.append(f"{st.unit}: {st.state}")
    return Decision(submit_pre, after, tasks, skipped)


def submit_sweep(sweep: Sweep, retry: bool = False, on_event=print) -> dict:
    """Submit (slurm) or run (local) every unit that needs it; returns the manifest."""
    sweep.sweep_dir.mkdir(parents=True, exist_ok=True)
    manifest = _merge_manifest(sweep)
    write_manifest(sweep.sweep_dir, manifest)
    states = {s.unit: s for s in unit_states(sweep.sweep_dir, manifest)}
    run = _run_local if sweep.launcher["name"] == "local" else _submit_slurm
    for cell in sweep.cells:
        decision = decide(cell, states, retry)
        for line in decision.skipped:
            on_event(f"skip {line}")
        if decision.pretrain or decision.tasks:
            run(sweep, manifest, cell, decision, on_event)
    return manifest


def _submit_slurm(sweep: Sweep, manifest: dict, cell: Cell, decision: Decision, on_event) -> None:
    from slurm.launcher import executor_for

    logs = sweep.sweep_dir / "logs" / "%j"
    after = decision.after
    if decision.pretrain:
        job = executor_for(sweep.launcher, logs).submit(unit_job(sweep, f"{cell.name}/{PRETRAIN}"))
        _note(manifest, f"{cell.name}/{PRETRAIN}", job)
        after = job.job_id
        on_event(f"submitted {cell.name}/{PRETRAIN}: job {job.job_id}")
    if decision.tasks:
        executor = executor_for(sweep.launcher, logs, single_task=True)
        if after is not None:
            extra = dict(sweep.launcher.get("additional_parameters") or {})
            extra.update({"dependency": f"afterok:{after}", "kill-on-invalid-dep": "yes"})
            executor.update_parameters(slurm_additional_parameters=extra)
        with executor.batch():
            jobs = [executor.submit(unit_job(sweep, f"{cell.name}/{t}")) for t in decision.tasks]
        for task, job in zip(decision.tasks, jobs):
            _note(manifest, f"{cell.name}/{task}", job, after)
        wait = f" after job {after}" if after else ""
        on_event(f"submitted {cell.name} tasks {', '.join(decision.tasks)}: array {jobs[0].job_id.split('_')[0]}{wait}")
    write_manifest(sweep.sweep_dir, manifest)


def _note(manifest: dict, unit: str, job, after: str | None = None) -> None:
    manifest["jobs"][unit] = {
        "job_id": job.job_id,
        "log": str(job.paths.stderr),
        "after": after,
        "submitted": time.time(),
    }


def _run_local(sweep: Sweep, manifest: dict, cell: Cell, decision: Decision, on_event) -> None:
    units = ([PRETRAIN] if decision.pretrain else []) + decision.tasks
    for what in units:
        unit = f"{cell.name}/{what}"
        entry = {"pid": os.getpid(), "host": socket.gethostname(), "submitted": time.time()}
        manifest["jobs"][unit] = entry
        write_manifest(sweep.sweep_dir, manifest)
        on_event(f"running {unit}")
        try:
            unit_job(sweep, unit)()
        except Exception as exc:  # the failed record says why; later cells still run
            entry["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            on_event(f"failed {unit}: {entry['error']}")
            if what == PRETRAIN:
                break
        finally:
            entry["ended"] = True
            write_manifest(sweep.sweep_dir, manifest)


def resolve_sweep_dir(name_or_path: str) -> Path:
    """A sweep folder given as a path, or as the name of a sweep in its default folder."""
    path = Path(name_or_path).expanduser()
    if (path / MANIFEST).is_file():
        return path.absolute()
    default = Path("results") / "sweeps" / name_or_path
    if (default / MANIFEST).is_file():
        return default.absolute()
    raise ConfigError(f"no sweep folder at {path} or {default} (no {MANIFEST})")
