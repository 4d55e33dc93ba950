"""What the callback reads from the Trainer (run length, steps per epoch), how it builds a
module's layers under the strategy's contexts, and the checks of its schedule list.

Kept apart from ``callback.py`` so that the callback holds only its hooks.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl

from lightning_lowrank.methods.base import AdapterConfig
from lightning_lowrank.schedules import RankAllocator, Schedule


def check_schedules(method: AdapterConfig, schedules: list[Schedule]) -> None:
    """Refuse schedules whose checkpoint keys clash, and an allocator that follows another
    config than ``method``, before anything is built."""
    keys = [s.state_key for s in schedules]
    clashes = sorted({k for k in keys if keys.count(k) > 1})
    if clashes:
        raise ValueError(
            f"several schedules have the state key {clashes}: their checkpoint states would "
            "overwrite each other. Pass each schedule once, or give a subclass its own state_key"
        )
    for s in schedules:
        if isinstance(s, RankAllocator) and s.config is not None and s.config != method:
            raise ValueError(
                f"the RankAllocator follows {s.config!r}, the callback's method is {method!r}: "
                "pass RankAllocator(budget=...) without a config (it takes the method's), or "
                "the same AdaLoRA config to both"
            )


def configure_model_for(trainer: pl.Trainer, pl_module: pl.LightningModule, sharded: bool) -> None:
    if not sharded:
        pl_module.configure_model()
        return
    # the contexts Lightning's own call uses (precision's default dtype, empty init)
    strategy = trainer.strategy
    with (
        strategy.tensor_init_context(),
        strategy.model_sharded_context(),
        trainer.precision_plugin.module_init_context(),
    ):
        pl_module.configure_model()


def steps_per_epoch(trainer: pl.Trainer) -> int | None:
    batches = trainer.num_training_batches
    if batches == float("inf") or batches <= 0:
        return None
    return max(1, math.ceil(batches / trainer.accumulate_grad_batches))


def estimated_steps(trainer: pl.Trainer) -> int | None:
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return int(trainer.max_steps)
    try:
        steps = trainer.estimated_stepping_batches
    except Exception:  # no train dataloader yet (validate/test only)
        return None
    # an IterableDataset without max_steps: Lightning answers inf, or max_steps itself (-1)
    return None if steps == float("inf") or steps < 1 else int(steps)
