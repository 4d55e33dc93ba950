"""Find target layers, wrap them in adapters, freeze the rest; merge, unmerge and unload.

Target selection (``target_modules`` and ``exclude_modules``):

- a list of names matches a module whose qualified name equals an entry or ends with ``"." + entry``;
- a single string is a regular expression, full-matched against qualified names;
- ``"all-linear"`` adapts every linear layer (``nn.Linear`` and GPT-2's ``Conv1D``) except the output
  head (the model's output embeddings and layers named ``lm_head``, ``classifier``, ``score``,
  ``qa_outputs`` or ``head``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from lightning_lowrank.methods.base import (
    AdapterConfig,
    AdapterLayer,
    layer_kind,
    refuse_quantized_merge,
)
from lightning_lowrank.methods.layers import is_quantized
from lightning_lowrank.quant import model as quant
from lightning_lowrank.quant.spec import QuantizeSpec, resolve

TargetSpec = str | Sequence[str]

#: last name components treated as an output head by ``"all-linear"``
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "head")


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """All adapter layers of ``model``, keyed by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def _matches(name: str, spec: TargetSpec) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in spec)


def _output_head_names(model: nn.Module) -> set[str]:
    heads = {n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in HEAD_NAMES}
    for prefix, module in model.named_modules():
        get_out = getattr(module, "get_output_embeddings", None)
        if callable(get_out):
            try:
                out = get_out()
            except Exception:  # some models raise when they have no head
                continue
            for n, m in module.named_modules():
                if m is out and out is not None:
                    heads.add(f"{prefix}.{n}" if prefix else n)
    return heads


def find_targets(
    model: nn.Module, target_modules: TargetSpec, exclude_modules: TargetSpec | None = None
) -> dict[str, nn.Module]:
    """The modules that ``target_modules`` selects, minus ``exclude_modules``.

    Raises:
        ValueError: nothing matched (the message lists some candidate names) or a matched module
            is of a type no adapter supports.
    """
    named = [(n, m) for n, m in model.named_modules() if n]
    if target_modules == "all-linear":
        heads = _output_head_names(model)
        selected = {
            n: m for n, m in named if layer_kind(m) in ("linear", "conv1d") and n not in heads
        }
    else:
        if isinstance(target_modules, str):
            try:
                re.compile(target_modules)
            except re.error as err:
                raise ValueError(
                    f"target_modules {target_modules!r} is not a valid regex: {err}"
                ) from err
        selected = {n: m for n, m in named if _matches(n, target_modules)}
    if exclude_modules:
        selected = {n: m for n, m in selected.items() if not _matches(n, exclude_modules)}
    if not selected:
        candidates = [n for n, m in named if layer_kind(m) is not None]
        shown = ", ".join(candidates[:12]) + (", ..." if len(candidates) > 12 else "")
        raise ValueError(
            f"no module matched target_modules={target_modules!r}"
            + (f" (exclude_modules={exclude_modules!r})" if exclude_modules else "")
            + f". Layers that can be adapted include: {shown or 'none'}"
        )
    unsupported = {n: type(m).__name__ for n, m in selected.items() if layer_kind(m) is None}
    if unsupported:
        shown = ", ".join(f"{n} ({t})" for n, t in list(unsupported.items())[:8])
        raise ValueError(
            f"target_modules matched modules that cannot be adapted: {shown}. Adapters wrap "
            "nn.Linear, transformers' Conv1D and nn.Embedding: name those layers, e.g. "
            "target_modules=['query', 'value'], or a regex ending in the layer's own name"
        )
    return selected


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject(
    model: nn.Module,
    method: AdapterConfig,
    target_modules: TargetSpec = "all-linear",
    exclude_modules: TargetSpec | None = None,
    train_modules: Sequence[str] | None = None,
    layer_meta: dict | None = None,
    quantize_base: QuantizeSpec = None,
) -> list[str]:
    """Wrap the selected layers of ``model`` in adapters, in place, and freeze everything else.

    Args:
        model: any ``nn.Module`` (a LightningModule, a transformers model, a plain module).
        method: a method config such as ``LoRA(rank=8, alpha=16)``.
        target_modules: which layers to adapt (see the module docstring).
        exclude_modules: layers to leave alone, with the same matching rules.
        train_modules: modules left fully trainable (e.g. a freshly initialised classifier head),
            matched like a list of ``target_modules``.
        layer_meta: per-layer keyword arguments for rebuilding layers from an adapter file.
        quantize_base: ``"nf4"`` (or :class:`~lightning_lowrank.quant.NF4`) stores the adapted
            layers' frozen weights in 4-bit NF4 (bitsandbytes ``Linear4bit``) before the adapters
            are built; ``NF4(frozen_linear=True)`` also quantizes the other frozen linear layers
            except the output head. Layers already quantized by bitsandbytes are adapted as
            they are, with or without this argument.

    Returns:
        The qualified names of the adapted modules.
    """
    if adapter_layers(model):
        raise ValueError(
            "adapters are already injected into this model: call unload(model) first, or load a "
            "saved adapter with load_adapter(model, path)"
        )
    spec = resolve(quantize_base)
    plan = {n: spec for n in find_targets(model, target_modules, exclude_modules)} if spec else {}
    layers = build_layers(model, method, target_modules, exclude_modules, layer_meta, plan)
    attach(model, layers, train_modules)
    if spec is not None:
        heads = _output_head_names(model)
        quant.quantize_named(model, quant.frozen_linear_plan(model, spec, heads, set(layers)))
    return list(layers)


def build_layers(
    model: nn.Module,
    method: AdapterConfig,
    target_modules: TargetSpec,
    exclude_modules: TargetSpec | None = None,
    layer_meta: dict | None = None,
    quantize_plan: quant.Plan | None = None,
) -> dict[str, AdapterLayer]:
    """Create the adapter layers for ``model`` without attaching them (the model is unchanged).

    The targets ``quantize_plan`` names get quantized copies of their base layers."""
    if not isinstance(method, AdapterConfig):
        raise TypeError(
            f"method must be a method config such as LoRA(rank=8), got {type(method).__name__}"
        )
    targets = find_targets(model, target_modules, exclude_modules)
    for name, base in targets.items():
        method.validate_layer(name, base)
    quant.check_method(method, targets, quantize_plan or {})
    if quantize_plan:
        targets = quant.quantize_bases(targets, quantize_plan)
    return method.build(targets, layer_meta)


def attach(
    model: nn.Module, layers: dict[str, AdapterLayer], train_modules: Sequence[str] | None = None
) -> None:
    """Swap built adapter layers into ``model`` and set which parameters train."""
    for name, layer in layers.items():
        _set_submodule(model, name, layer)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers.values():
        trainable = layer.param_sides()
        for n, p in layer.named_parameters():
            if n in trainable:
                p.requires_grad_(True)
    if train_modules:
        matched = [m for n, m in model.named_modules() if n and _matches(n, list(train_modules))]
        if not matched:
            raise ValueError(f"train_modules={list(train_modules)!r} matched no module")
        for m in matched:
            for p in m.parameters():
                p.requires_grad_(True)


def _iter_layers(model: nn.Module) -> Iterator[AdapterLayer]:
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("the model has no adapters: call inject(model, method, ...) first")
    yield from layers.values()


def merge(model: nn.Module) -> None:
    """Fold every adapter's delta into its base weight (inference runs at the base model's cost).

    Raises:
        ValueError: a base is quantized (use :func:`unload` with a ``dtype``); nothing is merged.
    """
    layers = list(_iter_layers(model))
    for layer in layers:
        if not layer.merged:
            refuse_quantized_merge(layer)
    for layer in layers:
        layer.merge()


def unmerge(model: nn.Module) -> None:
    """Undo :func:`merge`, restoring the base weights to float tolerance."""
    for layer in _iter_layers(model):
        layer.unmerge()


def set_step(model: nn.Module, step: int) -> None:
    """Tell every adapter layer how many optimizer steps were taken (SingLoRA's ramp ``u(t)``).

    ``LowRankCallback`` does this once per optimizer step; call it yourself in a plain training
    loop (after each ``optimizer.step()``) or before inference at a chosen point of the ramp."""
    for layer in _iter_layers(model):
        layer.set_step(step)


def unload(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Merge every adapter and put plain base layers back. Returns ``model``.

    A quantized base is never requantized: its layer becomes a plain ``nn.Linear`` holding
    ``W = dequantize(W0) + dW`` (summed in float32 or wider), in ``dtype`` or, by default, the
    base's compute dtype. With ``dtype``, the other unloaded layers are cast to it as well.
    """
    for name, layer in list(adapter_layers(model).items()):
        plain: nn.Module
        if is_quantized(layer.base) and not layer.merged:
            plain = quant.unloaded_linear(layer, dtype)
        else:
            layer.merge()
            plain = layer.base if dtype is None else layer.base.to(dtype)
        _set_submodule(model, name, plain)
    return model


def trainable_parameter_count(model: nn.Module) -> int:
    """Number of parameters that require a gradient and take part in the output. Shared tensors
    are counted once; the idle parameters of disabled and tied layers
    (:meth:`AdapterLayer.idle_parameters`: LoRA-drop's dropped layers and the members of a shared
    adapter) are not counted."""
    idle = {id(p) for layer in adapter_layers(model).values() for p in layer.idle_parameters()}
    seen: set[object] = set()
    total = 0
    for p in model.parameters():
        if not p.requires_grad or id(p) in idle:
            continue
        ptr = p.data_ptr()
        key = (ptr, p.storage_offset(), tuple(p.shape), p.stride()) if ptr else id(p)
        if key not in seen:
            seen.add(key)
            total += p.numel()
    return total
