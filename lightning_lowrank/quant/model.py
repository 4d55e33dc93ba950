"""Model-level quantisation: which layers ``quantize_base=`` stores in 4 bits, the record adapter
files keep of a quantized base, and unloading onto plain layers.

The rule for layers the backend cannot take: plain ``nn.Linear`` layers are quantized, in absmax
blocks of the requested size if it divides ``in_features``, else of the largest smaller power of
two that does (at least 32; recorded per layer in adapter files; see
``lightning_lowrank.quant.backend.layer_blocksize``). Targets of other types (GPT-2's
``Conv1D``, ``nn.Embedding``) or with ``in_features`` not a multiple of 32 keep their dense weight,
and a warning names them. Layers a model already holds
quantized (bitsandbytes ``Linear4bit``, int8 ``Linear8bitLt``) are adapted as they come.
"""

from __future__ import annotations

import warnings
from typing import Any, cast

import torch
from torch import Tensor, nn

from lightning_lowrank.methods.base import AdapterConfig, AdapterLayer
from lightning_lowrank.methods.layers import is_quantized, layer_shape
from lightning_lowrank.quant.backend import (
    compute_dtype,
    dequantize,
    describe,
    layer_blocksize,
    quant_format,
    quantizable,
    quantize_linear,
    spec_matches,
)
from lightning_lowrank.quant.spec import NF4, dtype_name

#: per-layer specs: the layers to quantize, by qualified name (as in the unadapted model)
Plan = dict[str, NF4]


def check_method(method: AdapterConfig, bases: dict[str, nn.Module], plan: Plan) -> None:
    """Refuse a method that cannot run over the quantized bases (before anything changes)."""
    quantized = [n for n, b in bases.items() if n in plan or is_quantized(b)]
    if quantized and getattr(method, "mode", None) == "pretrain":
        raise ValueError(
            "SLTrain(mode='pretrain') replaces the dense base weight by its sparse plus low-rank "
            f"factors, so a quantized base (e.g. {quantized[0]!r}) would be thrown away: use "
            "SLTrain(mode='adapter') over a quantized base, or no quantize_base"
        )


def quantize_bases(bases: dict[str, nn.Module], plan: Plan) -> dict[str, nn.Module]:
    """``bases`` with each layer the plan names replaced by its quantized copy (the model is not
    changed). Layers the backend cannot take stay dense, named in one warning."""
    out: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    for name, base in bases.items():
        if name not in plan or is_quantized(base):
            out[name] = base
            continue
        reason = quantizable(base, plan[name].blocksize)
        if reason is None:
            out[name] = quantize_linear(cast(nn.Linear, base), plan[name])
        else:
            out[name] = base
            skipped[name] = reason
    if skipped:
        shown = "; ".join(f"{n}: {r}" for n, r in list(skipped.items())[:4])
        warnings.warn(
            f"quantize_base left {len(skipped)} adapted layers in their dense dtype ({shown}"
            f"{'; ...' if len(skipped) > 4 else ''}): the bitsandbytes backend quantizes plain "
            "nn.Linear layers whose in_features is a multiple of 32 only",
            stacklevel=4,
        )
    return out


def frozen_linear_plan(model: nn.Module, spec: NF4, heads: set[str], skip: set[str]) -> Plan:
    """The frozen plain ``nn.Linear`` layers outside adapters that ``spec.frozen_linear``
    quantizes: not in ``skip`` (adapted layers), not trainable, not an output head unless
    ``spec.head``."""
    if not spec.frozen_linear:
        return {}
    inside = {n for n, m in model.named_modules() if isinstance(m, AdapterLayer)}
    plan: Plan = {}
    for name, module in model.named_modules():
        if not name or name in skip or any(name.startswith(p + ".") for p in inside | skip):
            continue
        if quantizable(module, spec.blocksize) is not None or module.weight.requires_grad:
            continue
        if name in heads and not spec.head:
            continue
        plan[name] = spec
    return plan


def quantize_named(model: nn.Module, plan: Plan) -> list[str]:
    """Replace each plain linear layer the plan names by its quantized copy, in place."""
    done = []
    for name, spec in plan.items():
        module = model.get_submodule(name)
        if isinstance(module, AdapterLayer) or is_quantized(module):
            continue
        parent, _, child = name.rpartition(".")
        setattr(
            model.get_submodule(parent) if parent else model,
            child,
            quantize_linear(cast(nn.Linear, module), spec),
        )
        done.append(name)
    return done


def record(model: nn.Module) -> dict[str, dict[str, Any]]:
    """How every quantized layer of ``model`` is stored, by its name in the unadapted model (an
    adapted base is named as its adapter layer). Adapter files store it under their own names
    (``lightning_lowrank.names``), which ``recorded_in`` reads back."""
    adapted = {f"{n}.base": n for n, m in model.named_modules() if isinstance(m, AdapterLayer)}
    return {
        adapted.get(name, name): describe(module)
        for name, module in model.named_modules()
        if quant_format(module) is not None
    }


def recorded_in(
    model: nn.Module,
    recorded: dict[str, dict[str, Any]],
    mapping: dict[str, str],
    source: str,
) -> dict[str, dict[str, Any]]:
    """An adapter file's quantisation record keyed by names in ``model``.

    ``mapping`` is ``{name in the file: name in model}`` for the file's adapted layers; the other
    recorded layers (quantized with ``NF4(frozen_linear=True)``, or LoRA-drop's dropped layers)
    are resolved together with them, so one reading of the names holds for both.

    Raises:
        ValueError: a recorded layer is not in ``model`` (the file was saved from another model).
    """
    from lightning_lowrank.names import resolve_file_names

    rest = [n for n in recorded if n not in mapping]
    both = resolve_file_names(model, [*mapping, *rest]) if rest else mapping
    if both is None or any(both[n] != m for n, m in mapping.items()):
        raise ValueError(
            f"{source} records quantized base layers this model lacks (e.g. {rest[:3]}): it was "
            "saved from another model"
        )
    return {both[n]: facts for n, facts in recorded.items()}


def plan_from_record(
    model: nn.Module, recorded: dict[str, dict[str, Any]], source: str, adapted: bool = False
) -> Plan:
    """The layers to quantize so that ``model`` stores its base as ``recorded`` (keyed by names
    in ``model``) says.

    Args:
        adapted: ``model`` already holds the adapters the file is loaded into; their bases
            cannot be quantized under them, so a recorded layer that is dense is refused.

    Raises:
        ValueError: a recorded layer is quantized in the model with other settings; is dense
            and recorded in a format this library does not produce (int8, fp4: load the model
            quantized as it was, e.g. with transformers' ``BitsAndBytesConfig``); or is dense
            under ``adapted``.
    """
    plan: Plan = {}
    for name, facts in recorded.items():
        module = model.get_submodule(name)
        if isinstance(module, AdapterLayer):
            module = module.base
        if is_quantized(module):
            if not spec_matches(module, facts):
                raise ValueError(
                    f"{source} was trained over {name!r} stored as {facts}, but this model stores "
                    f"it as {describe(module)}: load the base quantized the same way"
                )
            continue
        if facts.get("format") != "nf4":
            raise ValueError(
                f"{source} was trained over {name!r} quantized as {facts}: load the base model "
                "quantized that way (e.g. transformers' BitsAndBytesConfig) before loading it"
            )
        reason = quantizable(module, facts["blocksize"])
        width = layer_shape(module)[1] if reason is None else 0
        if reason is None and layer_blocksize(width, facts["blocksize"]) != facts["blocksize"]:
            reason = f"in_features={width} is not a multiple of {facts['blocksize']}"
        if reason is not None:
            raise ValueError(
                f"{source} was trained over {name!r} quantized as {facts}, but this model's "
                f"{name!r} cannot be stored so ({reason}): it was saved from another model"
            )
        if adapted:
            raise ValueError(
                f"{source} was trained over {name!r} stored as {facts}, but this model's adapters "
                "sit on a dense base: load it into a fresh model (its bases are quantized as "
                "recorded) or into adapters injected with quantize_base=NF4(...)"
            )
        plan[name] = NF4(blocksize=facts["blocksize"], double_quant=facts["double_quant"])
    return plan


@torch.no_grad()
def unloaded_linear(layer: AdapterLayer, dtype: torch.dtype | None, name: str = "") -> nn.Linear:
    """A plain ``nn.Linear`` holding ``dequantize(W0) + merged delta`` in ``dtype`` (default: the
    base's compute dtype), summed in float32 or wider, with the base's bias. ``layer`` is not
    changed.

    Raises:
        ValueError: the weight has non-finite values (a diverged adapter, or a sum beyond
            ``dtype``'s range), naming the layer ``name``.
    """
    base = layer.base
    wide = torch.promote_types(torch.float32, dtype or torch.float32)
    delta = layer.merged_delta()
    dtype = dtype or delta.dtype
    weight: Tensor = (dequantize(base, wide) + delta.to(wide)).to(dtype)
    if not torch.isfinite(weight).all():
        raise ValueError(
            f"refusing to unload: {name or 'a layer'}'s dequantized base plus delta has "
            f"non-finite values in {dtype_name(dtype)} (a diverged adapter, or values beyond "
            "that dtype's range: pass a wider dtype); the model is unchanged"
        )
    bias = getattr(base, "bias", None)
    plain = nn.Linear(
        layer.in_features, layer.out_features, bias=bias is not None, device="meta", dtype=dtype
    )
    plain.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        plain.bias = nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=False)
    plain.train(base.training)
    return plain


def quantized_state_keys(model: nn.Module) -> set[str]:
    """The state-dict entries of quantized layers besides their parameters (bitsandbytes stores
    the absmax and quantisation map of a 4-bit weight, the row scales of an int8 one)."""
    keys: set[str] = set()
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for name, module in model.named_modules():
        if quant_format(module) is None:
            continue
        prefix = f"{name}." if name else ""
        own = module.state_dict(prefix=prefix, keep_vars=True)
        keys |= {k for k in own if k not in params and k.startswith(prefix)}
    return keys


def meta_linear(base: nn.Module) -> nn.Linear:
    """A dense ``nn.Linear`` on the ``meta`` device shaped like the quantized ``base``, in its
    compute dtype: what adapters built over ``base`` see (a stand-in that holds no memory)."""
    out, in_ = layer_shape(base)
    bias = getattr(base, "bias", None) is not None
    return nn.Linear(in_, out, bias=bias, device="meta", dtype=compute_dtype(base))
