"""LightningModule for image classification with the zoo's :class:`~vitkit.models.classifier.ZooModel` (beside
:class:`~vitkit.tasks.train.SegmentationModule`)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from vitkit.errors import ConfigError

__all__ = ["ZooClassifier"]


class ZooClassifier(L.LightningModule):
    """Image classification with a :class:`ZooModel`: cross-entropy, accuracy, AdamW on the trainable
    parameters (only the head when the backbone is frozen).

    >>> clf = ZooClassifier(vitkit.build_model("dinov2_reg_vit", head=10, freeze_backbone=True), lr=1e-3)
    >>> lightning.Trainer(max_epochs=5).fit(clf, train_loader, val_loader)
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.0,
                 label_smoothing: float = 0.0):
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values)

    def on_fit_start(self) -> None:
        # build_model returns eval mode and Lightning >= 2.2 keeps modules in the mode it finds them in;
        # fit in train mode (a frozen backbone stays in eval mode: VisionTransformer.freeze)
        self.model.train()

    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        acc = (logits.argmax(dim=-1) == y).float().mean()
        self.log(f"{stage}_loss", loss, prog_bar=True, batch_size=x.shape[0])
        self.log(f"{stage}_acc", acc, batch_size=x.shape[0])
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.model(x)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("ZooClassifier has no trainable parameters (frozen backbone and no head?)")
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
