"""mIoU, per-class IoU and pixel accuracy from a confusion matrix, as mmseg's IoUMetric defines them.

Pixels whose label is the ignore index count nowhere. A class with no pixel in the labels and
none in the predictions has an undefined IoU (NaN) and is left out of the mean; a class that is
predicted but absent from the labels has IoU 0 and pulls the mean down.
"""

from __future__ import annotations

import math

import torch

IGNORE_INDEX = 255


def confusion(
    pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """[num_classes, num_classes] pixel counts, rows = true class, columns = predicted class."""
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from label shape {tuple(label.shape)}")
    keep = label != ignore_index
    label, pred = label[keep].long(), pred[keep].long()
    bad = (label < 0) | (label >= num_classes)
    if bad.any():
        raise ValueError(f"label value {int(label[bad][0])} outside 0..{num_classes - 1} (ignore index {ignore_index})")
    return torch.bincount(label * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def scores(conf: torch.Tensor) -> dict:
    """miou, macc and pixel accuracy in percent, and per-class IoU (None where undefined)."""
    conf = conf.double()
    intersect = conf.diag()
    labelled = conf.sum(1)
    union = labelled + conf.sum(0) - intersect
    iou = intersect / union  # 0/0 -> NaN: class neither present nor predicted
    acc = intersect / labelled
    per_class = [None if math.isnan(v) else 100 * v for v in iou.tolist()]
    return {
        "miou": 100 * torch.nanmean(iou).item(),
        "macc": 100 * torch.nanmean(acc).item(),
        "pixel_acc": 100 * (intersect.sum() / labelled.sum()).item(),
        "per_class_iou": per_class,
    }


class ConfusionIoU:
    """Accumulates predictions and labels over an evaluation; `scores()` at the end."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.total = torch.zeros(num_classes, num_classes, dtype=torch.long)

    def add(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        self.total += confusion(pred.cpu(), label.cpu(), self.num_classes, self.ignore_index)

    def scores(self) -> dict:
        return scores(self.total)
