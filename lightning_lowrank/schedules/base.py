"""The interface between the callback and a scheduled method.

A schedule is a plain object with small hook methods, testable without a Trainer. The callback calls
them from the right Trainer hooks; each hook gets the adapter layers (by qualified name) and the
number of optimizer steps taken so far. Nothing here imports Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn
from torch.optim import Optimizer

from lightning_lowrank.methods.base import AdapterLayer


class Schedule:
    """Base class of scheduled methods (AdaLoRA's allocator, LoRA-drop, Delta-LoRA).

    Every hook is optional. ``step`` is the number of optimizer steps completed (the Trainer's
    ``global_step``); hooks fire once per optimizer step, never per micro-batch.
    """

    def setup(
        self, model: nn.Module, layers: dict[str, AdapterLayer], total_steps: int | None
    ) -> None:
        """Called once after injection, before the strategy wraps the model."""

    def check_run_length(self, total_steps: int | None, steps_per_epoch: int | None) -> None:
        """Called before a fit starts with what is known of its length (None: unknown, e.g. an
        ``IterableDataset`` without ``max_steps``). Raise a ``ValueError`` naming the fix if the
        schedule cannot run without it, so the run fails before its first step."""

    def train_start(
        self,
        model: nn.Module,
        layers: dict[str, AdapterLayer],
        step: int,
        steps_per_epoch: int | None = None,
        optimizers: Sequence[Optimizer] = (),
    ) -> None:
        """Called when training starts, after any checkpoint was restored: the optimizers exist
        and ``steps_per_epoch`` (optimizer steps, None if unknown) is known."""

    def before_optimizer_step(
        self, model: nn.Module, layers: dict[str, AdapterLayer], step: int
    ) -> None:
        """Called after the gradients are complete (and synced across ranks), before the step."""

    def after_optimizer_step(
        self, model: nn.Module, layers: dict[str, AdapterLayer], step: int
    ) -> None:
        """Called once after each optimizer step; ``step`` already counts it."""

    @property
    def state_key(self) -> str:
        """The key of this schedule's state in the callback's checkpoint state.

        The class name by default: stable across releases and module moves, and independent of
        the schedule's position in ``LowRankCallback(schedules=[...])``. Keys must be unique
        within one callback: a subclass that can run twice in one callback overrides this with a
        key built from what tells the instances apart (as Lightning's ``Callback.state_key``).
        """
        return type(self).__qualname__

    def pop_messages(self) -> list[str]:
        """Text for the callback to log once, on rank zero (e.g. LoRA-drop's selection table),
        so that schedules never import Lightning. Each message is returned once."""
        return []

    def checkpoint_keeps_base(self) -> bool:
        """Whether adapter-only checkpoints must keep the adapted layers' base weights."""
        return False

    def shares_adapters(self) -> bool:
        """Whether layers may compute with other layers' adapter parameters (LoRA-drop's
        sharing): under FSDP2 all adapter parameters then live in one group."""
        return False

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue exactly; saved under ``state_key``."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
