"""Memory counted from tensors, to cross-check allocator and RSS readings.

- :func:`saved_tensor_bytes`: the bytes autograd keeps for backward during one forward, summed
  over the tensors the graph saves (``torch.autograd.graph.saved_tensors_hooks``), each storage
  counted once (a view of an input and the input share one storage);
- :func:`static_bytes`: weights, gradients and optimizer state of a model and its optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def _storage_key(t: torch.Tensor) -> tuple[Any, ...]:
    s = t.untyped_storage()
    return (t.device.type, s.data_ptr(), s.nbytes())


def saved_tensor_bytes(
    forward: Callable[[], Any], exclude: list[torch.Tensor] | None = None
) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``forward()`` runs.

    Args:
        forward: runs a forward pass (its result is dropped, so the graph is freed afterwards).
        exclude: tensors not to count although saved (the frozen weights: they live anyway).

    Returns:
        ``sum`` of ``storage.nbytes()`` over the distinct storages packed by the graph.
    """
    skip = {_storage_key(t) for t in exclude or []}
    seen: dict[tuple[Any, ...], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in skip and t.layout == torch.strided:
            seen.setdefault(key, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(seen.values())


def static_bytes(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, int]:
    """``{"weights", "gradients", "optimizer_state"}`` in bytes, counted from the tensors.

    Weights count every parameter and buffer of ``model``; gradients the ``.grad`` present now
    (call after a backward); optimizer state every tensor in ``optimizer.state`` (after a step).
    Each storage is counted once.
    """
    seen: set[tuple[Any, ...]] = set()

    def count(tensors: list[torch.Tensor]) -> int:
        total = 0
        for t in tensors:
            key = _storage_key(t)
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        return total

    weights = count([*model.parameters(), *model.buffers()])
    grads = count([p.grad for p in model.parameters() if p.grad is not None])
    state = 0
    if optimizer is not None:
        state = count(
            [
                v
                for s in optimizer.state.values()
                for v in s.values()
                if isinstance(v, torch.Tensor) and v.numel() > 1
            ]
        )
    return {"weights": weights, "gradients": grads, "optimizer_state": state}
