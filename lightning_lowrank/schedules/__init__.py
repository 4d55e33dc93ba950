"""Scheduled methods: plain objects with small hook methods, driven by ``LowRankCallback``."""

from __future__ import annotations

from lightning_lowrank.methods.base import AdapterConfig
from lightning_lowrank.schedules.base import Schedule


def default_schedules(method: AdapterConfig) -> list[Schedule]:
    """Schedules that a method config implies (AdaLoRA's rank allocator runs automatically)."""
    return []


__all__ = ["Schedule", "default_schedules"]
