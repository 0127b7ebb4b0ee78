"""Semantic-segmentation metrics (ADE20K, mmseg's definitions): a confusion matrix accumulated over a split,
then mIoU (mean over the classes whose IoU is defined), pixel accuracy and per-class IoU, in percent."""
from __future__ import annotations

import torch

from bench.errors import BenchError

IGNORE_INDEX = 255        # label value of unlabelled pixels: excluded from the metrics (mmseg's ignore_index)


def confusion_matrix(pred: torch.Tensor, gt: torch.Tensor, n_cls: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(n_cls, n_cls) int64 counts, rows = ground truth, columns = prediction; ignore pixels excluded."""
    gt = gt.reshape(-1).long()
    pred = pred.reshape(-1).long()
    valid = gt != ignore_index
    if bool((gt[valid] >= n_cls).any()) or bool((gt[valid] < 0).any()):
        bad = int(gt[valid][(gt[valid] >= n_cls) | (gt[valid] < 0)][0])
        raise BenchError(f"label {bad} outside 0..{n_cls - 1} (and not the ignore index {ignore_index}): the "
                         f"annotations have more classes than the model's {n_cls}")
    idx = gt[valid] * n_cls + pred[valid].clamp(0, n_cls - 1)
    return torch.bincount(idx, minlength=n_cls * n_cls).reshape(n_cls, n_cls).cpu()


def segmentation_metrics(cm: torch.Tensor) -> dict:
    """mIoU (mean over classes whose IoU is defined, i.e. present in the ground truth or predicted),
    pixel accuracy, per-class IoU; percent."""
    cm = cm.double()
    inter = cm.diag()
    union = cm.sum(0) + cm.sum(1) - inter
    iou = inter / union                      # nan where union == 0
    defined = union > 0
    total = cm.sum()
    return {"miou": float(100 * iou[defined].mean()) if bool(defined.any()) else float("nan"),
            "pixel_acc": float(100 * inter.sum() / total) if total > 0 else float("nan"),
            "per_class_iou": [float(100 * v) if d else None for v, d in zip(iou.tolist(), defined.tolist())]}
