"""``TextClassifier``: a LightningModule around any Hugging Face sequence classifier."""

from __future__ import annotations

from typing import Any, cast

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from typing_extensions import override

#: the evaluation stages; each has its own metric objects, so their states never mix
_STAGES = ("val", "test")


def _num_classes(model: nn.Module, num_classes: int | None) -> int:
    if num_classes is None:
        num_classes = getattr(getattr(model, "config", None), "num_labels", None)
        if num_classes is None:
            raise ValueError(
                "the model has no config.num_labels: pass num_classes=... to TextClassifier"
            )
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    return int(num_classes)


class TextClassifier(pl.LightningModule):
    """Train a sequence classifier with AdamW; batches are dicts from the demo data modules.

    Logs ``train_loss`` every step; ``val_loss``, ``val_acc`` and ``val_f1`` per validation run;
    ``test_loss``, ``test_acc`` and ``test_f1`` per test run. The metrics are torchmetrics objects
    logged through ``self.log``, so Lightning accumulates them over the whole run (and across
    processes under DDP) instead of averaging per-batch values. With ``N`` examples of true
    labels ``y`` and predictions ``p`` over ``C`` classes,

        acc = (1 / N) * sum_n [p_n == y_n]
        f1  = (1 / C) * sum_c 2 TP_c / (2 TP_c + FP_c + FN_c)    (macro-F1)

    where, as in torchmetrics, a class absent from both ``y`` and ``p`` is left out of the
    average.

    Args:
        model: a model called as ``model(input_ids=..., attention_mask=...)`` returning an object
            with ``.logits`` (a transformers ``*ForSequenceClassification``) or the logits.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay of matrices (biases and norms are not decayed).
        betas: AdamW betas.
        warmup_steps: linear learning-rate warm-up over this many optimizer steps (0: none).
        num_classes: number of classes; by default ``model.config.num_labels``.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 5e-4,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = _num_classes(model, num_classes)
        self.model = model
        self.lr = lr
        self.weight_decay = weight_decay
        self.betas = betas
        self.warmup_steps = warmup_steps
        self.eval_metrics = nn.ModuleDict(
            {stage: self._new_metrics() for stage in _STAGES}  # e.g. eval_metrics["val"]["acc"]
        )

    def _new_metrics(self) -> nn.ModuleDict:
        # average="micro" is plain accuracy (MulticlassAccuracy's default is the macro average)
        return nn.ModuleDict(
            {
                "acc": MulticlassAccuracy(self.num_classes, average="micro"),
                "f1": MulticlassF1Score(self.num_classes, average="macro"),
            }
        )

    def _metrics(self, stage: str) -> dict[str, Metric]:
        return {
            k: cast(Metric, m) for k, m in cast(nn.ModuleDict, self.eval_metrics[stage]).items()
        }

    @override
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.logits if hasattr(out, "logits") else out

    def _eval_step(self, stage: str, batch: dict[str, Tensor]) -> None:
        logits = self(batch["input_ids"], batch.get("attention_mask"))
        labels = batch["labels"]
        n = len(labels)
        self.log(f"{stage}_loss", F.cross_entropy(logits, labels), prog_bar=True, batch_size=n)
        for name, metric in self._metrics(stage).items():
            metric.update(logits, labels)
            # logging the Metric object (not a value): Lightning calls compute() and reset()
            # at the end of the epoch
            self.log(f"{stage}_{name}", metric, prog_bar=name == "acc", batch_size=n)

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch["input_ids"], batch.get("attention_mask"))
        loss = F.cross_entropy(logits, batch["labels"])
        self.log("train_loss", loss, prog_bar=True)
        return loss

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch)

    @override
    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step("test", batch)

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
    def evaluate_metrics(self, dataloader: DataLoader) -> dict[str, float]:
        """Accuracy and macro-F1 on ``dataloader`` without a Trainer (usable before training).

        Returns:
            ``{"acc": ..., "f1": ...}``, computed by the same torchmetrics metrics as the
            logged ``test_acc`` and ``test_f1``.
        """
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        metrics = {k: cast(Metric, m.to(device)) for k, m in self._new_metrics().items()}
        try:
            for batch in dataloader:
                mask = batch.get("attention_mask")
                logits = self(
                    batch["input_ids"].to(device), None if mask is None else mask.to(device)
                )
                labels = batch["labels"].to(device)
                for metric in metrics.values():
                    metric.update(logits, labels)
        finally:
            self.train(was_training)
        return {k: float(m.compute()) for k, m in metrics.items()}

    def evaluate(self, dataloader: DataLoader) -> float:
        """Accuracy on ``dataloader`` without a Trainer (usable before training)."""
        return self.evaluate_metrics(dataloader)["acc"]
