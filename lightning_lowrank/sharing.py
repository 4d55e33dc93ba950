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

from torch import Tensor, nn

from lightning_lowrank.methods.base import AdapterLayer


def stored_layers(layers: dict[str, AdapterLayer]) -> dict[str, AdapterLayer]:
    """The layers an adapter file holds: all but the dropped ones."""
    return {n: la for n, la in layers.items() if not getattr(la, "dropped", False)}


def shared_map(layers: dict[str, AdapterLayer]) -> dict[str, str]:
    """``{member: host}`` for every layer that uses another layer's adapter parameters.

    Hosts are found by storage, not by the name in ``shared_with``, so the map is right for any
    root module (``save_adapter(pl_module.model, ...)`` names layers relative to ``model``)."""
    hosts: dict[int, str] = {}
    for name, layer in layers.items():
        if not getattr(layer, "shared_with", None):
            for p in _adapter_params(layer).values():
                hosts.setdefault(p.data_ptr(), name)
    shared: dict[str, str] = {}
    for name, layer in layers.items():
        if getattr(layer, "shared_with", None):
            found = {hosts.get(p.data_ptr()) for p in _adapter_params(layer).values()}
            if len(found) != 1 or None in found:
                raise ValueError(
                    f"layer {name!r} shares its adapter with {layer.shared_with!r}, which is not "
                    "among the layers being saved: save the module that holds both"
                )
            shared[name] = found.pop()
    return shared


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
        mine = {n: p.shape for n, p in _adapter_params(layers[member]).items()}
        theirs = {n: p.shape for n, p in _adapter_params(layers[host]).items()}
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
        host_params = _adapter_params(layers[host])
        for pname in list(_adapter_params(layers[member])):
            owner_name, _, leaf = pname.rpartition(".")
            owner = layers[member].get_submodule(owner_name) if owner_name else layers[member]
            setattr(owner, leaf, host_params[pname])


def _adapter_params(layer: AdapterLayer) -> dict[str, nn.Parameter]:
    return {n: p for n, p in layer.named_parameters() if not n.startswith("base.")}
