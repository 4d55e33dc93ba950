"""``MetricsHistory``: keep the logged metrics of a run in memory, for tables and plots."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


class MetricsHistory(Callback):
    """Record ``train_loss`` after every optimizer step and the validation metrics after every
    validation run, each with the optimizer step it belongs to.

    Attributes:
        train: ``[(step, train_loss), ...]``.
        val: ``[(step, {"val_loss": ..., "val_acc": ...}), ...]`` (every logged ``val_*``).
    """

    def __init__(self) -> None:
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, dict[str, float]]] = []

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = trainer.callback_metrics.get("train_loss")
        if loss is not None:
            self.train.append((trainer.global_step, float(loss)))

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
        if metrics:
            self.val.append((trainer.global_step, metrics))

    def first_step_below(self, metric: str, threshold: float) -> int | None:
        """The first optimizer step at which validation ``metric`` was ``<= threshold``."""
        for step, metrics in self.val:
            if metric in metrics and metrics[metric] <= threshold:
                return step
        return None
