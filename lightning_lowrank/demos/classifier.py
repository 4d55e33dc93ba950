"""``TextClassifier``: a LightningModule around any Hugging Face sequence classifier."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from typing_extensions import override


class TextClassifier(pl.LightningModule):
    """Train a sequence classifier with AdamW; batches are dicts from the demo data modules.

    Logs ``train_loss`` every step, ``val_loss`` and ``val_acc`` per validation run and
    ``test_loss`` and ``test_acc`` per test run.

    Args:
        model: a model called as ``model(input_ids=..., attention_mask=...)`` returning an object
            with ``.logits`` (a transformers ``*ForSequenceClassification``) or the logits.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay of matrices (biases and norms are not decayed).
        betas: AdamW betas.
        warmup_steps: linear learning-rate warm-up over this many optimizer steps (0: none).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 5e-4,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
    ) -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.weight_decay = weight_decay
        self.betas = betas
        self.warmup_steps = warmup_steps

    @override
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.logits if hasattr(out, "logits") else out

    def _step(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        logits = self(batch["input_ids"], batch.get("attention_mask"))
        loss = F.cross_entropy(logits, batch["labels"])
        correct = (logits.argmax(-1) == batch["labels"]).float().mean()
        return loss, correct

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, _ = self._step(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss, acc = self._step(batch)
        n = len(batch["labels"])
        self.log("val_loss", loss, prog_bar=True, batch_size=n)
        self.log("val_acc", acc, prog_bar=True, batch_size=n)

    @override
    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss, acc = self._step(batch)
        n = len(batch["labels"])
        self.log("test_loss", loss, batch_size=n)
        self.log("test_acc", acc, batch_size=n)

    @override
    def configure_optimizers(self) -> Any:
        # built from the parameters that train at this point: LowRankCallback has already
        # injected the adapters and frozen the base in its setup hook
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for _, p in params if p.ndim >= 2], "weight_decay": self.weight_decay},
            {"params": [p for _, p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas)
        if self.warmup_steps <= 0:
            return optimizer
        warmup = self.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    @torch.no_grad()
    def evaluate(self, dataloader: DataLoader) -> float:
        """Accuracy on ``dataloader`` without a Trainer (usable before training)."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        correct = total = 0
        try:
            for batch in dataloader:
                logits = self(batch["input_ids"].to(device), batch["attention_mask"].to(device))
                correct += int((logits.argmax(-1) == batch["labels"].to(device)).sum())
                total += len(batch["labels"])
        finally:
            self.train(was_training)
        return correct / max(total, 1)
