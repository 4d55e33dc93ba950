"""Shared and disabled adapters (LoRA-drop) as adapter files see them.

The layers carry two protocol states (``methods/state.py``): ``layer.disabled`` (the layer is its
base; files leave it out) and a tie (``layer.adapter_host``: the layer computes with another
layer's adapter parameters). This module is the file-level view of them; it never decides what
to share (``schedules/lora_drop/`` does).

An adapter file stores a shared adapter once, under its host's keys, plus a ``shared`` metadata
entry ``{member: host}``; the members keep only their own buffers (if any). Loading ties the
members to the host the same way training does, and freezes the members' own (idle) parameters
(the model is not wrapped yet), so the loaded model has the smaller trainable parameter count.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from lightning_lowrank.methods.base import AdapterLayer


def stored_layers(layers: dict[str, AdapterLayer]) -> dict[str, AdapterLayer]:
    """The layers an adapter file holds: all but the disabled ones."""
    return {n: la for n, la in layers.items() if not la.disabled}


def shared_map(layers: dict[str, AdapterLayer]) -> dict[str, str]:
    """``{member: host}`` for every layer tied to another one's adapter, named as in ``layers``.

    Hosts are found by identity, so the map is right for any root module
    (``save_adapter(pl_module.model, ...)`` names layers relative to ``model``).

    Raises:
        ValueError: a member's host is not among ``layers``.
    """
    names = {id(layer): name for name, layer in layers.items()}
    shared: dict[str, str] = {}
    for name, layer in layers.items():
        host = layer.adapter_host
        if host is None:
            continue
        if id(host) not in names:
            raise ValueError(
                f"layer {name!r} shares its adapter with a layer that is not among the layers "
                "being saved: save the module that holds both"
            )
        shared[name] = names[id(host)]
    return shared


def retie_shared(model: nn.Module) -> int:
    """Kept for code written against storage ties; there is nothing to re-tie any more.

    A shared adapter is a tie by reference (the member reads its host's *current* parameters at
    every use), not shared storage, so ``Module.to()``, ``.cuda()``, ``.cpu()`` and ``.double()``
    keep it. This only checks that every member's host is part of ``model``.

    Returns:
        How many layers were re-tied: always 0.

    Raises:
        ValueError: a member's host is not in ``model``.
    """
    from lightning_lowrank.inject import adapter_layers

    shared_map(adapter_layers(model))
    return 0


def stored_state(state: dict[str, Tensor], layers: dict[str, AdapterLayer]) -> dict[str, Tensor]:
    """``state`` (keys ``"<layer>.<tensor>"``) restricted to what a file stores: no disabled
    layer, and a member of a shared adapter keeps only its non-parameter tensors."""
    keep: dict[str, Tensor] = {}
    for name, layer in layers.items():
        prefix = f"{name}."
        skip = set(layer.adapter_parameter_names()) if layer.adapter_host is not None else set()
        for key, value in state.items():
            if key.startswith(prefix) and key[len(prefix) :] not in skip:
                keep[key] = value
    return keep


def check_shared(layers: dict[str, AdapterLayer], shared: dict[str, str], path: Path) -> None:
    """Check a file's ``shared`` entry against freshly built layers: every member and host
    exists, no host is itself a member, and each pair could be tied."""
    for member, host in shared.items():
        if member not in layers or host not in layers or host in shared or member == host:
            raise ValueError(
                f"adapter file {path} shares {member!r} with {host!r}, which this model's adapted "
                "layers do not allow: the file is corrupt or from another model"
            )
        mine = {n: p.shape for n, p in adapter_parameters(layers[member]).items()}
        theirs = {n: p.shape for n, p in adapter_parameters(layers[host]).items()}
        if mine != theirs:
            raise ValueError(
                f"adapter file {path} shares {member!r} with {host!r} but their adapters have "
                f"different shapes ({mine} vs {theirs})"
            )


def tie_from_file(layers: dict[str, AdapterLayer], shared: dict[str, str]) -> None:
    """Tie each member of a file's ``shared`` entry to its host, as training does."""
    for member, host in shared.items():
        layers[member].share_adapter(layers[host])


def freeze_idle(layers: dict[str, AdapterLayer]) -> None:
    """Freeze the idle parameters of tied and disabled layers. Only before the model is wrapped
    (loading a file is): they take no part in the output, so nothing should train them."""
    for layer in layers.values():
        for p in layer.idle_parameters():
            p.requires_grad_(False)


def adapter_parameters(layer: AdapterLayer) -> dict[str, nn.Parameter]:
    """The layer's own registered adapter parameters (trainable or not), keyed relative to the
    layer. For a tied member these are its idle ones; ``getattr(layer, name)`` is what it
    computes with."""
    return {n: p for n, p in layer.named_parameters() if not n.startswith("base.")}
