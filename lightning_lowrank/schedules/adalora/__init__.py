"""AdaLoRA's schedule: the rank allocator, its budget ``b(t)`` and the orthogonality regulariser.

- [`allocator`][lightning_lowrank.schedules.adalora.allocator]: [`RankAllocator`][lightning_lowrank.RankAllocator], importance scores and global soft masking;
- [`budget`][lightning_lowrank.schedules.adalora.budget]: the budget argument (a value or a callable of the step) and the paper's cubic
  schedule;
- [`orthogonality`][lightning_lowrank.schedules.adalora.orthogonality]: the regulariser on P and Q, as a loss and as a closed-form gradient.
"""

from __future__ import annotations

from lightning_lowrank.schedules.adalora.allocator import RankAllocator
from lightning_lowrank.schedules.adalora.budget import Budget, cubic_budget, resolve_budget
from lightning_lowrank.schedules.adalora.orthogonality import (
    add_orthogonality_grad,
    orthogonality_loss,
)

__all__ = [
    "Budget",
    "RankAllocator",
    "add_orthogonality_grad",
    "cubic_budget",
    "orthogonality_loss",
    "resolve_budget",
]
