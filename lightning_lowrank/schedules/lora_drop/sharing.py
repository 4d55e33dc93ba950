"""LoRA-drop's switch: the ties of ``mode="share"`` and the disabled layers of ``mode="drop"``.

Nothing is created, removed or (un)frozen: the model may already be wrapped by DDP.

- *share*: in each shape group the first layer (model order) is the host; every other member is
  tied to it ([`AdapterLayer.share_adapter`][lightning_lowrank.AdapterLayer.share_adapter]): it computes with the host's ``Parameter``
  objects, read at every use, so autograd sums the gradients of all uses into the host (one
  accumulation per backward, hence one DDP all-reduce) and a device, dtype or FSDP2 move keeps
  the sharing. The members' own parameters stay registered and idle.
- *drop*: the unselected layers are disabled (``layer.disabled = True``): base output, zero
  delta, nothing merged.
- Idle parameters get an exact zero gradient from the forward (``methods/state.py``: DDP's
  reducer sees every parameter it was built with); ``clear_idle_gradients`` sets them to
  ``None`` before each optimizer step so the optimizer (and weight decay) leaves them alone.
- The optimizer state of every unselected layer's parameters is cleared at the switch: the
  shared tensor starts with fresh moments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch.optim import Optimizer

from lightning_lowrank.methods.base import AdapterLayer
from lightning_lowrank.methods.layers import fill_
from lightning_lowrank.methods.state import check_tie
from lightning_lowrank.shard import full_tensor
from lightning_lowrank.sharing import adapter_parameters

Mode = Literal["share", "drop"]
SharedInit = Literal["mean", "fresh"]


def forget_optimizer_state(
    layers: Mapping[str, AdapterLayer], names: Sequence[str], optimizers: Sequence[Optimizer]
) -> None:
    """Drop the optimizer state of ``names``' adapter parameters (stale moments of tensors whose
    meaning changed)."""
    for name in names:
        for p in adapter_parameters(layers[name]).values():
            for opt in optimizers:
                opt.state.pop(p, None)


def check_groups(
    layers: Mapping[str, AdapterLayer], groups: Sequence[Sequence[str]], mode: Mode
) -> None:
    """Raise a ``ValueError`` (changing nothing) unless every member can be tied to its host."""
    if mode == "share":
        for host, *members in groups:
            for member in members:
                check_tie(layers[member], layers[host])


def apply_groups(
    layers: Mapping[str, AdapterLayer], groups: Sequence[Sequence[str]], mode: Mode
) -> None:
    """Tie every group's members to its host (``"share"``) or disable every member
    (``"drop"``)."""
    check_groups(layers, groups, mode)
    for host, *members in groups:
        if mode == "drop":
            for name in (host, *members):
                layers[name].disabled = True
            continue
        for member in members:
            layers[member].share_adapter(layers[host])


@torch.no_grad()
def initialise_shared(
    layers: Mapping[str, AdapterLayer], group: Sequence[str], how: SharedInit, seed: int
) -> None:
    """Set the host's adapter (the group's first layer) to the shared adapter's start value:
    the element-wise ``"mean"`` of the group's adapters, or the method's own ``"fresh"``
    initialisation, seeded by ``seed`` (the same on every rank)."""
    host = layers[group[0]]
    host_params = adapter_parameters(host)
    if how == "mean":
        for pname, hp in host_params.items():
            # full tensors (gathered under FSDP2): the mean of the whole adapters
            stack = [full_tensor(adapter_parameters(layers[m])[pname]).double() for m in group]
            fill_(hp, torch.stack(stack).mean(dim=0).to(hp.dtype))
        return
    device = next(iter(host_params.values())).device
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        fresh = host.config.build({group[0]: host.base})[group[0]]
    for pname, fp in adapter_parameters(fresh).items():
        fill_(host_params[pname], fp.to(host_params[pname].dtype))


def clear_idle_gradients(layers: Mapping[str, AdapterLayer], names: Sequence[str]) -> None:
    """Set the gradients of ``names``' idle parameters to ``None`` (they are exact zeros)."""
    for name in names:
        for p in layers[name].idle_parameters():
            p.grad = None


def adapter_parameter_count(layers: Mapping[str, AdapterLayer]) -> int:
    """Trainable adapter parameters that take part in the outputs, each ``Parameter`` once."""
    seen: set[int] = set()
    total = 0
    for layer in layers.values():
        idle = {id(p) for p in layer.idle_parameters()}
        for p in adapter_parameters(layer).values():
            if p.requires_grad and id(p) not in idle and id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total
