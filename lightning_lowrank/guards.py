"""What a Trainer run must satisfy before ``LowRankCallback`` changes anything.

- the strategy is one that is tested, by exact type (one device, or DDP launched as subprocesses);
- one ``LowRankCallback`` per Trainer;
- a callback and its schedules belong to one module and one run (``docs/how-to/reuse.md``).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, Strategy


def check_strategy(strategy: Strategy) -> None:
    """Accept exactly the strategies that are tested: one device, and DDP with the subprocess
    launcher. Subclasses (DeepSpeed, XLA) and the spawn/fork launchers, whose workers adapt
    copies of the module and leave the launching process's module without adapters, are refused
    by exact type."""
    kind = type(strategy)
    if kind is SingleDeviceStrategy:
        return
    if kind is DDPStrategy and getattr(strategy, "_start_method", "popen") == "popen":
        return
    name = kind.__name__
    if kind is DDPStrategy:
        name = f"DDPStrategy(start_method={strategy._start_method!r})"  # type: ignore[attr-defined]
    raise ValueError(
        f"LowRankCallback supports a single device, strategy='ddp' and ModelParallelStrategy (FSDP2), not {name}: use "
        "strategy='ddp' (it launches the workers as subprocesses, so every process, the first "
        "one included, holds the adapted model) or 'auto' on one device"
    )


def check_ownership(me: Any, module: Any) -> None:
    """A callback and its schedules hold one run's state on one module (docs: reuse)."""
    if me._module is not None and me._module is not module:
        raise ValueError(
            "this LowRankCallback already adapted another module, and its schedules hold that "
            "run's state: create a new LowRankCallback (and new schedules) for each model"
        )
    for schedule in me.schedules:
        owner = getattr(schedule, "_lowrank_owner", None)
        if owner is not None and owner is not me:
            raise ValueError(
                f"this {type(schedule).__name__} already belongs to another LowRankCallback and "
                "holds its run's state: create a new schedule object for each callback"
            )


def check_single_callback(trainer: Any, me: Any) -> None:
    callbacks = getattr(trainer, "callbacks", ())  # a stand-in trainer may have none
    others = [cb for cb in callbacks if isinstance(cb, type(me)) and cb is not me]
    if others:
        raise ValueError(
            f"the Trainer has {len(others) + 1} LowRankCallbacks: one callback adapts the model. "
            "To combine methods use one callback (schedules=[...] adds Delta-LoRA or LoRA-drop)"
        )
