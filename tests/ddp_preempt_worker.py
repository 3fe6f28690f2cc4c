"""Run by torchrun from tests/test_distributed.py: a 2-rank pretraining in which ONLY rank 1 is
asked to stop after step `stop_step` (as if only its node got the preemption signal), then both
ranks resume the run folder to the end.

Usage: torchrun --nproc_per_node 2 tests/ddp_preempt_worker.py <run_dir> <stop_step> <override>...
Rank 0 writes <run_dir>/../stopped.json with the step each rank stopped at.
"""

import json
import sys
from pathlib import Path

import benchmark.pretrain as pretrain_module
from benchmark.config import load_config
from benchmark.core import distributed, interrupt
from benchmark.runner import execute, plan_run


def main() -> None:
    run_dir, stop_step, overrides = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    plan = plan_run(load_config([*overrides, f"run_dir={run_dir}"]))
    world, _ = distributed.setup(plan.device)
    real_fault_point = pretrain_module.fault_point

    def ask_rank1_to_stop(name: str) -> None:
        if world.rank == 1 and name == f"step:{stop_step}":
            interrupt.request(interrupt.STOP)
        real_fault_point(name)

    pretrain_module.fault_point = ask_rank1_to_stop
    stopped = None
    try:
        execute(plan)
    except interrupt.Interrupted as exc:
        stopped = exc.step
    pretrain_module.fault_point = real_fault_point
    steps = [None] * world.size
    import torch.distributed as dist

    dist.all_gather_object(steps, stopped)
    if world.is_main:
        (run_dir.parent / "stopped.json").write_text(json.dumps(steps))
    execute(plan_run(load_config([*overrides, f"run_dir={run_dir}", "resume=true"])))
    distributed.shutdown()


if __name__ == "__main__":
    main()
