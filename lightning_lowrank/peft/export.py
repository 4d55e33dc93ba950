"""PEFT export: each layer's PEFT form (``AdapterLayer.peft_form``), assembled into one config."""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from lightning_lowrank.files import replace_directory_files
from lightning_lowrank.inject import adapter_layers
from lightning_lowrank.methods.base import AdapterLayer, PeftExportError, PeftLayer
from lightning_lowrank.peft.files import CONFIG_NAME, KEY_PREFIX, WEIGHTS_NAME
from lightning_lowrank.peft.names import (
    check_root,
    export_root,
    inside,
    pattern_value,
    relative,
    target_modules,
)
from lightning_lowrank.quant.model import record as quant_record
from lightning_lowrank.shard import needs_gather, on_rank_zero


def _peft_form(name: str, layer: AdapterLayer) -> PeftLayer | None:
    """The exact PEFT LoRA form of one layer; ``None`` when its update is zero by construction
    (a disabled layer, as LoRA-drop drops them; an AdaLoRA layer with every slot pruned)."""
    if getattr(layer, "extension", None) is not None:
        raise PeftExportError(
            f"layer {name!r} carries a {type(layer.extension).__name__} extension (Delta-LoRA): "
            "it changes the base weight itself, which a PEFT adapter cannot carry. Call "
            "unload(model) and save the merged model (save_pretrained) instead"
        )
    if layer.disabled:
        return None
    try:
        return layer.peft_form()
    except PeftExportError as err:
        raise PeftExportError(f"layer {name!r}: {err}") from None


def _modules_to_save(
    model: nn.Module, root: str, adapted: list[str]
) -> tuple[list[str], dict[str, Tensor]]:
    """Trainable modules outside the adapters (e.g. a new classifier head): PEFT's
    ``modules_to_save``, written whole. Returns their names and tensors, relative to ``root``."""
    owners: set[str] = set()
    for pname, p in model.named_parameters():
        if not p.requires_grad or any(inside(pname, a) for a in adapted):
            continue
        owner = pname.rpartition(".")[0]
        if not inside(owner, root) or owner == root:
            warnings.warn(
                f"trainable parameter {pname!r} is not in a submodule of {root or 'the model'!r}: "
                "PEFT's modules_to_save cannot hold it, so it is not exported",
                stacklevel=3,
            )
            continue
        owners.add(owner)
    tensors: dict[str, Tensor] = {}
    for owner in sorted(owners):
        if any(inside(a, owner) for a in adapted):
            raise PeftExportError(
                f"module {owner!r} has trainable parameters and also contains adapted layers: "
                "PEFT saves such a module whole, adapters included. Freeze its own parameters or "
                "unload(model) and save the merged model"
            )
        for key, value in model.get_submodule(owner).state_dict().items():
            tensors[f"{relative(owner, root)}.{key}"] = value
    return [relative(o, root) for o in sorted(owners)], tensors


def _patterns(
    forms: dict[str, PeftLayer], r: int, alpha: float
) -> tuple[dict[str, int], dict[str, float]]:
    """``rank_pattern`` and ``alpha_pattern`` for the layers whose rank or alpha is not the
    default. PEFT's keys are regexes matched at the end of a name, so a plain name can also match
    a layer whose name ends with it; then every key is anchored (``^`` and escaped)."""
    for anchored in (False, True):
        key = (lambda n: "^" + re.escape(n)) if anchored else (lambda n: n)
        ranks = {key(n): f.rank for n, f in forms.items() if f.rank != r}
        alphas = {key(n): f.alpha for n, f in forms.items() if f.alpha != alpha}
        if all(
            pattern_value(ranks, n, r) == f.rank and pattern_value(alphas, n, alpha) == f.alpha
            for n, f in forms.items()
        ):
            return ranks, alphas
    raise PeftExportError("the per-layer ranks cannot be written as PEFT patterns")  # unreachable


def peft_adapter(
    model: nn.Module, root: str | None = None
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The model's adapter as PEFT's ``(adapter_config, tensors)``, without writing anything.

    Raises:
        PeftExportError: a layer's method has no exact PEFT form (the message says what to do).
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("the model has no adapters: call inject(model, method, ...) first")
    adapted = list(layers)
    root = export_root(model, adapted, root)
    with torch.no_grad():
        found = {relative(n, root): _peft_form(n, layer) for n, layer in layers.items()}
    forms = {n: f for n, f in found.items() if f is not None}
    if not forms:
        raise PeftExportError(
            "every adapted layer has a zero update (rank 0 after pruning): there is nothing to export"
        )
    flags = {(f.rslora, f.magnitude is not None) for f in forms.values()}
    if len(flags) > 1:
        raise PeftExportError(
            "the layers mix scaling rules or DoRA with plain LoRA, which one PEFT config cannot "
            "express: export each part separately or unload(model) and save the merged model"
        )
    rslora, dora = flags.pop()

    # the most common rank and alpha are the defaults; the other layers go into the patterns
    r = Counter(f.rank for f in forms.values()).most_common(1)[0][0]
    alpha = Counter(f.alpha for f in forms.values()).most_common(1)[0][0]
    rank_pattern, alpha_pattern = _patterns(forms, r, alpha)
    root_module = check_root(model, root)
    save_names, save_tensors = _modules_to_save(model, root, adapted)

    tensors: dict[str, Tensor] = {}
    for name, f in forms.items():
        key = KEY_PREFIX + name
        if f.kind == "embedding":
            tensors[f"{key}.lora_embedding_A"] = f.lora_A
            tensors[f"{key}.lora_embedding_B"] = f.lora_B
        else:
            tensors[f"{key}.lora_A.weight"] = f.lora_A
            tensors[f"{key}.lora_B.weight"] = f.lora_B
        if f.magnitude is not None:
            tensors[f"{key}.lora_magnitude_vector"] = f.magnitude
    for name, value in save_tensors.items():
        tensors[KEY_PREFIX + name] = value
    # tensors shared between layers (LoRA-drop's ties) or with the model are written as copies
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}

    dropout = {getattr(layer.config, "dropout", 0.0) for layer in layers.values()}
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(
            getattr(root_module, "config", None), "name_or_path", None
        )
        or None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": float(max(dropout)),
        "use_rslora": rslora,
        "use_dora": dora,
        "target_modules": target_modules(root_module, list(forms)),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        # PEFT reads the base weight of a Conv1D as (in, out) only when this is set
        "fan_in_fan_out": any(f.kind == "conv1d" for f in forms.values()),
        "modules_to_save": save_names or None,
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
    }
    return config, tensors


def export_peft(model: nn.Module, directory: str | os.PathLike, root: str | None = None) -> Path:
    """Write the model's adapter as a PEFT LoRA adapter directory.

    Writes ``adapter_config.json`` and ``adapter_model.safetensors`` so that
    ``PeftModel.from_pretrained(base, directory)`` on the same base model computes what ``model``
    computes. Everything is converted and checked before anything is written: a model whose
    adapter has no exact PEFT form raises and leaves ``directory`` untouched.

    Args:
        model: a model with injected adapters (a LightningModule, a transformers model, ...).
        directory: the adapter directory to write (created if missing; the two files are
            replaced atomically).
        root: the submodule that PEFT's names are relative to; default: the outermost transformers
            model inside ``model`` that holds every adapter, else ``model`` itself.

    Returns:
        The directory written.

    Raises:
        PeftExportError: a layer's method has no exact PEFT form; the message says what to do.

    On a model sharded with FSDP2, every rank must call it: the adapter is gathered and global
    rank 0 writes the directory.
    """
    if needs_gather(model):
        return on_rank_zero(model, lambda: export_peft(model, directory, root))
    config, tensors = peft_adapter(model, root)
    metadata = {"format": "pt", **base_quantization_note(model, root)}
    text = json.dumps(config, indent=2, sort_keys=True)
    # both files at once: a crash never leaves new weights under an old config (files.py)
    return replace_directory_files(
        directory,
        {
            WEIGHTS_NAME: lambda p: save_file(tensors, p, metadata=metadata),
            CONFIG_NAME: lambda p: Path(p).write_text(text + "\n"),
        },
    )


def base_quantization_note(model: nn.Module, root: str | None = None) -> dict[str, str]:
    """``{"base_quantization": JSON}`` naming how the base's quantized layers are stored (PEFT
    names, e.g. ``{"model.layers.0.self_attn.q_proj": {"format": "nf4", ...}}``), or ``{}``.

    It goes into the safetensors metadata, which PEFT ignores: the adapter applies to the dense
    base too, but it was trained over (and matches outputs exactly over) the quantized one."""
    recorded = quant_record(model)
    if not recorded:
        return {}
    root = export_root(model, list(adapter_layers(model)), root)
    inner = {relative(n, root): v for n, v in recorded.items() if inside(n, root)}
    return {"base_quantization": json.dumps(inner, sort_keys=True)}
