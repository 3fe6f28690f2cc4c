"""ADE20k semantic segmentation in the paper's modes (encoder, predictor, end-to-end), two backends.

A copy of the method becomes a segmenter (tasks/segmentation/model.py): a UperNet head on four
feature levels (+ an auxiliary FCN head, loss weight 0.4) or a linear head on the last layer;
which of encoder and predictor train is the mode. Training follows mmseg's ADE20k recipe
(iteration-based, AdamW, mmengine's LinearLR warmup then PolyLR decay, layer-wise lr decay on
the encoder, cross-entropy averaged over all pixels of the batch, ignored ones included);
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
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from timm.models.vision_transformer import Block

from benchmark.core.errors import ConfigError, DataError
from benchmark.core.loading import SeededBatches, make_loader
from benchmark.core.optim import count_parameters
from benchmark.core.progress import progress_bar
from benchmark.core.stats import Evidence, fingerprint
from methods.base import Method
from tasks.base import Applies, Choice, Flag, Number, Numbers, Task, TaskContext
from tasks.core import PRECISIONS, autocast, loss_summary, train
from tasks.recipe import check_blocks
from tasks.segmentation import mmseg_backend
from tasks.segmentation.data import ADE_DIR, ADE20k, Pipeline, TrainCrops, eval_image, slide_inference, stack_pairs
from tasks.segmentation.metrics import IGNORE_INDEX, ConfusionIoU, confusion
from tasks.segmentation.model import HEADS, MODES, Segmenter, uses_predictor

BACKENDS = ("auto", "native", "mmseg")


def lr_factor(step: int, c: dict) -> float:
    """The lr multiplier at iteration `step`: mmengine's LinearLR (warmup_ratio -> 1 over
    warmup_iters) then PolyLR (-> min_lr_ratio at the last iteration), in closed form.

    mmengine counts end - begin - 1 steps in each: the warmup reaches 1 at its last iteration
    and the decay reaches its floor at the last training iteration."""
    warmup, total = c["warmup_iters"], c["iters"]
    if step < warmup:
        return c["warmup_ratio"] + (1 - c["warmup_ratio"]) * step / max(1, warmup - 1)
    progress = (step - warmup) / max(1, total - warmup - 1)
    return c["min_lr_ratio"] + (1 - c["min_lr_ratio"]) * (1 - progress) ** c["poly_power"]


def seg_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """mmseg's CrossEntropyLoss (avg_non_ignore=False): summed over labelled pixels, divided by
    all pixels, so a batch with more ignored pixels weighs less."""
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none").mean()


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
    headline = "miou"
    settings = {
        "mode": Choice(MODES),
        "head": Choice(HEADS),
        "backend": Choice(BACKENDS),
        **{
            key: Number(1, integer=True)
            for key in (
                "iters",
                "batch_size",
                "crop_size",
                "num_classes",
                "channels",
                "aux_channels",
                "eval_batch_size",
            )
        },
        # null: two thirds of crop_size, rounded (mmseg's 341 for 512).
        "stride": Number(1, integer=True, nullable=True),
        "lr": Number(0, low_open=True),
        "weight_decay": Number(0),
        "betas": Numbers(Number(0, 1, high_open=True)),
        "layer_decay": Number(0, 1, low_open=True),
        "warmup_iters": Number(0, integer=True),
        "warmup_ratio": Number(0, 1),
        "poly_power": Number(0),
        "min_lr_ratio": Number(0, 1),
        "random_predictor": Flag(),
        "random_predictor_lr_scale": Number(0, low_open=True),
        "drop_path": Number(0, 1, high_open=True, nullable=True),
        "layer_scale": Number(0, low_open=True, nullable=True),
        "rel_pos_bias": Flag(),
        "train_pos_embed": Flag(),
        "head_init": Choice(("torch", "mmseg")),
        "precision": Choice(PRECISIONS),
        "eval_precision": Choice(PRECISIONS),
        "reduce_zero_label": Flag(),
        "scale": Numbers(Number(1, integer=True)),
        "ratio_range": Numbers(Number(0, low_open=True)),
        "cat_max_ratio": Number(0, 1, low_open=True),
        "flip": Number(0, 1),
        "photometric": Flag(),
        "pool_scales": Numbers(Number(1, integer=True)),
        "aux_weight": Number(0),
        "dropout": Number(0, 1, high_open=True),
        "vis_images": Number(0, integer=True),
    }

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        c = self.cfg
        for key in ("scale", "ratio_range"):
            if len(c[key]) != 2:
                raise ConfigError(f"tasks.ade20k.{key} must be two numbers, got {c[key]!r}")
        if c["ratio_range"][0] > c["ratio_range"][1]:
            raise ConfigError(
                f"tasks.ade20k.ratio_range must be [low, high] with low <= high, got {c['ratio_range']!r}"
            )
        if c["stride"] is None:
            c["stride"] = round(c["crop_size"] * 2 / 3)
        if c["stride"] > c["crop_size"]:
            raise ConfigError(
                f"tasks.ade20k.stride={c['stride']} is larger than crop_size={c['crop_size']}: "
                "windows would skip pixels"
            )
        if c["backend"] == "mmseg":
            reason = mmseg_backend.missing_reason()
            if reason:
                raise ConfigError(f"tasks.ade20k.backend=mmseg but {reason}")
        if c["root"] is not None and not Path(str(c["root"])).expanduser().is_dir():
            raise DataError(f"tasks.ade20k.root not found: {c['root']}")
        self._checked = False

    @property
    def backend(self) -> str:
        if self.cfg["backend"] == "auto":
            return "native" if mmseg_backend.missing_reason() else "mmseg"
        return self.cfg["backend"]

    def applies_to(self, method: Method) -> Applies:
        return Applies.needs(method, predictor=uses_predictor(self.cfg["mode"]))

    def check(self, method: Method) -> None:
        c = self.cfg
        # The predictor's position table is fixed to the pretraining grid.
        if uses_predictor(c["mode"]) and c["crop_size"] != method.image_size:
            raise ConfigError(
                f"tasks.ade20k.mode={c['mode']} runs the predictor on whole crops: crop_size "
                f"({c['crop_size']}) must equal the pretraining resolution ({method.image_size})"
            )
        if c["crop_size"] % method.patch_size:
            raise ConfigError(
                f"tasks.ade20k.crop_size={c['crop_size']} is not a multiple of the patch size {method.patch_size}"
            )
        blocks = c.get("feature_blocks")
        if blocks is not None and (len(blocks) != 4 or not all(1 <= b <= method.depth for b in blocks)):
            raise ConfigError(
                f"tasks.ade20k.feature_blocks must be 4 block numbers in 1..{method.depth}, got {list(blocks)}"
            )
        if c["mode"] not in ("encoder", "end_to_end"):
            return
        encoder = method.encoder  # the eval encoder, if another, has its architecture
        check_blocks(self.name, c, encoder, f"method {method.name}'s encoder")
        for key in ("train_pos_embed", "rel_pos_bias"):
            if c[key] and not isinstance(getattr(encoder, "pos_embed", None), nn.Parameter):
                raise ConfigError(f"tasks.ade20k.{key}=true: method {method.name}'s encoder has no pos_embed")
        if (c["layer_scale"] is not None or c["rel_pos_bias"]) and not any(
            isinstance(m, Block) for m in encoder.modules()
        ):
            raise ConfigError(
                f"tasks.ade20k.layer_scale / rel_pos_bias: method {method.name}'s encoder has no timm transformer "
                "blocks to change"
            )

    def check_data(self, source, sizes: dict[str, int]) -> None:
        """Every annotation, before compute, when the folder is there already (the built-in data is
        generated at the start of the run and checked then)."""
        root = self._root(source)
        if (root / ADE_DIR).is_dir() or self.cfg["root"] is not None:
            self._open(root, getattr(source, "generated", False) and self.cfg["root"] is None)

    def _root(self, source) -> Path:
        return Path(str(self.cfg["root"])).expanduser() if self.cfg["root"] is not None else Path(source.root)

    def _open(self, root: Path, generated: bool) -> tuple[ADE20k, ADE20k]:
        """Both splits, every label checked (once per task): a bad label fails now, not after 160k
        iterations."""
        c = self.cfg
        splits = ADE20k(root, "train", c["reduce_zero_label"]), ADE20k(root, "val", c["reduce_zero_label"])
        if not self._checked:
            try:
                for split in splits:
                    split.check_labels(c["num_classes"])
            except DataError as exc:
                if generated:
                    raise DataError(
                        f"{exc}: the built-in data cache is damaged: delete {root} and run again to regenerate it"
                    ) from None
                raise
            self._checked = True
        return splits

    def run(self, method, ctx: TaskContext) -> dict:
        c = self.cfg
        root = self._root(ctx.source)
        train_set, val = self._open(root, ctx.source.generated and c["root"] is None)
        if c["batch_size"] > len(train_set):
            raise DataError(
                f"tasks.ade20k.batch_size={c['batch_size']} exceeds the {len(train_set)} training images in {root}"
            )
        backend = self.backend
        torch.manual_seed(ctx.seed)
        model = Segmenter(method, ctx.encoder_key, c["mode"], c["head"], c["num_classes"], c, backend, ctx.seed).to(
            ctx.device
        )
        started = time.perf_counter()
        losses = self._train(model, train_set, ctx)
        train_seconds = time.perf_counter() - started
        metrics = self._evaluate(model, val, ctx, backend)
        metrics.update(
            backend=backend,
            mode=c["mode"],
            head=c["head"],
            num_classes=c["num_classes"],
            iters=c["iters"],
            train_images=len(train_set),
            val_images=len(val),
            data_root=str(root),
            **loss_summary(losses, len(losses) // 10),
            train_seconds=train_seconds,
            trainable_parameters=count_parameters(self._groups(model)),
        )
        return metrics

    def _groups(self, model: Segmenter) -> list[dict]:
        c = self.cfg
        return model.param_groups(
            c["weight_decay"], c["layer_decay"], c["random_predictor_lr_scale"] if c["random_predictor"] else 1.0
        )

    def _train(self, model: Segmenter, train_set: ADE20k, ctx: TaskContext) -> list[float]:
        c = self.cfg
        pipeline = Pipeline(
            scale=tuple(c["scale"]),
            crop=c["crop_size"],
            ratio_range=tuple(c["ratio_range"]),
            cat_max_ratio=c["cat_max_ratio"],
            flip=c["flip"],
            photometric=c["photometric"],
        )
        crops = TrainCrops(train_set, pipeline)
        per_epoch = len(train_set) // c["batch_size"]

        def batches():
            for epoch in range(math.ceil(c["iters"] / per_epoch)):
                loader = make_loader(
                    crops, SeededBatches(len(train_set), c["batch_size"], ctx.seed, epoch), stack_pairs, ctx.workers
                )
                for images, labels in loader:
                    bad = (labels != IGNORE_INDEX) & (labels >= c["num_classes"])
                    if bad.any():
                        raise DataError(
                            f"label {int(labels[bad].max())} in {train_set.samples[0][1].parent} is "
                            f"outside tasks.ade20k.num_classes={c['num_classes']} (after reduce_zero_label)"
                        )
                    yield images.to(ctx.device), labels.to(ctx.device)

        def loss(batch):
            images, labels = batch
            logits, aux = model(images)
            value = seg_loss(logits, labels)
            if aux is not None:
                value = value + c["aux_weight"] * seg_loss(aux, labels)
            return value

        def lr_at(it: int) -> float:
            return c["lr"] * lr_factor(it, c)

        model.train()
        return train(
            self._groups(model),
            batches(),
            c["iters"],
            lr_at,
            loss,
            betas=c["betas"],
            clip_grad=0.0,
            device=ctx.device,
            precision=c["precision"],
            label="ade20k train",
            show_progress=ctx.show_progress,
        )

    @torch.no_grad()
    def predict(self, model: Segmenter, image: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """Class map [B, H, W] at out_size for rescaled images [B, 3, H', W'] (sliding window)."""
        c = self.cfg

        def logits_fn(window: torch.Tensor) -> torch.Tensor:
            with autocast(image.device, c["eval_precision"]):
                return model(window)[0]

        logits = slide_inference(logits_fn, image, c["num_classes"], c["crop_size"], c["stride"])
        logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
        return logits.argmax(1)

    def _evaluate(self, model: Segmenter, val: ADE20k, ctx: TaskContext, backend: str) -> dict:
        c = self.cfg
        model.eval()
        meter = mmseg_backend.MMSegIoU(c["num_classes"]) if backend == "mmseg" else ConfusionIoU(c["num_classes"])
        shown = []
        intersections, unions = [], []
        batch: list[tuple[int, torch.Tensor, torch.Tensor]] = []

        def flush() -> None:
            images = torch.stack([b[1] for b in batch]).to(ctx.device)
            labels = torch.stack([b[2] for b in batch])
            preds = self.predict(model, images, tuple(labels.shape[-2:])).cpu()
            meter.add(preds, labels)
            for pred, label in zip(preds, labels):  # per image, for intervals and paired comparisons
                conf = confusion(pred, label, c["num_classes"])
                intersections.append(conf.diag().numpy())
                unions.append((conf.sum(0) + conf.sum(1) - conf.diag()).numpy())
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
        examples = fingerprint([p.name for p, _ in val.samples], c["num_classes"], c["reduce_zero_label"])
        metrics["evidence"] = Evidence(
            "iou_counts", {"intersection": np.stack(intersections), "union": np.stack(unions)}, examples
        )
        if shown:
            metrics["visualisation"] = str(self._visualise(val, shown, ctx.run_dir))
        return metrics

    def _visualise(self, val: ADE20k, shown: list, run_dir: Path) -> Path:
        """A PNG: titled columns (image | ground truth | prediction), one row per image, and a legend
        of the colour of every class shown (ignored pixels black)."""
        c = self.cfg
        rows, present = [], set()
        for i, label, pred in shown:
            image = np.asarray(val[i][0])
            tiles = [image, colourise(label.numpy(), c["num_classes"]), colourise(pred.numpy(), c["num_classes"])]
            rows.append((np.concatenate(tiles, axis=1), image.shape[1]))
            present |= {int(v) for v in np.unique(np.concatenate([label.numpy().ravel(), pred.numpy().ravel()]))}
        width = max(r.shape[1] for r, _ in rows)
        grid = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r, _ in rows], axis=0)
        # Small images are enlarged (nearest) so the label maps stay readable.
        factor = max(1, 256 // min(r.shape[0] for r, _ in rows))
        body = Image.fromarray(grid).resize((grid.shape[1] * factor, grid.shape[0] * factor), Image.NEAREST)
        classes = sorted(v for v in present if 0 <= v < c["num_classes"])
        per_line = max(1, body.width // 90)
        header, swatch = 18, 14
        legend = 8 + (len(classes) + per_line - 1) // per_line * (swatch + 6) + (swatch + 6)
        picture = Image.new("RGB", (body.width, header + body.height + legend), (255, 255, 255))
        picture.paste(body, (0, header))
        draw = ImageDraw.Draw(picture)
        tile = rows[0][1] * factor
        for k, title in enumerate(("image", "ground truth", "prediction")):
            draw.text((k * tile + 4, 3), title, fill=(0, 0, 0))
        palette = colourise(np.arange(c["num_classes"]), c["num_classes"])
        top = header + body.height + 6
        draw.text((4, top), "classes (after reduce_zero_label; black: ignored):", fill=(0, 0, 0))
        names = val.class_names(c["num_classes"])
        for k, cls in enumerate(classes):
            x, y = 4 + (k % per_line) * 90, top + (swatch + 6) * (1 + k // per_line)
            draw.rectangle([x, y, x + swatch, y + swatch], fill=tuple(int(v) for v in palette[cls]), outline=(0, 0, 0))
            draw.text((x + swatch + 4, y + 1), names[cls][:12], fill=(0, 0, 0))
        path = run_dir / f"ade20k_{c['mode']}_{c['head']}.png"
        picture.save(path)
        return path
