"""`bench perf`: how fast pretraining and evaluation run, and proof that the fast path computes
the same thing.

Training step. Each (method, precision, variant) case is built through the real config tree and
run in a fresh subprocess (so its peak memory is its own): the real data path feeds the real
method through the step the pretraining loop runs (benchmark/step.py). Two timings per case:
the step alone on batches already built (the FLOP rate is of this one), and the training loop as
pretraining runs it, fed by the default loader workers, with the time each step waited for its
batch (on a machine with no spare core the workers take CPU from the step, so the loop can be
slower than the step alone).
Per case: median seconds after warm-up, images/s, the cost of building one batch in one
process, peak memory (max RSS on CPU, max allocated on GPU), the FLOPs of each timed step
(FlopCounterMode) and their rate as a fraction of the machine's matmul ceiling measured in the
same run, and the loss of every step. Two variants per method and precision: `eager` (plain
AdamW loop, timm's SDPA attention, no compile) and `fast` (the defaults, compiled with
--compile), or any of those and `compiled` (the defaults, compiled) by --variants; the losses of
each must agree with eager's within a tolerance, and the table says whether they do.

Evaluation. Pooled features are extracted once per (checkpoint, dataset) and cached for every
frozen probe (first versus second request is timed), and the linear-probe grid trained in one
pass is timed against the same heads trained one at a time, with the largest weight difference
between the two. The finetuning stages' training step (frozen tokens and images) is timed with
each attention kernel the task stages can run.

Data path (`--data-path`, benchmark/perf/datapath.py). Images/s on one core of each method's
training input pipeline at 224 px, side by side with the official pipelines on the same files,
and the worker cores one GPU needs to keep up.
"""

from benchmark.perf.cases import (
    _TINY_224,
    CPU_CASES,
    DEFAULT_VARIANTS,
    GPU_CASES,
    PRECISIONS,
    VARIANTS,
    available_methods,
    case_overrides,
)
from benchmark.perf.common import PerfError, training_step
from benchmark.perf.evaluation import STAGES, sgd_head, time_linear_probe, time_task_stages
from benchmark.perf.measure import matmul_ceiling, measure_ceiling, peak_memory_mib, time_training_step
from benchmark.perf.report import check_numerics, summarise, tables
from benchmark.perf.suite import run_benchmark

__all__ = [
    "_TINY_224",
    "CPU_CASES",
    "DEFAULT_VARIANTS",
    "GPU_CASES",
    "PRECISIONS",
    "STAGES",
    "VARIANTS",
    "PerfError",
    "available_methods",
    "case_overrides",
    "check_numerics",
    "matmul_ceiling",
    "measure_ceiling",
    "peak_memory_mib",
    "run_benchmark",
    "sgd_head",
    "summarise",
    "tables",
    "time_linear_probe",
    "time_task_stages",
    "time_training_step",
    "training_step",
]
