"""``AdapterMonitor``: logs intruder dimensions and effective ranks of the adapters while training.

Every ``every_n_steps`` optimizer steps it computes, for each adapter layer, the number of intruder
dimensions of ``W = W0 + delta_weight()`` against the pre-trained ``W0`` and the effective rank of
``delta_weight()`` (see [`lightning_lowrank.analysis`][lightning_lowrank.analysis]), and logs them to the Lightning logger:

- ``adapter/intruders``: the total count over all layers;
- ``adapter/intruders_max``: the largest count of a single layer;
- ``adapter/effective_rank``: the mean effective rank of the deltas;
- with ``per_layer=True`` also ``adapter/intruders/<layer>`` and ``adapter/effective_rank/<layer>``.

The pre-trained left singular vectors are computed once, at the start of training, so methods that
move the base weight (Delta-LoRA) are still compared with the pre-trained weight. Place it after
``LowRankCallback`` in the Trainer's callbacks (it reads the layers that callback injected).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from lightning_lowrank.analysis import (
    adapted_weights,
    classify_intruders,
    effective_rank,
    intruder_similarities,
    top_left_singular_vectors,
)
from lightning_lowrank.inject import adapter_layers


class AdapterMonitor(Callback):
    """Log intruder-dimension counts and delta effective ranks every ``every_n_steps`` steps.

    Args:
        every_n_steps: log every this many optimizer steps (the SVDs cost milliseconds per layer
            on MiniLM, so every step is affordable for small models but rarely useful).
        k: how many top singular vectors of ``W`` to test for intruders (10 in the paper).
        epsilon: the intruder similarity threshold (0.5 in the paper).
        per_layer: also log one value per layer.
        effective_ranks: also compute and log the effective rank of each delta.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        k: int = 10,
        epsilon: float = 0.5,
        per_layer: bool = False,
        effective_ranks: bool = True,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not 0.0 < epsilon <= 1.0:
            raise ValueError(f"epsilon must be in (0, 1], got {epsilon}")
        self.every_n_steps = every_n_steps
        self.k = k
        self.epsilon = epsilon
        self.per_layer = per_layer
        self.effective_ranks = effective_ranks
        #: one entry per measurement: {"step": int, "intruders": {layer: count}, ...}
        self.history: list[dict[str, Any]] = []
        self._u0: dict[str, Tensor] = {}
        self._last_step = -1

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        layers = adapter_layers(pl_module)
        if not layers:
            raise ValueError(
                "AdapterMonitor found no adapter layers: add LowRankCallback(...) before it in "
                "Trainer(callbacks=[...]) or call inject(model, ...) before fit"
            )
        for name, layer in layers.items():
            if name not in self._u0:  # kept across fits: always the spectrum of the first W0
                w0, _ = adapted_weights(layer)
                self._u0[name] = top_left_singular_vectors(w0, min(w0.shape))[0]
        self._last_step = trainer.global_step

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return  # gradient accumulation: no optimizer step since the last call
        self._last_step = step
        if step % self.every_n_steps != 0:
            return
        record = self.measure(pl_module)
        record["step"] = step
        self.history.append(record)
        metrics = {
            "adapter/intruders": float(sum(record["intruders"].values())),
            "adapter/intruders_max": float(max(record["intruders"].values())),
        }
        if self.effective_ranks:
            ranks = record["effective_rank"]
            metrics["adapter/effective_rank"] = sum(ranks.values()) / len(ranks)
        if self.per_layer:
            for name, count in record["intruders"].items():
                metrics[f"adapter/intruders/{name}"] = float(count)
            for name, value in record.get("effective_rank", {}).items():
                metrics[f"adapter/effective_rank/{name}"] = value
        # parameters are identical on every rank, so the values are too: no sync needed
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, sync_dist=False)

    @torch.no_grad()
    def measure(self, model: torch.nn.Module) -> dict[str, Any]:
        """Intruder counts (and effective ranks) of every adapter layer of ``model`` now."""
        counts: dict[str, int] = {}
        ranks: dict[str, float] = {}
        for name, layer in adapter_layers(model).items():
            w0, w = adapted_weights(layer)
            u0 = self._u0.get(name)
            if u0 is None:
                u0 = self._u0[name] = top_left_singular_vectors(w0, min(w0.shape))[0]
            sims, top = intruder_similarities(u0, w, self.k)
            counts[name] = classify_intruders(sims, top, self.epsilon).count
            if self.effective_ranks:
                ranks[name] = effective_rank(layer.delta_weight())
        record: dict[str, Any] = {"intruders": counts}
        if self.effective_ranks:
            record["effective_rank"] = ranks
        return record
