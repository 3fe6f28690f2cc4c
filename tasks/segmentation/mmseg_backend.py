"""The `mmseg` backend: mmsegmentation 1.2.2's UPerHead, FCNHead and IoUMetric on our backbone.

mmseg is optional (scripts/install_mmseg.sh builds its mmcv dependency); everything here imports
it lazily, so the rest of the harness never needs it. The heads are built directly as modules and
fed our feature maps; checkpoints are never loaded through mmengine (its torch.load defaults
break on torch >= 2.6), weights stay in our own state dicts.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn as nn

from tasks.segmentation.metrics import IGNORE_INDEX


def missing_reason() -> str | None:
    """Why the mmseg backend cannot run here, or None when it can."""
    for module in ("mmcv", "mmengine", "mmseg"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (scripts/install_mmseg.sh installs the mmseg backend)"
    try:
        import mmcv.ops  # noqa: F401  mmseg imports the compiled ops unconditionally
        import mmseg.models  # noqa: F401
    except Exception as exc:  # a broken mmcv build shows up as any of several import errors
        return f"mmseg does not import: {type(exc).__name__}: {exc}"
    return None


# The heads build this loss; our training loop computes its own (same) cross-entropy.
LOSS = dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0, avg_non_ignore=True)


def _norm_cfg() -> dict:
    # BN, not the configs' SyncBN: one process here; SyncBN equals BN on one device anyway.
    return dict(type="BN", requires_grad=True)


def uper_head(
    in_dims: list[int], channels: int, num_classes: int, pool_scales: tuple[int, ...], dropout: float
) -> nn.Module:
    from mmseg.models.decode_heads import UPerHead

    head = UPerHead(
        in_channels=list(in_dims),
        in_index=list(range(len(in_dims))),
        pool_scales=tuple(pool_scales),
        channels=channels,
        dropout_ratio=dropout,
        num_classes=num_classes,
        norm_cfg=_norm_cfg(),
        align_corners=False,
        ignore_index=IGNORE_INDEX,
        loss_decode=LOSS,
    )
    return _Levels(_init_classifier(head))


def fcn_head(in_dim: int, channels: int, num_classes: int, dropout: float) -> nn.Module:
    from mmseg.models.decode_heads import FCNHead

    head = FCNHead(
        in_channels=in_dim,
        in_index=0,
        channels=channels,
        num_convs=1,
        concat_input=False,
        dropout_ratio=dropout,
        num_classes=num_classes,
        norm_cfg=_norm_cfg(),
        align_corners=False,
        ignore_index=IGNORE_INDEX,
        loss_decode=LOSS,
    )
    return _Single(_init_classifier(head))


def _init_classifier(head: nn.Module) -> nn.Module:
    # What the heads' init_cfg (Normal std 0.01 on conv_seg) does; ConvModules initialise
    # themselves. Done here because mmengine's init_weights logs every parameter it visits.
    nn.init.normal_(head.conv_seg.weight, std=0.01)
    nn.init.zeros_(head.conv_seg.bias)
    return head


class _Levels(nn.Module):
    """An mmseg decode head taking the list of levels, as our heads do."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        return self.head(levels)


class _Single(_Levels):
    """An mmseg decode head on one feature map (mmseg heads index into a list)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head([x])


class MMSegIoU:
    """mmseg's IoUMetric fed prediction/label pairs; scores in our metrics' format."""

    def __init__(self, num_classes: int):
        from mmseg.evaluation import IoUMetric

        self.metric = IoUMetric(ignore_index=IGNORE_INDEX, iou_metrics=["mIoU"])
        self.metric.dataset_meta = {"classes": [str(i) for i in range(num_classes)]}

    def add(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """pred, label [B, H, W]."""
        samples = [
            {"pred_sem_seg": {"data": p[None]}, "gt_sem_seg": {"data": lab[None]}} for p, lab in zip(pred, label)
        ]
        self.metric.process({}, samples)

    def scores(self) -> dict:
        import numpy as np

        totals = [sum(r[i] for r in self.metric.results) for i in range(4)]
        m = self.metric.total_area_to_metrics(*totals, ["mIoU"], None, 1)
        iou, acc = np.asarray(m["IoU"], dtype=np.float64), np.asarray(m["Acc"], dtype=np.float64)
        return {
            "miou": 100 * float(np.nanmean(iou)),
            "macc": 100 * float(np.nanmean(acc)),
            "pixel_acc": 100 * float(m["aAcc"]),
            "per_class_iou": [None if np.isnan(v) else 100 * float(v) for v in iou],
        }
