"""LoRA-drop's measurement and selection: the importance ``g_i`` of each adapted layer, the layers
kept at a cumulative threshold, and the shape groups the others share in.

``g_i = sum over training inputs x of ||dW_i x||^2``, where ``dW_i x`` is read by two forward hooks
as ``layer(x) - base(x)`` (for LoRA exactly the adapter's output; for DoRA, whose forward rescales
the whole output, the full change ``W' x - W0 x``). The hooks' partial sums live in the
``ImportanceMeter``, never on the layers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_lowrank.methods.base import AdapterLayer
from lightning_lowrank.sharing import adapter_parameters


def select_layers(importance: Mapping[str, float], threshold: float) -> list[str]:
    """The layers LoRA-drop keeps: the most important ones until the cumulative normalised
    importance ``sum I_i`` (``I_i = g_i / sum_j g_j``) reaches ``threshold`` (the crossing layer
    included), in input order.

    Ties keep input (model) order. Raises ``ValueError`` if every importance is zero.
    """
    total = math.fsum(importance.values())
    if not total > 0 or not math.isfinite(total):
        raise ValueError(
            f"LoRA-drop: the adapters' outputs summed to {total} during the sampling phase, so no "
            "layer can be ranked: use a nonzero learning rate and more sample_steps"
        )
    names = list(importance)
    order = sorted(range(len(names)), key=lambda i: -importance[names[i]])  # stable: ties by order
    kept: set[str] = set()
    cumulative = 0.0
    for i in order:
        kept.add(names[i])
        cumulative += importance[names[i]] / total
        if cumulative >= threshold - 1e-9:
            break
    return [n for n in names if n in kept]


def shape_groups(layers: Mapping[str, AdapterLayer], names: Sequence[str]) -> list[list[str]]:
    """Group ``names`` by adapter shape (layer class, kind and every adapter tensor's shape and
    dtype); groups and members keep model order, the first member is the group's host."""
    groups: dict[tuple, list[str]] = {}
    for name in names:
        layer = layers[name]
        params = adapter_parameters(layer)
        key = (
            type(layer).__name__,
            layer.kind,
            tuple((n, tuple(p.shape), str(p.dtype)) for n, p in sorted(params.items())),
        )
        groups.setdefault(key, []).append(name)
    return list(groups.values())


class ImportanceMeter:
    """Accumulates ``||layer(x) - base(x)||^2`` of every training forward, per layer, in float64.

    ``attach`` installs the hooks, ``flush`` adds what was measured since the last call
    to ``importance`` and ``calls`` (summed over DDP ranks), ``detach`` removes the hooks."""

    def __init__(self) -> None:
        self.pending: dict[str, Tensor] = {}
        self.base_out: dict[str, Tensor] = {}
        self._handles: list[Any] = []

    def attach(self, layers: Mapping[str, AdapterLayer]) -> None:
        for name, layer in layers.items():
            capture = functools.partial(self._capture_base_output, name)
            measure = functools.partial(self._measure_adapter_output, name)
            self._handles.append(layer.base.register_forward_hook(capture))
            self._handles.append(layer.register_forward_hook(measure))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    def clear(self) -> None:
        """Forget the partial sums of an unfinished step (e.g. before loading a checkpoint)."""
        self.pending.clear()
        self.base_out.clear()

    def _capture_base_output(self, name: str, base: Any, args: Any, output: Tensor) -> None:
        self.base_out[name] = output

    def _measure_adapter_output(
        self, name: str, layer: AdapterLayer, args: Any, output: Tensor
    ) -> None:
        base_out = self.base_out.pop(name, None)  # never keep it past this forward
        if not (layer.training and torch.is_grad_enabled()) or layer.merged:
            return  # training forwards only: validation runs in eval mode and without grad
        # the adapter's contribution dW x = layer(x) - base(x), whatever the method's forward does
        delta = output.detach().double()
        if base_out is not None:
            delta = delta - base_out.detach().double()
        sq = delta.square().sum()
        pending = self.pending.get(name)
        self.pending[name] = sq if pending is None else pending + sq

    def flush(
        self,
        names: Sequence[str],
        importance: dict[str, float],
        calls: dict[str, int],
        device: torch.device,
    ) -> None:
        """Add the sums since the last flush to ``importance`` and count the layers that saw a
        forward in ``calls``; under DDP both are all-reduced first, so every rank agrees."""
        values = torch.zeros(2 * len(names), dtype=torch.float64, device=device)
        for i, name in enumerate(names):
            pending = self.pending.pop(name, None)
            if pending is not None:
                values[i] = pending.to(device)
                values[len(names) + i] = 1.0
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(values)
        listed = values.cpu().tolist()
        for i, name in enumerate(names):
            importance[name] += listed[i]
            calls[name] += int(listed[len(names) + i] > 0)
