"""Scheduled methods: plain objects with small hook methods, driven by ``LowRankCallback``."""

from __future__ import annotations

from collections.abc import Sequence

from lightning_lowrank.methods.adalora import AdaLoRA
from lightning_lowrank.methods.base import AdapterConfig
from lightning_lowrank.schedules.adalora import RankAllocator
from lightning_lowrank.schedules.base import Schedule
from lightning_lowrank.schedules.delta_lora import DeltaLoRA
from lightning_lowrank.schedules.lora_drop import LoRADrop, plot_importance


def default_schedules(method: AdapterConfig, given: Sequence[Schedule] = ()) -> list[Schedule]:
    """Schedules that a method config implies and ``given`` does not already hold.

    AdaLoRA's rank allocator runs automatically, unless ``given`` has a [`RankAllocator`][lightning_lowrank.RankAllocator]
    (the user's own, e.g. with another budget): one allocator only, never two.
    """
    if isinstance(method, AdaLoRA) and not any(isinstance(s, RankAllocator) for s in given):
        return [RankAllocator(method)]
    return []


__all__ = [
    "DeltaLoRA",
    "LoRADrop",
    "RankAllocator",
    "Schedule",
    "default_schedules",
    "plot_importance",
]
