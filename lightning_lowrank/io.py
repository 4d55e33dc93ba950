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

import contextlib
import copy as _copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file
from torch import Tensor, nn

from lightning_lowrank.files import atomic_write
from lightning_lowrank.inject import adapter_layers, attach
from lightning_lowrank.metadata import (
    build_error,
    header_metadata,
    method_from_metadata,
    parse_metadata,
)
from lightning_lowrank.methods.base import (
    EXTENSION_TYPES,
    AdapterConfig,
    AdapterLayer,
    LayerExtension,
)
from lightning_lowrank.methods.layers import is_quantized, layer_kind, layer_shape
from lightning_lowrank.names import file_names, resolve_file_names
from lightning_lowrank.quant import model as quant
from lightning_lowrank.shard import needs_gather, on_rank_zero
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
        truncate: write each layer's [`truncated_state`][lightning_lowrank.AdapterLayer.truncated_state] (AdaLoRA: only the
            rank slots its mask keeps, physically smaller); loading rebuilds those shapes.

    Returns:
        The path written.

    On a model sharded with FSDP2, every rank must call it: the adapter is gathered and global
    rank 0 writes the file (the same file one process writes).
    """
    if needs_gather(model):
        return on_rank_zero(model, lambda: save_adapter(model, path, extra, truncate))
    path = Path(path)
    method = model_method(model)
    layers = stored_layers(adapter_layers(model))  # LoRA-drop's dropped layers are left out
    quantized = quant.record(model)
    # names relative to the model's root (lightning_lowrank.names), as export_peft writes them;
    # the quantisation record is named from the same root, so it fits every wrapping too
    names = file_names(model, list(dict.fromkeys([*layers, *quantized])))
    layers = {names[n]: layer for n, layer in layers.items()}
    if truncate:
        parts = {n: layer.truncated_state() for n, layer in layers.items()}
        state = {f"{n}.{k}": v for n, (own, _) in parts.items() for k, v in own.items()}
        layer_meta = {n: meta for n, (_, meta) in parts.items()}
    else:
        state = {
            f"{n}.{k}": v
            for n, layer in layers.items()
            for k, v in layer.adapter_state_dict().items()
        }
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
        "quantization": json.dumps({names[n]: facts for n, facts in quantized.items()}),
    }
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read an adapter file into ``(tensors, metadata)`` with the JSON metadata decoded.

    Raises:
        ValueError: the file is not a readable safetensors adapter written by this library.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no adapter file at {path}")
    # one read of the whole file: metadata and tensors come from the same version even while
    # another process replaces the file (adapter files are small)
    data = path.read_bytes()
    try:
        raw = header_metadata(data)
        tensors = safetensors_load(data)
    except Exception as err:  # safetensors raises its own error types for corrupt headers/data
        raise ValueError(f"{path} is not a valid safetensors adapter file ({err})") from err
    if raw.get("format") != FORMAT:
        raise ValueError(
            f"{path} was not written by lightning_lowrank.save_adapter (format "
            f"{raw.get('format')!r}); for a PEFT adapter directory use import_peft"
        )
    return tensors, parse_metadata(raw, path)


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
        want = expected[key]
        if tuple(value.shape) != tuple(want.shape):
            raise ValueError(
                f"adapter file {path}: {key} has shape {tuple(value.shape)} but the model expects "
                f"{tuple(want.shape)} (another model size or rank?)"
            )
        if _dtype_kind(value) != _dtype_kind(want):
            raise ValueError(
                f"adapter file {path}: {key} is a {value.dtype} tensor but the model holds "
                f"{want.dtype} there: the file is corrupt or was not written by save_adapter"
            )
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"adapter file {path}: {key} holds non-finite values")
        if _dtype_kind(value) == "integer" and bool((value < 0).any()):
            # the adapters' integer buffers are step counters (SingLoRA's ramp)
            raise ValueError(f"adapter file {path}: {key} holds a negative step count")


def _dtype_kind(t: Tensor) -> str:
    if t.dtype == torch.bool:
        return "bool"
    if t.is_floating_point():
        return "floating"
    return "complex" if t.is_complex() else "integer"


def load_adapter(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load an adapter file into ``model``.

    If the model has no adapters yet, they are injected first from the file's method config and
    layer names (resolved relative to the model's root, see ``names``).
    Into existing adapters the file loads only when they were built as the file says (same
    method config and per-layer facts) and are not merged. Everything is checked first, on
    stand-in layers that hold no memory (``meta`` tensors), so a refused file changes nothing
    and costs no allocation, whatever sizes its metadata claims.

    Returns:
        The adapted module names (in ``model``).
    """
    path = Path(path)
    tensors, meta = read_adapter(path)
    method = method_from_metadata(meta["method"], path)
    layer_meta: dict[str, dict[str, Any]] = meta["layers"]
    existing = stored_layers(adapter_layers(model))
    if any(layer.merged for layer in adapter_layers(model).values()):
        raise ValueError(
            f"the model's adapters are merged: call unmerge(model) before loading {path} (a "
            "later unmerge would otherwise subtract the new adapter's delta from the base)"
        )
    mapping = resolve_file_names(model, list(layer_meta)) if layer_meta else None
    if existing and (mapping is None or sorted(mapping.values()) != sorted(existing)):
        raise ValueError(
            f"adapter file {path} adapts {len(layer_meta)} layers but the model has adapters on "
            f"{len(existing)} different ones: call unload(model) or load into a fresh model"
        )
    if mapping is None:
        raise ValueError(
            f"adapter file {path} targets modules this model lacks (e.g. {list(layer_meta)[:3]}): "
            "it was saved from another model"
        )
    _check_sizes(model, meta, path)
    bases = {f: model.get_submodule(m) for f, m in mapping.items()}
    # a fresh model's bases recorded as quantized are quantized the same way, if still dense
    recorded = quant.recorded_in(model, meta["quantization"], mapping, str(path))
    plan = quant.plan_from_record(model, recorded, str(path), adapted=bool(existing))
    plan_f = {f: plan[m] for f, m in mapping.items() if m in plan}
    quant.check_method(method, bases, plan_f)
    if existing:
        bases = {f: existing[m].base for f, m in mapping.items()}
        _check_same_build({f: existing[m] for f, m in mapping.items()}, method, meta, path)
    # every check on stand-ins first: shapes come from the metadata, memory from nowhere
    _check_file(_build(method, bases, meta, path, stand_in=True), tensors, path)
    if existing:
        layers = {f: existing[m] for f, m in mapping.items()}
        for f, ext in _build_extensions(layers, meta["extensions"], path).items():
            layers[f].extension = ext
        for f, layer in layers.items():
            if f not in meta["extensions"]:
                layer.extension = None
    else:
        layers = _build(method, quant.quantize_bases(bases, plan_f), meta, path, stand_in=False)
        attach(model, {mapping[f]: layer for f, layer in layers.items()})
        freeze_idle(layers)  # after attach, which sets what trains from param_sides
        adapted = set(mapping.values())
        quant.quantize_named(model, {n: s for n, s in plan.items() if n not in adapted})
    _copy_into(layers, tensors)
    return [mapping[f] for f in layers]


#: per-layer facts that are sizes; none can exceed the model's widest layer
SIZE_FACTS = ("rank", "pair_in", "pair_out")


def _check_sizes(model: nn.Module, meta: dict[str, Any], path: Path) -> None:
    """Sizes in the metadata that the file's tensors do not show (VeRA's pair) are bounded by the
    model before anything is allocated; the others are checked on stand-ins (``_build``)."""
    widest = max((max(layer_shape(m)) for m in model.modules() if layer_kind(m)), default=0)
    for name, facts in meta["layers"].items():
        for key in SIZE_FACTS:
            value = facts.get(key)
            if value is not None and (not isinstance(value, int) or not 0 <= value <= widest):
                raise ValueError(
                    f"adapter file {path}: layer {name!r} claims {key}={value!r}, but this "
                    f"model's widest layer has {widest} features: the file is corrupt or from "
                    "another model"
                )


def _stand_in(base: nn.Module) -> nn.Module:
    """A copy of a base layer whose tensors are ``meta`` (same shapes and dtypes, no memory); a
    quantized base stands in as a dense ``nn.Linear`` in its compute dtype (what adapters see)."""
    if is_quantized(base):
        return quant.meta_linear(base)
    copy = _copy.copy(base)
    copy._parameters = {
        k: None if v is None else nn.Parameter(torch.empty_like(v, device="meta"), v.requires_grad)
        for k, v in base._parameters.items()
    }
    copy._buffers = {
        k: None if v is None else torch.empty_like(v, device="meta")
        for k, v in base._buffers.items()
    }
    return copy


def _build(
    method: AdapterConfig,
    bases: dict[str, nn.Module],
    meta: dict[str, Any],
    path: Path,
    stand_in: bool,
) -> dict[str, AdapterLayer]:
    """The layers, extensions and sharing a file describes, keyed by the file's names (which
    also seed what names seed, e.g. SLTrain's supports); on stand-ins when ``stand_in``."""
    if stand_in:
        bases = {f: _stand_in(b) for f, b in bases.items()}
    for name, base in bases.items():
        method.validate_layer(name, base)
    try:
        with torch.device("meta") if stand_in else contextlib.nullcontext():
            layers = method.build(bases, meta["layers"])
            for f, ext in _build_extensions(layers, meta["extensions"], path).items():
                layers[f].extension = ext
    except TypeError as err:  # a per-layer fact this version's layers do not take
        raise build_error(path, err) from err
    check_shared(layers, meta["shared"], path)
    tie_from_file(layers, meta["shared"])  # the layers are not in the model yet
    return layers


def _check_file(layers: dict[str, AdapterLayer], tensors: dict[str, Tensor], path: Path) -> None:
    expected = {
        f"{n}.{k}": v for n, layer in layers.items() for k, v in layer.adapter_state_dict().items()
    }
    _check_state(stored_state(expected, layers), tensors, path)


def _check_same_build(
    layers: dict[str, AdapterLayer], method: AdapterConfig, meta: dict[str, Any], path: Path
) -> None:
    """Existing adapters take a file's tensors only if they were built as the file says."""
    layer_meta, shared = meta["layers"], meta["shared"]
    for name, layer in layers.items():
        if layer.config.to_dict() != method.to_dict():
            raise ValueError(
                f"adapter file {path} was written with {method!r}, but the model's adapters are "
                f"{layer.config!r}: call unload(model) and load the file into the plain model"
            )
        if layer.layer_metadata() != layer_meta.get(name, {}):
            raise ValueError(
                f"adapter file {path} describes layer {name!r} as {layer_meta.get(name, {})}, the "
                f"model's adapter as {layer.layer_metadata()} (per-layer rank, alpha, seed or "
                "support): call unload(model) and load the file into the plain model"
            )
        if layer.extension is not None and not layer.extension.base_is_original():
            raise ValueError(
                f"the base weight of {name!r} was changed in place (Delta-LoRA): load {path} "
                "into a fresh base model"
            )
    if shared_map(layers) != shared:
        raise ValueError(
            f"adapter file {path} shares adapters between layers differently from this model "
            "(LoRA-drop): load it into a fresh model"
        )


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


@torch.no_grad()
def _copy_into(layers: dict[str, AdapterLayer], tensors: dict[str, Tensor]) -> None:
    for name, layer in layers.items():
        prefix = f"{name}."
        own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        state = layer.adapter_state_dict()
        for key, value in own.items():
            state[key].copy_(value.to(state[key].dtype))
