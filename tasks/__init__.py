"""The task registry: every evaluation protocol, by the name used in `task=<name>`."""

from __future__ import annotations

from tasks.ade20k import ADE20kSegmentation
from tasks.attentive import AttentiveProbe
from tasks.base import Task, TaskContext  # noqa: F401 (the task API: Task, TaskContext)
from tasks.finetune import EncoderFinetune, EndToEnd, PredictorFinetune, RandomPredictorFinetune
from tasks.knn import KNNClassifier
from tasks.linear import LinearProbe
from tasks.mrr import WorldModelMRR
from tasks.multitask import MultitaskPredictor

TASKS: dict[str, type[Task]] = {
    "linear": LinearProbe,
    "knn": KNNClassifier,
    "attentive": AttentiveProbe,
    "encoder_ft": EncoderFinetune,
    "predictor_ft": PredictorFinetune,
    "predictor_ft_random": RandomPredictorFinetune,
    "end_to_end": EndToEnd,
    "multitask": MultitaskPredictor,
    "mrr": WorldModelMRR,
    "ade20k": ADE20kSegmentation,
}


def build_task(name: str, cfg: dict) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r} (known: {', '.join(sorted(TASKS))}, all)")
    return TASKS[name](cfg)
