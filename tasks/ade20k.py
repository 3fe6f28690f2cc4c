"""ADE20k semantic segmentation (RECIPE.md section 3) in the paper's modes, two backends.

A copy of the method becomes a segmenter (tasks/segmentation/model.py): a UperNet head on four
feature levels (+ an auxiliary FCN head, loss weight 0.4) or a linear head on the last layer;
which of encoder and predictor train is the mode. Training follows mmseg's ADE20k recipe
(iteration-based, AdamW, linear warmup then poly decay, layer-wise lr decay on the encoder);
evaluation rescales each val image, slides a crop-sized window, resizes the logits to the
label map and scores mIoU. `backend=mmseg` uses mmsegmentation's UPerHead/FCNHead and
IoUMetric, `native` our torch heads and mIoU, `auto` mmseg when installed.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from benchmark.core.errors import ConfigError
from benchmark.core.data import SeededBatches, make_loader
from benchmark.core.errors import DataError
from benchmark.core.progress import progress_bar
from tasks.base import Task, TaskContext
from tasks.segmentation import mmseg_backend
from tasks.segmentation.data import ADE20k, Pipeline, TrainCrops, eval_image, slide_inference, stack_pairs
from tasks.segmentation.metrics import IGNORE_INDEX, ConfusionIoU
from tasks.segmentation.model import HEADS, MODES, Segmenter

BACKENDS = ("auto", "native", "mmseg")


def warmup_poly(it: int, total: int, warmup: int, warmup_ratio: float, power: float, min_lr_ratio: float) -> float:
    """lr factor: linear warmup from warmup_ratio, then polynomial decay to min_lr_ratio (mmseg)."""
    if it < warmup:
        return warmup_ratio + (1 - warmup_ratio) * it / warmup
    progress = (it - warmup) / max(1, total - warmup)
    return min_lr_ratio + (1 - min_lr_ratio) * (1 - progress) ** power


def colourise(label: np.ndarray, num_classes: int) -> np.ndarray:
    """Label map -> RGB, a fixed colour per class, ignored pixels black."""
    palette = np.random.default_rng(0).integers(40, 256, size=(max(num_classes, 1), 3)).astype(np.uint8)
    out = np.zeros(label.shape + (3,), dtype=np.uint8)
    valid = (label >= 0) & (label < num_classes)
    out[valid] = palette[label[valid]]
    return out


class ADE20kSegmentation(Task):
    """ADE20k semantic segmentation: UperNet or linear head, encoder/predictor/end-to-end finetuning."""
    name = "ade20k"

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        c = self.cfg
        for key, allowed in (("mode", MODES), ("head", HEADS), ("backend", BACKENDS)):
            if c[key] not in allowed:
                raise ConfigError(f"tasks.ade20k.{key} must be one of {', '.join(allowed)}, got {c[key]!r}")
        for key in ("iters", "batch_size", "crop_size", "stride", "num_classes", "channels", "eval_batch_size"):
            if not isinstance(c[key], int) or c[key] < 1:
                raise ConfigError(f"tasks.ade20k.{key} must be a positive integer, got {c[key]!r}")
        if c["stride"] > c["crop_size"]:
            raise ConfigError(f"tasks.ade20k.stride={c['stride']} is larger than crop_size={c['crop_size']}: "
                              "windows would skip pixels")
        if c["backend"] == "mmseg":
            reason = mmseg_backend.missing_reason()
            if reason:
                raise ConfigError(f"tasks.ade20k.backend=mmseg but {reason}")
        if c["root"] is not None and not Path(str(c["root"])).expanduser().is_dir():
            raise DataError(f"tasks.ade20k.root not found: {c['root']}")

    @property
    def backend(self) -> str:
        if self.cfg["backend"] == "auto":
            return "native" if mmseg_backend.missing_reason() else "mmseg"
        return self.cfg["backend"]

    def applies_to(self, method) -> bool:
        c = self.cfg
        if c["mode"] in ("predictor", "end_to_end"):
            if method.predictor is None:
                raise ConfigError(f"tasks.ade20k.mode={c['mode']} needs a predictor; method {method.name} has none")
            # The predictor's position table is fixed to the pretraining grid.
            if c["crop_size"] != method.image_size:
                raise ConfigError(f"tasks.ade20k.mode={c['mode']} runs the predictor on whole crops: crop_size "
                                  f"({c['crop_size']}) must equal the pretraining resolution ({method.image_size})")
        patch = method.eval_encoder("encoder").patch_size
        if c["crop_size"] % patch:
            raise ConfigError(f"tasks.ade20k.crop_size={c['crop_size']} is not a multiple of the patch size {patch}")
        return True

    def run(self, method, ctx: TaskContext) -> dict:
        c = self.cfg
        root = Path(str(c["root"])).expanduser() if c["root"] is not None else ctx.source.root
        train, val = ADE20k(root, "train", c["reduce_zero_label"]), ADE20k(root, "val", c["reduce_zero_label"])
        if c["batch_size"] > len(train):
            raise DataError(f"tasks.ade20k.batch_size={c['batch_size']} exceeds the {len(train)} training images in {root}")
        backend = self.backend
        torch.manual_seed(ctx.seed)
        model = Segmenter(method, ctx.encoder_key, c["mode"], c["head"], c["num_classes"], c, backend).to(ctx.device)
        started = time.perf_counter()
        losses = self._train(model, train, ctx)
        train_seconds = time.perf_counter() - started
        metrics = self._evaluate(model, val, ctx, backend)
        metrics.update(backend=backend, mode=c["mode"], head=c["head"], num_classes=c["num_classes"],
                       iters=c["iters"], train_images=len(train), val_images=len(val), data_root=str(root),
                       first_loss=losses[0], final_loss=float(np.mean(losses[-max(1, len(losses) // 10):])),
                       train_seconds=train_seconds,
                       trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad))
        return metrics

    def _train(self, model: Segmenter, train: ADE20k, ctx: TaskContext) -> list[float]:
        c = self.cfg
        pipeline = Pipeline(scale=tuple(c["scale"]), crop=c["crop_size"], ratio_range=tuple(c["ratio_range"]),
                            cat_max_ratio=c["cat_max_ratio"], flip=c["flip"], photometric=c["photometric"])
        lr_scale = c["random_predictor_lr_scale"] if c["random_predictor"] else 1.0
        opt = torch.optim.AdamW(model.param_groups(c["lr"], c["weight_decay"], c["layer_decay"], lr_scale),
                                lr=c["lr"], betas=tuple(c["betas"]))
        crops = TrainCrops(train, pipeline)
        autocast = dict(device_type=ctx.device.type, dtype=torch.bfloat16, enabled=bool(c["bf16"]))
        per_epoch = len(train) // c["batch_size"]
        losses: list[float] = []
        model.train()
        with progress_bar("ade20k train", c["iters"], enabled=ctx.show_progress) as bar:
            for epoch in range(math.ceil(c["iters"] / per_epoch)):
                batches = SeededBatches(len(train), c["batch_size"], ctx.seed, epoch)
                loader = make_loader(crops, batches, stack_pairs, ctx.workers)
                for images, labels in loader:
                    it = len(losses)
                    if it >= c["iters"]:
                        break
                    bad = (labels != IGNORE_INDEX) & (labels >= c["num_classes"])
                    if bad.any():
                        raise DataError(f"label {int(labels[bad].max())} in {train.samples[0][1].parent} is outside "
                                        f"tasks.ade20k.num_classes={c['num_classes']} (after reduce_zero_label)")
                    factor = warmup_poly(it, c["iters"], c["warmup_iters"], c["warmup_ratio"], c["poly_power"],
                                         c["min_lr_ratio"])
                    for group in opt.param_groups:
                        group["lr"] = c["lr"] * group["lr_scale"] * factor
                    images, labels = images.to(ctx.device), labels.to(ctx.device)
                    with torch.autocast(**autocast):
                        logits, aux = model(images)
                    loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)
                    if aux is not None:
                        loss = loss + c["aux_weight"] * F.cross_entropy(aux.float(), labels, ignore_index=IGNORE_INDEX)
                    if not torch.isfinite(loss):
                        raise RuntimeError(f"ade20k training loss is {loss.item()} at iteration {it}")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    losses.append(loss.item())
                    bar.advance(loss=losses[-1])
        return losses

    @torch.no_grad()
    def predict(self, model: Segmenter, image: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """Class map [B, H, W] at out_size for rescaled images [B, 3, H', W'] (sliding window)."""
        c = self.cfg
        autocast = dict(device_type=image.device.type, dtype=torch.bfloat16, enabled=bool(c["bf16"]))

        def logits_fn(window: torch.Tensor) -> torch.Tensor:
            with torch.autocast(**autocast):
                return model(window)[0]

        logits = slide_inference(logits_fn, image, c["num_classes"], c["crop_size"], c["stride"])
        logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
        return logits.argmax(1)

    def _evaluate(self, model: Segmenter, val: ADE20k, ctx: TaskContext, backend: str) -> dict:
        c = self.cfg
        model.eval()
        meter = mmseg_backend.MMSegIoU(c["num_classes"]) if backend == "mmseg" else ConfusionIoU(c["num_classes"])
        shown = []
        batch: list[tuple[int, torch.Tensor, torch.Tensor]] = []

        def flush() -> None:
            images = torch.stack([b[1] for b in batch]).to(ctx.device)
            labels = torch.stack([b[2] for b in batch])
            preds = self.predict(model, images, tuple(labels.shape[-2:])).cpu()
            meter.add(preds, labels)
            shown.extend((i, lab, p) for (i, _, lab), p in zip(batch, preds) if i < c["vis_images"])
            batch.clear()

        with progress_bar("ade20k eval", len(val), enabled=ctx.show_progress) as bar:
            for i in range(len(val)):
                image, label = val[i]
                item = (i, eval_image(image, tuple(c["scale"])), torch.from_numpy(label))
                if batch and (item[1].shape != batch[0][1].shape or item[2].shape != batch[0][2].shape):
                    flush()
                batch.append(item)
                if len(batch) == c["eval_batch_size"]:
                    flush()
                bar.advance()
            if batch:
                flush()
        metrics = meter.scores()
        if shown:
            metrics["visualisation"] = str(self._visualise(val, shown, ctx.run_dir))
        return metrics

    def _visualise(self, val: ADE20k, shown: list, run_dir: Path) -> Path:
        """A PNG: one row per image, (image | ground truth | prediction); ignored pixels black."""
        c = self.cfg
        rows = []
        for i, label, pred in shown:
            image = np.asarray(val[i][0])
            tiles = [image, colourise(label.numpy(), c["num_classes"]), colourise(pred.numpy(), c["num_classes"])]
            rows.append(np.concatenate(tiles, axis=1))
        width = max(r.shape[1] for r in rows)
        grid = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows], axis=0)
        picture = Image.fromarray(grid)
        # Small images are enlarged (nearest) so the label maps stay readable.
        factor = max(1, 256 // min(r.shape[0] for r in rows))
        picture = picture.resize((picture.width * factor, picture.height * factor), Image.NEAREST)
        path = run_dir / f"ade20k_{c['mode']}_{c['head']}.png"
        picture.save(path)
        return path
