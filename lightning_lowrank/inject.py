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

from lightning_lowrank.methods.base import AdapterConfig, AdapterLayer, check_int, layer_kind
from lightning_lowrank.methods.layers import is_quantized
from lightning_lowrank.names import file_names
from lightning_lowrank.quant import model as quant
from lightning_lowrank.quant.spec import QuantizeSpec, resolve

TargetSpec = str | Sequence[str]

#: last name components treated as an output head by ``"all-linear"``
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "head")


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """All adapter layers of ``model``, keyed by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def check_target_spec(argument: str, spec: object, optional: bool = False) -> None:
    """Raise a ``ValueError`` naming the fix unless ``spec`` is a selection this module reads:
    a string (a regex, or ``"all-linear"``) or a list/tuple of module names."""
    if spec is None and optional:
        return
    if isinstance(spec, str):
        return
    if isinstance(spec, (list, tuple)) and all(isinstance(e, str) for e in spec):
        return
    raise ValueError(
        f"{argument} must be a regex string, 'all-linear' or a list of module names such as "
        f"['query', 'value'], got {spec!r} ({type(spec).__name__})"
    )


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
    check_target_spec("target_modules", target_modules)
    check_target_spec("exclude_modules", exclude_modules, optional=True)
    named = [(n, m) for n, m in model.named_modules() if n]
    if target_modules == "all-linear":
        heads = _output_head_names(model)
        selected = {
            n: m
            for n, m in named
            if layer_kind(m) in ("linear", "conv1d")
            and n not in heads
            and _direct_reader(model, n) is None  # cannot be wrapped: left as they are
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
    readers = {n: _direct_reader(model, n) for n in selected}
    blocked = {n: r for n, r in readers.items() if r is not None}
    if blocked:
        shown = ", ".join(f"{n} (inside {r})" for n, r in list(blocked.items())[:4])
        raise ValueError(
            f"target_modules matched layers whose parent reads their weight directly instead of "
            f"calling them: {shown}. An adapter there would crash the forward or be bypassed; "
            "exclude them with exclude_modules, or build the attention from plain nn.Linear "
            "layers (as transformers models do)"
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


#: module types whose forward reads a child layer's ``weight`` directly (PyTorch's fused attention
#: and encoder-layer fast paths) instead of calling the child: wrapping that child cannot work
DIRECT_READERS: tuple[type[nn.Module], ...] = (nn.MultiheadAttention, nn.TransformerEncoderLayer)


def _direct_reader(model: nn.Module, name: str) -> str | None:
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    return type(parent).__name__ if isinstance(parent, DIRECT_READERS) else None


def _matched_train_modules(model: nn.Module, train_modules: Sequence[str] | None) -> list[str]:
    """The names ``train_modules`` selects; a ``ValueError`` naming the fix if it selects none."""
    if not train_modules:
        return []
    if isinstance(train_modules, str):
        raise ValueError(f"train_modules must be a list of module names, got {train_modules!r}")
    names = [n for n, _ in model.named_modules() if n and _matches(n, list(train_modules))]
    if not names:
        candidates = [n for n, _ in model.named_children()]
        raise ValueError(
            f"train_modules={list(train_modules)!r} matched no module (the model's top-level "
            f"modules are {candidates[:12]}): nothing was changed"
        )
    return names


def _tied_users(model: nn.Module, layers: dict[str, AdapterLayer]) -> dict[str, list[str]]:
    """For each layer, the other parameter names that hold its base weight (tied weights)."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    tied = {}
    for name, layer in layers.items():
        w = getattr(layer.base, "weight", None)
        if isinstance(w, nn.Parameter):
            others = [n for n in owners.get(id(w), []) if not n.startswith(f"{name}.base.")]
            if others:
                tied[name] = others
    return tied


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
        target_modules: which layers to adapt (see [the matching rules][lightning_lowrank.inject]).
        exclude_modules: layers to leave alone, with the same matching rules.
        train_modules: modules left fully trainable (e.g. a freshly initialised classifier head),
            matched like a list of ``target_modules``.
        layer_meta: per-layer keyword arguments for rebuilding layers from an adapter file.
        quantize_base: ``"nf4"`` (or ``lightning_lowrank.quant.NF4``) stores the adapted
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
    _matched_train_modules(model, train_modules)  # refuse a typo before anything changes
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
    # built under the names adapter files use (relative to the model's root), so what a name
    # seeds (SLTrain's supports) is the same in every wrapping of the model and after loading
    names = file_names(model, list(targets))
    meta = {names[n]: facts for n, facts in (layer_meta or {}).items() if n in names}
    built = method.build({names[n]: base for n, base in targets.items()}, meta)
    return {n: built[names[n]] for n in targets}


def attach(
    model: nn.Module, layers: dict[str, AdapterLayer], train_modules: Sequence[str] | None = None
) -> None:
    """Swap built adapter layers into ``model`` and set which parameters train.

    A base weight tied to another module (GPT-2's ``wte`` and ``lm_head``) is recorded in the
    layer's ``tied_with``: merging or updating it in place first gives the layer its own copy
    (``own_base_weight``), so the other module
    keeps computing with the original weight, as it does while the adapter is unmerged."""
    train_names = _matched_train_modules(model, train_modules)  # before anything changes
    for name, layer in layers.items():
        _set_submodule(model, name, layer)
        layer.on_attach()
    for name, others in _tied_users(model, layers).items():
        layers[name].tied_with = others
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers.values():
        trainable = layer.param_sides()
        for n, p in layer.named_parameters():
            if n in trainable:
                p.requires_grad_(True)
    for name in train_names:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)


def _iter_layers(model: nn.Module) -> Iterator[AdapterLayer]:
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("the model has no adapters: call inject(model, method, ...) first")
    yield from layers.values()


def merge(model: nn.Module) -> None:
    """Fold every adapter's delta into its base weight (inference runs at the base model's cost).

    Every layer is checked first (``check_merge``): if one would put non-finite
    values into its base weight, or its base is quantized (use ``unload`` with a ``dtype``), a
    ``ValueError`` is raised and no layer is merged. A tied base
    weight gets its own copy first (see ``attach``), and a transformers config that declares
    the tie (``tie_word_embeddings``) is updated, so ``save_pretrained`` writes both weights."""
    layers = list(_iter_layers(model))
    for layer in layers:
        layer.check_merge()
    untied = any(layer.tied_with for layer in layers if not layer.merged)
    for layer in layers:
        layer.merge()
    if untied:
        _untie_configs(model)


def _untie_configs(model: nn.Module) -> None:
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False


def unmerge(model: nn.Module) -> None:
    """Undo [`merge`][lightning_lowrank.merge], restoring the base weights to float tolerance."""
    for layer in _iter_layers(model):
        layer.unmerge()


def set_step(model: nn.Module, step: int) -> None:
    """Tell every adapter layer how many optimizer steps were taken (SingLoRA's ramp ``u(t)``).

    ``LowRankCallback`` does this once per optimizer step; call it yourself in a plain training
    loop (after each ``optimizer.step()``) or before inference at a chosen point of the ramp."""
    step = check_int("step", step, minimum=0)
    for layer in _iter_layers(model):
        layer.set_step(step)


def unload(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Merge every adapter and put the plain base layers back. Returns ``model``.

    As in ``merge``, every layer is checked before any is changed, and tied weights are
    untied (the config too), so the unloaded model computes what the adapted one did.

    A quantized base is never requantized: its layer becomes a plain ``nn.Linear`` holding
    ``W = dequantize(W0) + dW`` (summed in float32 or wider), in ``dtype`` or, by default, the
    base's compute dtype. With ``dtype``, the other unloaded layers are cast to it as well.
    """
    layers = adapter_layers(model)
    for layer in layers.values():
        if not (is_quantized(layer.base) and not layer.merged):
            layer.check_merge()
    # the plain layers of quantized bases are built (and checked) before any layer changes
    built = {
        name: quant.unloaded_linear(layer, dtype, name)
        for name, layer in layers.items()
        if is_quantized(layer.base) and not layer.merged
    }
    untied = any(layer.tied_with for layer in layers.values() if not layer.merged)
    for name, layer in layers.items():
        plain: nn.Module
        if name in built:
            plain = built[name]
        else:
            layer.merge()
            plain = layer.base if dtype is None else layer.base.to(dtype)
        _set_submodule(model, name, plain)
    if untied:
        _untie_configs(model)
    return model


def trainable_parameter_count(model: nn.Module) -> int:
    """Number of parameters that require a gradient and take part in the output. Shared tensors
    are counted once; the idle parameters of disabled and tied layers
    (``AdapterLayer.idle_parameters``: LoRA-drop's dropped layers and the members of a shared
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
