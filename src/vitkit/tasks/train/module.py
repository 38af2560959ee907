"""LightningModule for EoMT semantic segmentation (PeakNet: 2 classes, background / peak)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from vitkit.tasks.annealing import MaskAnnealing
from vitkit.tasks.loss import MaskClassificationLoss
from vitkit.tasks.metrics import SemanticMetrics
from vitkit.tasks.postprocess import semantic_probs
from vitkit.tasks.train.schedule import layerwise_param_groups, warmup_decay_lambda


def semantic_targets(labels: torch.Tensor, num_classes: int, valid: torch.Tensor | None = None
                     ) -> list[dict[str, torch.Tensor]]:
    """Label maps [B, H, W] -> per image one binary mask per class present (official EoMT semantic);
    ``valid`` [B, H, W] (True = pixel counts) is passed on to the loss and restricts "present" to valid pixels."""
    targets = []
    for b, lab in enumerate(labels):
        ok = None if valid is None else valid[b]
        present = [c for c in range(num_classes) if ((lab == c) if ok is None else (lab == c) & ok).any()]
        masks = torch.stack([lab == c for c in present]) if present else torch.zeros((0, *lab.shape), dtype=torch.bool)
        t = {"masks": masks, "labels": torch.tensor(present, dtype=torch.long, device=lab.device)}
        if ok is not None:
            t["valid"] = ok
        targets.append(t)
    return targets


class SegmentationModule(L.LightningModule):
    """Trains an EoMT on label maps.

    The module owns the criterion, the metrics, the optimiser and the mask annealing (tied to
    ``global_step``); the network stays a plain ``nn.Module``. Batches are dicts with ``image``
    [B, C, H, W] (normalised) and ``label`` [B, H, W] (class ids).

    Args:
        model: an :class:`vitkit.EoMT`.
        num_classes: classes of the label maps (PeakNet: 2).
        lr, weight_decay, llrd: AdamW settings with layer-wise LR decay on the backbone.
        warmup_steps, schedule ("poly" | "cosine" | "constant"), poly_power, min_lr_factor: LR schedule.
        anneal_start, anneal_end: global steps over which the masked blocks are annealed to 0
            (sequentially, poly 0.9); ``anneal_end=None`` uses 80 % of the training steps.
        loss: keyword arguments of :class:`MaskClassificationLoss`.
    """

    def __init__(self, model: torch.nn.Module, num_classes: int = 2, lr: float = 1e-3, weight_decay: float = 0.05,
                 llrd: float = 1.0, warmup_steps: int = 0, schedule: str = "poly", poly_power: float = 0.9,
                 min_lr_factor: float = 0.0, anneal_start: int = 0, anneal_end: int | None = None,
                 anneal_power: float = 0.9, loss: dict[str, Any] | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.num_classes = num_classes
        self.criterion = MaskClassificationLoss(num_classes, **(loss or {}))
        self.annealing: MaskAnnealing | None = None
        self.val_metrics = SemanticMetrics(num_classes)

    def forward(self, x: torch.Tensor):
        return self.model(x)

    def configure_model(self) -> None:
        """Shard the model when training with :class:`~vitkit.tasks.train.distributed.FSDP2Strategy`."""
        from vitkit.tasks.train.distributed import FSDP2Strategy

        if isinstance(self.trainer.strategy, FSDP2Strategy):
            self.trainer.strategy.shard(self.model)

    def _annealing(self) -> MaskAnnealing:
        if self.annealing is None:
            end = self.hparams.anneal_end
            if end is None:
                end = max(self.hparams.anneal_start + self.model.num_blocks,
                          int(0.8 * self.trainer.estimated_stepping_batches))
            self.annealing = MaskAnnealing.sequential(self.model.num_blocks, self.hparams.anneal_start, end,
                                                      self.hparams.anneal_power)
        return self.annealing

    def on_train_batch_start(self, batch, batch_idx) -> None:
        probs = self._annealing().apply(self.model, self.global_step)
        for i, p in enumerate(probs):
            self.log(f"anneal/p{i}", p, on_step=True, on_epoch=False)

    def training_step(self, batch, batch_idx):
        masks, classes = self.model(batch["image"])
        targets = semantic_targets(batch["label"], self.num_classes, batch.get("valid"))
        total, terms = self.criterion(masks, classes, targets)
        self.log("train/loss", total, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(targets))
        for k, v in terms.items():
            if "_block_" not in k:
                self.log(f"train/{k}", v, on_step=False, on_epoch=True, batch_size=len(targets))
        return total

    def on_validation_epoch_start(self) -> None:
        self.val_metrics = SemanticMetrics(self.num_classes)

    def validation_step(self, batch, batch_idx):
        # validate the inference model: masked attention off, only the final prediction
        enabled = self.model.masked_attn_enabled
        self.model.masked_attn_enabled = False
        try:
            masks, classes = self.model(batch["image"])
        finally:
            self.model.masked_attn_enabled = enabled
        probs = semantic_probs(masks[-1], classes[-1])
        probs = torch.nn.functional.interpolate(probs, size=batch["label"].shape[-2:], mode="bilinear",
                                                align_corners=False)
        pred, label = probs.argmax(1), batch["label"]
        if batch.get("valid") is not None:  # bad pixels are not scored
            pred, label = pred[batch["valid"]], label[batch["valid"]]
        self.val_metrics.update(pred, label)

    def on_validation_epoch_end(self) -> None:
        cm = self.val_metrics.confusion.to(self.device)
        if self.trainer.world_size > 1:
            cm = self.all_gather(cm).sum(0)
        self.val_metrics.confusion = cm.cpu()
        res = self.val_metrics.compute()
        iou = res["iou"][-1]
        self.log("val/pixel_iou", float(iou) if iou == iou else 0.0, prog_bar=True, sync_dist=False)
        self.log("val/miou", res["miou"], sync_dist=False)

    def configure_optimizers(self):
        hp = self.hparams
        groups = layerwise_param_groups(self.model, hp.lr, hp.weight_decay, hp.llrd)
        opt = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        total = self.trainer.estimated_stepping_batches
        fn = warmup_decay_lambda(int(total), hp.warmup_steps, hp.schedule, hp.poly_power, hp.min_lr_factor)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, fn)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
