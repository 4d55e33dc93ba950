"""Adapters shared between layers, and adapters switched off (LoRA-drop), as adapter files see them.

LoRA-drop marks layers with two attributes of :class:`AdapterLayer`:

- ``layer.shared_with = "<host layer name>"``: the layer's adapter parameters are the host's (tied
  storage while training, the very same ``Parameter`` objects after loading a file);
- ``layer.dropped = True``: the adapter adds nothing; the layer is left out of adapter files.

An adapter file stores a shared adapter once, under its host's keys, plus a ``shared`` metadata
entry ``{member: host}``; the members keep only their own buffers (if any). Loading re-ties the
members to the host, so the loaded model has the smaller parameter count.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_lowrank.methods.base import AdapterLayer


def stored_layers(layers: dict[str, AdapterLayer]) -> dict[str, AdapterLayer]:
    """The layers an adapter file holds: all but the dropped ones."""
    return {n: la for n, la in layers.items() if not getattr(la, "dropped", False)}


def _resolve_host(layers: dict[str, AdapterLayer], member: str) -> str | None:
    """The name, among ``layers``, of the host that ``layers[member].shared_with`` names.

    ``shared_with`` was recorded relative to the root the layers had when they were tied (the
    LightningModule, say); ``layers`` may be named relative to another root (its ``.model``)."""
    wanted = layers[member].shared_with
    assert wanted is not None
    found = [
        n for n in layers if n == wanted or wanted.endswith("." + n) or n.endswith("." + wanted)
    ]
    return found[0] if len(found) == 1 else None


def shared_map(layers: dict[str, AdapterLayer]) -> dict[str, str]:
    """``{member: host}`` for every layer that uses another layer's adapter parameters.

    Hosts are found by storage, so the map is right for any root module
    (``save_adapter(pl_module.model, ...)`` names layers relative to ``model``). Where a device or
    dtype move has untied the storage (see :func:`retie_shared`), the host is found by name and
    must still hold the same values."""
    hosts: dict[int, str] = {}
    for name, layer in layers.items():
        if not getattr(layer, "shared_with", None):
            for p in adapter_parameters(layer).values():
                hosts.setdefault(p.data_ptr(), name)
    shared: dict[str, str] = {}
    for name, layer in layers.items():
        if getattr(layer, "shared_with", None):
            found = {hosts.get(p.data_ptr()) for p in adapter_parameters(layer).values()}
            if len(found) != 1 or None in found:
                host = _resolve_host(layers, name)
                if host is None:
                    raise ValueError(
                        f"layer {name!r} shares its adapter with {layer.shared_with!r}, which is "
                        "not among the layers being saved: save the module that holds both"
                    )
                _check_untied_equal(layers, name, host)
                found = {host}
            shared[name] = found.pop()
    return shared


def _check_untied_equal(layers: dict[str, AdapterLayer], member: str, host: str) -> None:
    mine, theirs = adapter_parameters(layers[member]), adapter_parameters(layers[host])
    for pname, p in mine.items():
        if not torch.equal(p.detach().cpu(), theirs[pname].detach().cpu()):
            raise ValueError(
                f"layer {member!r} should share its adapter with {host!r}, but the two now hold "
                f"different values of {pname!r}: the model was moved to another device or dtype "
                "(which unties shared storage) and then trained. Call retie_shared(model) after "
                "every such move; LowRankCallback does it for the moves Lightning makes."
            )


def retie_shared(model: nn.Module) -> int:
    """Tie every shared adapter (LoRA-drop) back to its host's storage.

    LoRA-drop ties a member's adapter parameters to the host's with ``param.data = host.data``,
    keeping the ``Parameter`` objects that the optimizer and DDP already hold. ``Module.to()``,
    ``.cuda()``, ``.cpu()``, ``.double()`` convert each ``Parameter`` on its own, which unties them:
    each layer would then train its own copy. This re-points the members at the host's new storage
    (the values are equal right after a move; if they differ, the model was trained untied and a
    ``ValueError`` says so).

    Returns:
        How many layers were re-tied.
    """
    from lightning_lowrank.inject import adapter_layers

    layers = adapter_layers(model)
    count = 0
    for name, layer in layers.items():
        if not getattr(layer, "shared_with", None):
            continue
        host = _resolve_host(layers, name)
        if host is None:
            raise ValueError(
                f"layer {name!r} shares its adapter with {layer.shared_with!r}, which is not in "
                "this model: call retie_shared on the module that holds both"
            )
        theirs = adapter_parameters(layers[host])
        mine = adapter_parameters(layer)
        if all(p.data_ptr() == theirs[n].data_ptr() for n, p in mine.items()):
            continue
        _check_untied_equal(layers, name, host)
        tie(layer, layers[host])
        count += 1
    return count


def stored_state(state: dict[str, Tensor], layers: dict[str, AdapterLayer]) -> dict[str, Tensor]:
    """``state`` (keys ``"<layer>.<tensor>"``) restricted to what a file stores: no dropped layer,
    and a member of a shared adapter keeps only its non-parameter tensors."""
    keep: dict[str, Tensor] = {}
    for name, layer in layers.items():
        prefix = f"{name}."
        skip = (
            set(layer.adapter_parameter_names()) if getattr(layer, "shared_with", None) else set()
        )
        for key, value in state.items():
            if key.startswith(prefix) and key[len(prefix) :] not in skip:
                keep[key] = value
    return keep


def mark_shared(layers: dict[str, AdapterLayer], shared: dict[str, str], path: Path) -> None:
    """Set ``shared_with`` on freshly built layers from a file's ``shared`` entry, checking that
    every host exists and has the member's adapter shapes."""
    for member, host in shared.items():
        if member not in layers or host not in layers or host in shared:
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
    for member, host in shared.items():
        layers[member].shared_with = host


def tie_shared(layers: dict[str, AdapterLayer]) -> None:
    """Make each member use its host's adapter ``Parameter`` objects (before any wrapping)."""
    # by the names mark_shared set: the storages are not tied yet, so shared_map cannot be used
    marked = {n: la.shared_with for n, la in layers.items() if getattr(la, "shared_with", None)}
    for member, host in marked.items():
        host_params = adapter_parameters(layers[host])
        for pname in list(adapter_parameters(layers[member])):
            owner_name, _, leaf = pname.rpartition(".")
            owner = layers[member].get_submodule(owner_name) if owner_name else layers[member]
            setattr(owner, leaf, host_params[pname])


def adapter_parameters(layer: AdapterLayer) -> dict[str, nn.Parameter]:
    """The adapter's own parameters (trainable or not), keyed relative to the layer."""
    return {n: p for n, p in layer.named_parameters() if not n.startswith("base.")}


def tie(member: AdapterLayer, host: AdapterLayer) -> None:
    """Point ``member``'s adapter parameters at ``host``'s storage, keeping the ``Parameter``
    objects (the optimizer and DDP hold them)."""
    host_params = adapter_parameters(host)
    for pname, p in adapter_parameters(member).items():
        p.data = host_params[pname].data
