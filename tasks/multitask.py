"""Multitask predictor tuning: one world model for several label sets at once.

Frozen encoder; one copy of the pretrained predictor gets, next to the image's tokens, a learned
task token (one per label set, handed to `method.predict_full(tokens, extra=...)`), and one
attentive head per label set reads its outputs. Every step draws a batch of each label set (each
with its own sample order) and averages their losses, so per label set the multitask predictor
sees as many samples and steps as a separately tuned one. In the same run, one predictor per
label set is tuned separately with the same recipe (predictor_ft's loop): the comparison the
paper reports (73.5 multitask vs 73.4 separate, average over four datasets).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn as nn

from benchmark.core.errors import ConfigError
from benchmark.core.optim import count_parameters, param_groups
from benchmark.core.seeding import derive_seed, seeded
from benchmark.core.stats import Evidence, fingerprint
from methods.base import Method
from tasks.base import Applies, Task, TaskContext
from tasks.core import HEAD_SEED, MIX_SEED, TRAIN_POOL_SEED, loss_summary, set_drop_path, train, working_copy
from tasks.finetune import PredictorFinetune, evaluate, frozen_inputs, train_pool
from tasks.heads import build_head
from tasks.mixing import soft_cross_entropy
from tasks.recipe import PREDICTOR_RECIPE, check_head, head_heads, lr_schedule, mixed, wd_schedule


class MultitaskModel(nn.Module):
    """Frozen tokens + task ids -> the predictor with that task's token -> that task's head."""

    def __init__(
        self, work: Method, token_dim: int, out_dim: int, classes: list[int], cfg: dict, frozen: tuple[nn.Module, ...]
    ):
        super().__init__()
        self.work, self.frozen = work, frozen
        # In the encoder's token space: the predictor embeds them like context tokens.
        self.task_tokens = nn.Parameter(torch.zeros(len(classes), token_dim))
        nn.init.trunc_normal_(self.task_tokens, std=0.02)
        heads = head_heads(cfg, work.world_model_heads)
        self.heads = nn.ModuleList(build_head(cfg["head"], out_dim, c, heads) for c in classes)

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.frozen:
            module.eval()
        return self

    def features(self, tokens: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        return self.work.predict_full(tokens, extra=self.task_tokens[task].unsqueeze(1))

    def for_task(self, t: int) -> nn.Module:
        """Tokens -> logits of task t (for evaluation)."""
        return _OneTask(self, t)


class _OneTask(nn.Module):
    def __init__(self, model: MultitaskModel, t: int):
        super().__init__()
        self.model, self.t = model, t

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        task = torch.full((tokens.size(0),), self.t, dtype=torch.long, device=tokens.device)
        return self.model.heads[self.t](self.model.features(tokens, task))


class MultitaskPredictor(Task):
    """Multitask predictor tuning: one predictor, a learned token and a head per label set."""

    name = "multitask"
    settings = PREDICTOR_RECIPE

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        sets = self.cfg.get("label_sets")
        if not isinstance(sets, (list, tuple)) or len(sets) < 2 or len(set(sets)) != len(sets):
            raise ConfigError(
                f"tasks.multitask.label_sets must list at least two different label columns, got {sets!r}"
            )

    def applies_to(self, method: Method) -> Applies:
        return Applies.needs(method, predictor=True)

    def check(self, method: Method) -> None:
        check_head(self.name, self.cfg, method.world_model_dim, method.world_model_heads)
        if self.cfg["inputs"] != "tokens":
            raise ConfigError("tasks.multitask.inputs must be tokens: the joint stage tunes on cached frozen tokens")
        if self.cfg["head_init_std"] is not None:
            raise ConfigError("tasks.multitask.head_init_std must be null: its heads keep their own initialisation")

    def run(self, method: Method, ctx: TaskContext) -> dict:
        cfg, sets = self.cfg, list(self.cfg["label_sets"])
        separate = {}
        for column in sets:
            metrics, _ = PredictorFinetune(cfg).tune(method, ctx, column)
            separate[column] = metrics
        multi, trainable, seconds, stats = self.tune_jointly(method, ctx, sets)
        per_task = {
            c: {
                "multitask_top1": 100.0 * float(multi[c].mean()),
                "separate_top1": separate[c]["top1"],
                "chance_top1": separate[c]["chance_top1"],
                "num_classes": separate[c]["num_classes"],
            }
            for c in sets
        }
        mean = lambda key: sum(row[key] for row in per_task.values()) / len(per_task)  # noqa: E731
        # Every label set scores the same val images: the headline is the mean over (set, image).
        evidence = Evidence(
            "correct",
            {"correct": np.concatenate([multi[c] for c in sets])},
            fingerprint(*(ctx.val_fingerprint(c) for c in sets)),
        )
        return {
            "top1": mean("multitask_top1"),
            "evidence": evidence,
            "separate_top1": mean("separate_top1"),
            "chance_top1": mean("chance_top1"),
            "label_sets": sets,
            "per_task": per_task,
            "trainable_params": trainable,
            "separate_trainable_params": sum(m["trainable_params"] for m in separate.values()),
            "train_seconds": seconds,
            "separate_train_seconds": sum(m["train_seconds"] for m in separate.values()),
            "epochs": cfg["epochs"],
            **stats,
            # Every stage of the comparison must have converged for it to mean something.
            "converged": stats["converged"] and all(m["converged"] for m in separate.values()),
            "separate_converged": {c: separate[c]["converged"] for c in sets},
        }

    def tune_jointly(self, method: Method, ctx: TaskContext, sets: list[str]) -> tuple[dict, int, float, dict]:
        """Train the shared predictor; returns (val correctness per label set, trainable parameters,
        seconds, loss statistics)."""
        cfg, seed = self.cfg, derive_seed(ctx.seed, sum(map(ord, self.name)))
        train_sets = [ctx.labels("train", c) for c in sets]
        val = [ctx.labels("val", c)[0] for c in sets]
        model = self.build(method, ctx, [k for _, k in train_sets], seed)
        # Task tokens learn at the predictor's rate (they are its inputs); tokens are not decayed.
        groups = (
            param_groups(model.heads, cfg["weight_decay"], tokens=False)
            + param_groups(model.work.predictor, cfg["weight_decay"], cfg["predictor_lr_scale"])
            + param_groups(
                model, cfg["weight_decay"], cfg["predictor_lr_scale"], named=[("task_tokens", model.task_tokens)]
            )
        )
        bs = cfg["batch_size"]
        pool = train_pool(len(train_sets[0][0]), cfg.get("train_samples"), derive_seed(ctx.seed, TRAIN_POOL_SEED))
        steps = len(pool) // bs
        if steps == 0:
            raise ValueError(f"tasks.multitask.batch_size={bs} is larger than the training set ({len(pool)})")
        total, lr_at = lr_schedule(cfg, steps)
        gen = torch.Generator().manual_seed(derive_seed(seed, MIX_SEED))

        def batches():
            for epoch in range(cfg["epochs"]):
                streams = [
                    frozen_inputs(method, ctx, "train", labels, bs, derive_seed(seed, epoch, t), pool)
                    for t, (labels, _) in enumerate(train_sets)
                ]
                yield from zip(*streams)

        def loss(per_set):
            xs, targets = zip(*(mixed(x, y, classes, cfg, gen) for (x, y), (_, classes) in zip(per_set, train_sets)))
            task = torch.arange(len(sets), device=ctx.device).repeat_interleave(bs)
            out = model.features(torch.cat(xs), task).split(bs)
            return sum(
                soft_cross_entropy(head(o), s.to(ctx.device)) for head, o, s in zip(model.heads, out, targets)
            ) / len(sets)

        started = time.perf_counter()
        model.to(ctx.device).train()
        losses = train(
            groups,
            batches(),
            total,
            lr_at,
            loss,
            betas=cfg["betas"],
            clip_grad=cfg["clip_grad"],
            device=ctx.device,
            precision=cfg["precision"],
            label=self.name,
            show_progress=ctx.show_progress,
            wd_at=wd_schedule(cfg, total),
        )
        seconds = time.perf_counter() - started
        correct = {
            c: evaluate(
                model.for_task(t), frozen_inputs(method, ctx, "val", val[t], bs, None), ctx.device, cfg["precision"]
            )
            for t, c in enumerate(sets)
        }
        return correct, count_parameters(groups), seconds, loss_summary(losses, steps)

    def build(self, method: Method, ctx: TaskContext, classes: list[int], seed: int) -> MultitaskModel:
        work = working_copy(method, [method.predictor])
        set_drop_path(work.predictor, self.cfg["drop_path"])
        frozen = tuple(m for m in (work.encoder, work.target_encoder) if m is not None)
        with seeded(derive_seed(seed, HEAD_SEED)):
            return MultitaskModel(work, method.token_dim, method.world_model_dim, classes, self.cfg, frozen)
