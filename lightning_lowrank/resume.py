"""What a Lightning checkpoint must agree on before a run resumes from it, and loading an
adapter-only checkpoint into a bare module.

``LowRankCallback`` keeps, in its checkpoint state, the method config, the adapted layer names and
a cheap fingerprint of the adapted layers' base weights as they were when the adapters were
injected (for each layer, the float64 sum and sum of squares of its weight: one pass, two numbers).
A resume compares all three, and the adapter tensors' shapes, before Lightning loads anything into
the model, so a changed hyperparameter (alpha, scaling, seed, ramp), another rank or another base
model is refused with a message instead of training on silently, or failing inside torch.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_lowrank.methods.base import AdapterConfig, AdapterLayer

#: relative tolerance of the fingerprint: float64 sums of the same weights on another device or
#: with another summation order differ far less; another model differs far more
FINGERPRINT_RTOL = 1e-6


@torch.no_grad()
def base_fingerprint(layers: dict[str, AdapterLayer]) -> list[list[float]]:
    """``[sum(W), sum(W^2)]`` in float64 for each layer's base weight (empty for a layer without
    a dense weight, as in SLTrain pre-training); one host sync for all layers."""
    rows: list[Tensor] = []
    present: list[bool] = []
    for layer in layers.values():
        w = layer.base._parameters.get("weight")
        present.append(w is not None)
        if w is not None:
            w64 = w.detach().to(torch.float64)
            rows.append(torch.stack([w64.sum(), w64.square().sum()]).cpu())
    values = torch.stack(rows).tolist() if rows else []
    it = iter(values)
    return [next(it) if p else [] for p in present]


def _config_diff(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(now))
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=FINGERPRINT_RTOL, abs_tol=1e-9)


def check_resume(
    state: dict[str, Any] | None,
    method: AdapterConfig,
    layers: dict[str, AdapterLayer],
    fingerprint: list[list[float]],
    checkpoint_state: dict[str, Tensor],
) -> None:
    """Refuse a checkpoint written with another method config, other adapted layers or another
    base model, or whose adapter tensors have other shapes. A checkpoint of an older version,
    without these entries, is checked for shapes only.

    Raises:
        ValueError: what differs, and what to change.
    """
    state = state or {}
    if "method" in state:
        diff = _config_diff(state["method"], method.to_dict())
        if diff:
            raise ValueError(
                f"the checkpoint was trained with another method config ({'; '.join(diff)}): "
                "resume with the config it was trained with, or start a new run"
            )
    if "layers" in state and list(state["layers"]) != list(layers):
        missing = sorted(set(state["layers"]) - set(layers))[:3]
        extra = sorted(set(layers) - set(state["layers"]))[:3]
        raise ValueError(
            f"the checkpoint does not match the adapted model: it adapts other layers (only in "
            f"the checkpoint: {missing}, only here: "
            f"{extra}): resume with the target_modules it was trained with"
        )
    saved = state.get("base_fingerprint")
    if saved and fingerprint and len(saved) == len(fingerprint):
        for name, old, new in zip(layers, saved, fingerprint, strict=True):
            if old and new and not all(_close(a, b) for a, b in zip(old, new, strict=True)):
                raise ValueError(
                    f"the base weights differ from those the checkpoint was trained on (layer "
                    f"{name!r}): resume on the same base model (same checkpoint, same dtype)"
                )
    for name, layer in layers.items():
        for key, value in layer.adapter_state_dict().items():
            stored = checkpoint_state.get(f"{name}.{key}")
            if stored is not None and tuple(stored.shape) != tuple(value.shape):
                raise ValueError(
                    f"the checkpoint's {name}.{key} has shape {tuple(stored.shape)}, this model's "
                    f"{tuple(value.shape)}: it was trained with another rank or method config; "
                    "resume with that config"
                )


def loaded_callback_state(
    trainer_ref: Callable[[], Any], *keys: str | type
) -> dict[str, Any] | None:
    """The callback state stored under the first of ``keys`` in the checkpoint the Trainer is
    resuming from, or None.

    Lightning copies a checkpoint's tensors into the module before it calls the callbacks'
    ``on_load_checkpoint``: reading the state here, from the checkpoint the Trainer has loaded
    (``trainer_ref`` is a weak reference to it), lets the load pre-hook refuse a mismatched config
    or base before anything is copied."""
    connector = getattr(trainer_ref(), "_checkpoint_connector", None)
    state = (getattr(connector, "_loaded_checkpoint", None) or {}).get("callbacks", {})
    for key in keys:
        if key in state:
            return state[key]
    return None


def load_adapter_checkpoint(module: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load a LowRankCallback checkpoint (adapter-only by default) into a module without adapters.

    ``MyModule.load_from_checkpoint(path)`` cannot do this: the checkpoint lacks the frozen base
    weights and holds adapter tensors the bare module has no place for. Build the module with its
    base weights (as for training), then call this: the adapters are injected from the method
    config and layer names the callback stored, and every tensor of the checkpoint's
    ``state_dict`` is loaded (the base weights it holds, if any, too).

    Args:
        module: the module as constructed for training, without adapters.
        path: a ``.ckpt`` file written by a Trainer with ``LowRankCallback``.

    Returns:
        The adapted module names.
    """
    from lightning_lowrank.inject import adapter_layers, attach, build_layers
    from lightning_lowrank.methods import config_from_dict

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    states = [
        v
        for k, v in checkpoint.get("callbacks", {}).items()
        if str(k).startswith("LowRankCallback")
    ]
    if len(states) != 1 or "method" not in states[0]:
        raise ValueError(
            f"{path} holds no LowRankCallback state with a method config (written by another "
            "callback or an older version?): inject the same method yourself, then "
            "module.load_state_dict(checkpoint['state_dict'], strict=False)"
        )
    if adapter_layers(module):
        raise ValueError("the module already has adapters: pass it as constructed for training")
    state, tensors = states[0], checkpoint["state_dict"]
    names = list(state["layers"])
    method = config_from_dict(state["method"])
    # the module's state once adapted, built without changing the module
    layers = build_layers(module, method, "|".join(re.escape(n) for n in names))
    expected = {
        k: v
        for k, v in module.state_dict().items()
        if not any(k.startswith(n + ".") for n in names)
    }
    for n, layer in layers.items():
        expected.update({f"{n}.{k}": v for k, v in layer.state_dict().items()})
    adapter_keys = {f"{n}.{k}" for n, layer in layers.items() for k in layer.adapter_state_dict()}
    problems = sorted(set(tensors) - set(expected))[:3]
    problems += [f"{k} (missing)" for k in sorted(adapter_keys - set(tensors))[:3]]
    problems += [
        f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in tensors.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ][:3]
    if problems:
        raise ValueError(f"{path} does not fit this module: {problems}; nothing was changed")
    attach(module, layers)
    module.load_state_dict(tensors, strict=False)
    return names
