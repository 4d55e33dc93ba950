"""Scheduled methods: plain objects with small hook methods, driven by ``LowRankCallback``."""

from __future__ import annotations

from lightning_lowrank.methods.adalora import AdaLoRA
from lightning_lowrank.methods.base import AdapterConfig
from lightning_lowrank.schedules.adalora import RankAllocator
from lightning_lowrank.schedules.base import Schedule
from lightning_lowrank.schedules.delta_lora import DeltaLoRA
from lightning_lowrank.schedules.lora_drop import LoRADrop, plot_importance


def default_schedules(method: AdapterConfig) -> list[Schedule]:
    """Schedules that a method config implies (AdaLoRA's rank allocator runs automatically)."""
    if isinstance(method, AdaLoRA):
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
