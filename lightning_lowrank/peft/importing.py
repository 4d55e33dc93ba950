"""PEFT import: check a PEFT LoRA or DoRA adapter against the model, then inject and fill it."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_lowrank.inject import adapter_layers, attach, build_layers
from lightning_lowrank.methods.base import layer_kind, layer_shape
from lightning_lowrank.methods.dora import DoRA
from lightning_lowrank.methods.lora import LoRA
from lightning_lowrank.peft.files import KEY_PREFIX, SUFFIXES, check_config, read_peft
from lightning_lowrank.peft.names import (
    absolute,
    check_root,
    has_module,
    import_root,
    pattern_value,
)


@dataclass
class _Planned:
    name: str  # absolute module name in the model
    kind: str
    tensors: dict[str, Tensor]  # "A", "B", optionally "m"
    rank: int
    alpha: float


def _plan(
    model: nn.Module,
    config: dict[str, Any],
    tensors: dict[str, Tensor],
    directory: Path,
    root: str | None,
) -> tuple[str, dict[str, _Planned], dict[str, Tensor]]:
    """Check every key, shape and value against the model; change nothing."""
    bad = [k for k in tensors if not k.startswith(KEY_PREFIX)]
    if bad:
        raise ValueError(
            f"{directory}: keys {bad[:3]} do not start with {KEY_PREFIX!r}: not a PEFT LoRA file"
        )
    grouped: dict[str, dict[str, Tensor]] = {}
    others: dict[str, Tensor] = {}
    for key, value in tensors.items():
        key = key[len(KEY_PREFIX) :]
        for suffix in SUFFIXES:
            if key.endswith("." + suffix):
                module = key[: -len(suffix) - 1]
                grouped.setdefault(module, {})[suffix] = value
                break
        else:
            others[key] = value
    if not grouped:
        raise ValueError(f"{directory} holds no LoRA tensors")
    root = import_root(model, list(grouped), root)
    dora = bool(config.get("use_dora", False))
    r0, alpha0 = int(config["r"]), float(config["lora_alpha"])
    rank_pattern, alpha_pattern = (
        config.get("rank_pattern") or {},
        config.get("alpha_pattern") or {},
    )

    planned: dict[str, _Planned] = {}
    for module, parts in grouped.items():
        name = absolute(module, root)
        if not has_module(model, name):
            raise ValueError(
                f"{directory} adapts {module!r}, which this model lacks (looked under "
                f"root={root!r}): load it into the base model the adapter was trained on, or pass "
                "root=<submodule> if it was trained on a part of this model (e.g. its backbone)"
            )
        base = model.get_submodule(name)
        kind = layer_kind(base)
        if kind is None:
            raise ValueError(
                f"{directory} adapts {module!r}, a {type(base).__name__}: only nn.Linear, Conv1D and "
                "nn.Embedding layers can be loaded here; merge the adapter in PEFT instead"
            )
        family = "embedding" if kind == "embedding" else "linear"
        prefix = "lora_embedding_" if family == "embedding" else "lora_"
        a_key = f"{prefix}A" if family == "embedding" else "lora_A.weight"
        b_key = f"{prefix}B" if family == "embedding" else "lora_B.weight"
        m_keys = [k for k in parts if SUFFIXES[k] == "m"]
        expected = {a_key, b_key} | (
            {m_keys[0] if m_keys else "lora_magnitude_vector"} if dora else set()
        )
        if set(parts) != expected:
            raise ValueError(
                f"{directory}: {module!r} ({kind}) has tensors {sorted(parts)} but "
                f"{sorted(expected)} are expected (use_dora={dora})"
            )
        out_f, in_f = layer_shape(base)
        a, b = parts[a_key], parts[b_key]
        rank = int(a.shape[0]) if a.dim() == 2 else -1
        want: dict[str, tuple[int, ...]] = {a_key: (rank, in_f), b_key: (out_f, rank)}
        if dora:
            want[m_keys[0]] = (out_f,)
        for key, shape in want.items():
            value = parts[key]
            if tuple(value.shape) != shape or rank < 1:
                raise ValueError(
                    f"{directory}: {module}.{key} has shape {tuple(value.shape)}, but the layer "
                    f"(out={out_f}, in={in_f}) needs {shape}: another base model size?"
                )
            if not value.is_floating_point() or not torch.isfinite(value).all():
                raise ValueError(
                    f"{directory}: {module}.{key} holds non-finite or non-float values"
                )
        if int(pattern_value(rank_pattern, module, r0)) != rank:
            raise ValueError(
                f"{directory}: {module} has rank {rank} in the weights but "
                f"{pattern_value(rank_pattern, module, r0)} in adapter_config (r / rank_pattern)"
            )
        planned[name] = _Planned(
            name=name,
            kind=kind,
            tensors={"A": a, "B": b, **({"m": parts[m_keys[0]]} if dora else {})},
            rank=rank,
            alpha=float(pattern_value(alpha_pattern, module, alpha0)),
        )

    # modules_to_save: whole modules (e.g. a classifier head) stored under their own names;
    # "<layer>.base_layer.<p>": an adapted layer's own base tensors (PEFT's save_embedding_layers)
    state = check_root(model, root).state_dict()
    save = config.get("modules_to_save") or []
    extra: dict[str, Tensor] = {}
    # tensors tied to an adapted layer's base weight (GPT-2's lm_head, saved next to wte's
    # base_layer by save_embedding_layers): the same storage, so the same value
    base_ptrs = {
        state[f"{m}.{p}"].data_ptr(): f"{m}.{p}"
        for m in grouped
        for p in ("weight", "bias")
        if f"{m}.{p}" in state
    }
    for key, value in others.items():
        module, _, param = key.rpartition(".")
        tied = (
            base_ptrs.get(state[key].data_ptr()) if key in state and module not in grouped else None
        )
        if module.endswith(".base_layer") and module[: -len(".base_layer")] in grouped:
            target = module[: -len(".base_layer")] + "." + param
        elif tied is not None:
            target = tied
        elif module in grouped:
            raise ValueError(
                f"{directory}: {KEY_PREFIX + key!r} is the base weight of an adapted layer; a "
                "LoRA adapter carries no base weights: load the matching base model instead"
            )
        elif any(
            module == e or module.startswith(e + ".") or ("." + e + ".") in f".{module}."
            for e in save
        ):
            target = key
        else:
            raise ValueError(
                f"{directory}: unexpected key {KEY_PREFIX + key!r}: neither a LoRA tensor, an "
                "adapted layer's base_layer tensor nor part of modules_to_save "
                f"({save}); nothing was changed"
            )
        if target not in state:
            raise ValueError(
                f"{directory}: unexpected key {KEY_PREFIX + key!r}: not a parameter of this model"
            )
        if tuple(value.shape) != tuple(state[target].shape):
            raise ValueError(
                f"{directory}: {key} has shape {tuple(value.shape)} but the model's is "
                f"{tuple(state[target].shape)}"
            )
        if not value.is_floating_point() or not torch.isfinite(value).all():
            raise ValueError(f"{directory}: {key} holds non-finite or non-float values")
        if absolute(target, root) in extra and not torch.equal(
            extra[absolute(target, root)], value
        ):
            raise ValueError(f"{directory}: {key} and the tensor tied to it hold different values")
        extra[absolute(target, root)] = value
    return root, planned, extra


def _method(config: dict[str, Any]) -> LoRA | DoRA:
    kwargs: dict[str, Any] = {
        "rank": int(config["r"]),
        "alpha": float(config["lora_alpha"]),
        "dropout": float(config.get("lora_dropout", 0.0) or 0.0),
        "scaling": "rslora" if config.get("use_rslora", False) else "standard",
    }
    return DoRA(**kwargs) if config.get("use_dora", False) else LoRA(**kwargs)


def import_peft(
    model: nn.Module, directory: str | os.PathLike, root: str | None = None
) -> list[str]:
    """Load a PEFT LoRA or DoRA adapter directory into ``model``.

    Injects the matching adapters (``LoRA`` or ``DoRA`` with PEFT's ``r``, ``lora_alpha``,
    ``lora_dropout`` and ``use_rslora``; per-layer ranks and alphas from ``rank_pattern`` /
    ``alpha_pattern``) into the modules named in the file, copies the factors in, and loads the
    whole modules of ``modules_to_save`` (left trainable). Every key, shape and value is checked
    before the model is changed: a file that does not fit raises and leaves the model untouched.

    Args:
        model: a model without adapters, holding the base model the adapter was trained on.
        directory: a PEFT adapter directory (``adapter_config.json`` and
            ``adapter_model.safetensors``).
        root: the submodule that PEFT's names are relative to; default: the outermost transformers
            model inside ``model`` (``model`` itself if it holds none).

    Returns:
        The adapted module names (qualified from ``model``).
    """
    directory = Path(directory)
    config, tensors = read_peft(directory)
    check_config(config, directory)
    if adapter_layers(model):
        raise ValueError(
            "the model already has adapters: call unload(model) or import into a fresh base model"
        )
    root, planned, extra = _plan(model, config, tensors, directory, root)
    method = _method(config)
    layer_meta = {
        n: {
            **({"rank": p.rank} if p.rank != method.rank else {}),
            **({"alpha": p.alpha} if p.alpha != method.alpha else {}),
        }
        for n, p in planned.items()
    }
    exact = "|".join(re.escape(n) for n in planned)
    layers = build_layers(model, method, exact, layer_meta=layer_meta)
    names = {"A": "lora_A", "B": "lora_B", "m": "magnitude"}
    for name, p in planned.items():
        own = layers[name].adapter_state_dict()
        for part, value in p.tensors.items():
            if tuple(own[names[part]].shape) != tuple(value.shape):
                raise ValueError(f"{directory}: {name} does not fit the layer built for it")
    # an adapted layer's base tensors live under "<layer>.base." once attached; they stay frozen
    moved = {
        (
            f"{k.rpartition('.')[0]}.base.{k.rpartition('.')[2]}"
            if k.rpartition(".")[0] in planned
            else k
        ): v
        for k, v in extra.items()
    }
    owners = sorted({k.rpartition(".")[0] for k in extra if k.rpartition(".")[0] not in planned})
    extra = moved
    attach(model, layers, train_modules=None)
    with torch.no_grad():
        for name, p in planned.items():
            own = layers[name].adapter_state_dict()
            for part, value in p.tensors.items():
                own[names[part]].copy_(value.to(own[names[part]].dtype))
        state = model.state_dict()
        for key, value in extra.items():
            state[key].copy_(value.to(state[key].dtype))
    for owner in owners:
        for param in model.get_submodule(owner).parameters():
            param.requires_grad_(True)
    return list(layers)
