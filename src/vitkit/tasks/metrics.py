"""Segmentation metrics: confusion-matrix IoU / mIoU and panoptic quality."""

from __future__ import annotations

import torch


class SemanticMetrics:
    """Accumulate a confusion matrix; report per-class IoU, mIoU, Dice and pixel accuracy."""

    def __init__(self, num_classes: int, ignore_index: int | None = None):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """``pred`` and ``target``: integer class maps of the same shape."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        p, t = pred.flatten().long().cpu(), target.flatten().long().cpu()
        valid = (t >= 0) & (t < self.num_classes)
        if self.ignore_index is not None:
            valid &= t != self.ignore_index
        idx = t[valid] * self.num_classes + p[valid].clamp(0, self.num_classes - 1)
        self.confusion += torch.bincount(idx, minlength=self.num_classes ** 2).view(self.num_classes, -1)

    def compute(self) -> dict[str, float | list[float]]:
        cm = self.confusion.double()
        tp = cm.diag()
        fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
        denom = tp + fp + fn
        iou = torch.where(denom > 0, tp / denom.clamp(min=1), torch.full_like(tp, float("nan")))
        dice = torch.where(denom > 0, 2 * tp / (2 * tp + fp + fn).clamp(min=1), torch.full_like(tp, float("nan")))
        present = ~iou.isnan()
        return {"iou": iou.tolist(), "miou": float(iou[present].mean()) if present.any() else float("nan"),
                "dice": dice.tolist(), "accuracy": float(tp.sum() / cm.sum().clamp(min=1))}


def panoptic_quality(pred_seg: torch.Tensor, pred_cls: torch.Tensor, gt_seg: torch.Tensor, gt_cls: torch.Tensor,
                     num_classes: int) -> dict[str, float]:
    """PQ of one image (segments matched at IoU > 0.5, void = -1), averaged over classes present."""
    tp = torch.zeros(num_classes)
    fp = torch.zeros(num_classes)
    fn = torch.zeros(num_classes)
    iou_sum = torch.zeros(num_classes)
    pred_ids = [int(i) for i in pred_seg.unique() if i >= 0]
    gt_ids = [int(i) for i in gt_seg.unique() if i >= 0]
    matched_pred = set()
    for g in gt_ids:
        gmask = gt_seg == g
        c = int(gt_cls[gmask][0])
        hit = False
        for p in pred_ids:
            pmask = pred_seg == p
            if int(pred_cls[pmask][0]) != c or p in matched_pred:
                continue
            inter = (gmask & pmask).sum().item()
            union = (gmask | pmask).sum().item()
            if union and inter / union > 0.5:
                tp[c] += 1
                iou_sum[c] += inter / union
                matched_pred.add(p)
                hit = True
                break
        if not hit:
            fn[c] += 1
    for p in pred_ids:
        if p not in matched_pred:
            fp[int(pred_cls[pred_seg == p][0])] += 1
    denom = tp + 0.5 * fp + 0.5 * fn
    valid = denom > 0
    pq = torch.where(valid, iou_sum / denom.clamp(min=1e-9), torch.zeros_like(denom))
    return {"pq": float(pq[valid].mean()) if valid.any() else float("nan"),
            "tp": float(tp.sum()), "fp": float(fp.sum()), "fn": float(fn.sum())}
