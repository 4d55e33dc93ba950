"""Adapter files: safetensors only (never pickle), with the method config in the metadata.

A file holds each adapter layer's parameters and persistent buffers under
``"<module name>.<tensor name>"`` and metadata entries (JSON strings): ``method`` (the config
and its type), ``layers`` (the adapted module names and per-layer rebuild facts), ``extensions``
(the layer extensions to rebuild, e.g. Delta-LoRA's base update; absent in older files),
``extra`` (state that scheduled methods attach, e.g. a selection or a base delta description) and
``quantization`` (how each quantized layer of the base was stored, e.g. ``{"format": "nf4",
"blocksize": 64, ...}``; loading into a dense model quantizes those layers the same way).

Saving writes a temporary file next to the target and renames it, so a crash never leaves a
half-written adapter. Loading validates every key and shape against the model before anything is
changed: a mismatched or corrupt file raises and leaves the model untouched.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from lightning_lowrank.inject import adapter_layers, attach, build_layers
from lightning_lowrank.methods import config_from_dict
from lightning_lowrank.methods.base import (
    EXTENSION_TYPES,
    AdapterConfig,
    AdapterLayer,
    LayerExtension,
)
from lightning_lowrank.quant import model as quant
from lightning_lowrank.sharing import (
    check_shared,
    freeze_idle,
    shared_map,
    stored_layers,
    stored_state,
    tie_from_file,
)

FORMAT = "lightning_lowrank.adapter.v1"


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Every adapter tensor of ``model`` (parameters and persistent buffers), keyed by
    ``"<module name>.<tensor name>"``. Frozen base weights are not included."""
    state: dict[str, Tensor] = {}
    for name, layer in adapter_layers(model).items():
        for key, value in layer.adapter_state_dict().items():
            state[f"{name}.{key}"] = value
    return state


def model_method(model: nn.Module) -> AdapterConfig:
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("the model has no adapters: call inject(model, method, ...) first")
    configs = {id(layer.config): layer.config for layer in layers.values()}
    if len(configs) > 1:
        raise ValueError("the model's adapters were injected with more than one config")
    return next(iter(configs.values()))


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    extra: dict[str, Any] | None = None,
    truncate: bool = False,
) -> Path:
    """Write the model's adapter (not the base weights) to a safetensors file, atomically.

    Args:
        model: a model with injected adapters.
        path: the file to write (conventionally ``*.safetensors``).
        extra: JSON-serialisable state to store in the metadata (used by scheduled methods).
        truncate: write each layer's :meth:`~AdapterLayer.truncated_state` (AdaLoRA: only the
            rank slots its mask keeps, physically smaller); loading rebuilds those shapes.

    Returns:
        The path written.
    """
    path = Path(path)
    layers = stored_layers(adapter_layers(model))  # disabled layers (LoRA-drop) are left out
    method = model_method(model)
    if truncate:
        parts = {n: layer.truncated_state() for n, layer in layers.items()}
        state = {f"{n}.{k}": v for n, (own, _) in parts.items() for k, v in own.items()}
        layer_meta = {n: meta for n, (_, meta) in parts.items()}
    else:
        state = adapter_state_dict(model)
        layer_meta = {n: layer.layer_metadata() for n, layer in layers.items()}
    state = stored_state(state, layers)  # a shared adapter is stored once, under its host
    # copies: a tensor may be a view into a larger one, or sit under two keys
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    metadata = {
        "format": FORMAT,
        "method": json.dumps(method.to_dict()),
        "layers": json.dumps(layer_meta),
        "extensions": json.dumps(
            {
                n: {"name": layer.extension.name, **layer.extension.metadata()}
                for n, layer in layers.items()
                if layer.extension is not None
            }
        ),
        "extra": json.dumps(extra or {}),
        "shared": json.dumps(shared_map(layers)),
        "quantization": json.dumps(quant.record(model)),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read an adapter file into ``(tensors, metadata)`` with the JSON metadata decoded.

    Raises:
        ValueError: the file is not a readable safetensors adapter written by this library.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no adapter file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupt headers/data
        raise ValueError(f"{path} is not a valid safetensors adapter file ({err})") from err
    if raw.get("format") != FORMAT:
        raise ValueError(
            f"{path} was not written by lightning_lowrank.save_adapter (format "
            f"{raw.get('format')!r}); for a PEFT adapter directory use import_peft"
        )
    try:
        meta = {
            "method": json.loads(raw["method"]),
            "layers": json.loads(raw["layers"]),
            "extra": json.loads(raw.get("extra", "{}")),
            "extensions": json.loads(raw.get("extensions", "{}")),
            "shared": json.loads(raw.get("shared", "{}")),
            "quantization": json.loads(raw.get("quantization", "{}")),
        }
    except (KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} has corrupt adapter metadata ({err})") from err
    return tensors, meta


def _check_state(expected: dict[str, Tensor], tensors: dict[str, Tensor], path: Path) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        raise ValueError(
            f"adapter file {path} does not fit this model: "
            + "; ".join(parts)
            + ". Was it saved from another model or with other target_modules?"
        )
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"adapter file {path}: {key} has shape {tuple(value.shape)} but the model expects "
                f"{tuple(expected[key].shape)} (another model size or rank?)"
            )
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"adapter file {path}: {key} holds non-finite values")


def load_adapter(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load an adapter file into ``model``.

    If the model has no adapters yet, they are injected first from the file's method config and
    layer names. Every key and shape is validated before the model is changed.

    Returns:
        The adapted module names.
    """
    path = Path(path)
    tensors, meta = read_adapter(path)
    method = config_from_dict(meta["method"])
    layer_meta: dict[str, dict[str, Any]] = meta["layers"]
    existing = stored_layers(adapter_layers(model))
    if existing:
        if sorted(existing) != sorted(layer_meta):
            raise ValueError(
                f"adapter file {path} adapts {len(layer_meta)} layers but the model has adapters on "
                f"{len(existing)} different ones: call unload(model) or load into a fresh model"
            )
        changed = [
            n for n, la in existing.items() if la.extension and not la.extension.base_is_original()
        ]
        if changed:
            raise ValueError(
                f"the base weights of {changed[:3]} were changed in place (Delta-LoRA): load "
                f"{path} into a fresh base model"
            )
        extensions = _build_extensions(existing, meta["extensions"], path)
        expected = {
            f"{n}.{k}": v
            for n, layer in existing.items()
            for k, v in layer.adapter_state_dict().items()
            if not k.startswith("extension.")
        }
        for n, ext in extensions.items():
            expected.update({f"{n}.extension.{k}": v for k, v in ext.state_dict().items()})
        if shared_map(existing) != meta["shared"]:
            raise ValueError(
                f"adapter file {path} shares adapters between layers differently from this model "
                "(LoRA-drop): load it into a fresh model"
            )
        _check_state(stored_state(expected, existing), tensors, path)
        layers = existing
        for n, layer in layers.items():
            layer.extension = extensions.get(n)
    else:
        missing = [n for n in layer_meta if not _has_submodule(model, n)]
        if missing:
            raise ValueError(
                f"adapter file {path} targets modules this model lacks (e.g. {missing[:3]}): it was "
                "saved from another model"
            )
        exact = "|".join(re.escape(n) for n in layer_meta)
        # a base recorded as quantized is quantized the same way here, if it is still dense
        plan = quant.plan_from_record(model, meta["quantization"], str(path))
        layers = build_layers(model, method, exact, layer_meta=layer_meta, quantize_plan=plan)
        if sorted(layers) != sorted(layer_meta):
            raise ValueError(f"adapter file {path} does not match this model's module names")
        for n, ext in _build_extensions(layers, meta["extensions"], path).items():
            layers[n].extension = ext  # the layers are not in the model yet
        check_shared(layers, meta["shared"], path)
        tie_from_file(layers, meta["shared"])  # the layers are not in the model yet
        expected = {
            f"{n}.{k}": v
            for n, layer in layers.items()
            for k, v in layer.adapter_state_dict().items()
        }
        _check_state(stored_state(expected, layers), tensors, path)
        attach(model, layers)
        freeze_idle(layers)  # after attach, which sets what trains from param_sides
        quant.quantize_named(model, {n: s for n, s in plan.items() if n not in layers})
    _copy_into(layers, tensors)
    return list(layers)


def _build_extensions(
    layers: dict[str, AdapterLayer], described: dict[str, dict[str, Any]], path: Path
) -> dict[str, LayerExtension]:
    """Rebuild the layer extensions an adapter file describes (not attached to the layers)."""
    extensions = {}
    for name, desc in described.items():
        desc = dict(desc)
        kind = desc.pop("name", None)
        if name not in layers or kind not in EXTENSION_TYPES:
            raise ValueError(
                f"adapter file {path} describes an unknown layer extension {kind!r} on {name!r}"
                f" (known: {sorted(EXTENSION_TYPES)}); was it written by a newer version?"
            )
        extensions[name] = EXTENSION_TYPES[kind].from_metadata(layers[name], desc)
    return extensions


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


@torch.no_grad()
def _copy_into(layers: dict[str, AdapterLayer], tensors: dict[str, Tensor]) -> None:
    for name, layer in layers.items():
        prefix = f"{name}."
        own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        state = layer.adapter_state_dict()
        for key, value in own.items():
            state[key].copy_(value.to(state[key].dtype))
