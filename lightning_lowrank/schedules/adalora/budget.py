"""AdaLoRA's rank budget: how many rank slots are kept at optimizer step ``t``.

``RankAllocator(budget=...)`` takes, like Lightning's ``ModelPruning(amount=...)``, either a value
or a callable of the step, resolved at every optimizer step (and used where the allocator masks):

- ``None`` (the default): the paper's cubic schedule, [`cubic_budget`][lightning_lowrank.schedules.adalora.budget.cubic_budget], from ``b0 = init_rank *
  L`` to ``bT = target_rank * L`` over ``L`` layers;
- an ``int``: that many kept slots over all layers;
- a ``float`` in ``[0, 1]``: that fraction of ``b0``, rounded down (``int(f * b0)``);
- a callable ``f(step) -> int | float``: the same, evaluated at each step.

For example a linear fall from all slots to half of them over the first 1000 steps is
``budget=lambda t: max(0.5, 1.0 - 0.5 * t / 1000)``. The allocator decides *when* to mask (from the
config's ``t_init``, ``delta_t`` and ``t_final``); the budget only decides *how many* slots remain.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Integral, Real

#: kept slots (``int``), a fraction of the initial budget (``float``), or a callable of the step
#: returning either
Budget = int | float | Callable[[int], int | float]


def cubic_budget(
    step: int, initial: int, target: int, total_steps: int, t_init: int, t_final: int
) -> int:
    """The paper's cubic budget at optimizer step ``step`` (Zhang et al. 2023).

    With ``b0 = initial``, ``bT = target`` and ``T = total_steps``:

        b(t) = b0                                                     t <= t_init
        b(t) = int(bT + (b0 - bT) * (1 - (t - t_init) / (T - t_final - t_init))^3)
                                                                      t_init < t <= T - t_final
        b(t) = bT                                                     t > T - t_final

    Raises:
        ValueError: ``t_init + t_final >= total_steps`` (the fall would have no steps).
    """
    if t_init + t_final >= total_steps:
        raise ValueError(
            f"t_init ({t_init}) + t_final ({t_final}) must be < total steps ({total_steps})"
        )
    if step <= t_init:
        return initial
    if step > total_steps - t_final:
        return target
    fraction = 1.0 - (step - t_init) / (total_steps - t_final - t_init)
    return int(target + (initial - target) * fraction**3)


def resolve_budget(value: int | float, initial: int, step: int | None = None) -> int:
    """Kept slots for a budget value: an ``int`` as is, a ``float`` as ``int(value * initial)``.

    Args:
        value: what the budget argument (or its callable, at ``step``) gave.
        initial: ``b0``, the number of slots the layers have.
        step: the step the value was computed for, for the error message (``None``: a constant).

    Raises:
        TypeError: ``value`` is neither an int nor a float (``bool`` included).
        ValueError: the value lies outside ``[0, initial]`` slots or ``[0, 1]`` as a fraction.
    """
    where = "" if step is None else f" at step {step}"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(
            f"the AdaLoRA budget{where} is {value!r}: it must be a number of kept rank slots "
            "(int) or a fraction of the initial slots (float in [0, 1])"
        )
    if isinstance(value, Integral):
        slots = int(value)
        if not 0 <= slots <= initial:
            raise ValueError(
                f"the AdaLoRA budget{where} is {slots} slots, outside [0, {initial}] (the slots "
                "all layers start with, init_rank x layers): return a count in that range or a "
                "fraction in [0, 1]"
            )
        return slots
    fraction = float(value)
    if not (math.isfinite(fraction) and 0.0 <= fraction <= 1.0):
        raise ValueError(
            f"the AdaLoRA budget{where} is the fraction {fraction}, outside [0, 1]: return a "
            "fraction of the initial slots in [0, 1], or a number of slots (int)"
        )
    return int(fraction * initial)


def check_budget(budget: Budget | None) -> None:
    """Refuse a budget argument of the wrong kind when the allocator is built, before any run.

    Raises:
        TypeError: ``budget`` is neither ``None``, a number nor a callable.
        ValueError: a constant fraction outside ``[0, 1]`` or a negative slot count.
    """
    if budget is None or callable(budget):
        return
    if isinstance(budget, bool) or not isinstance(budget, Real):
        raise TypeError(
            f"budget must be None (the cubic schedule), a number of slots, a fraction or a "
            f"callable of the optimizer step, got {type(budget).__name__}"
        )
    if isinstance(budget, Integral):
        # the upper bound, b0, needs the layers: it is checked at setup
        if budget < 0:
            raise ValueError(f"budget must be at least 0 kept rank slots, got {budget}")
        return
    resolve_budget(budget, initial=1)
