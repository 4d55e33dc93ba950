"""The base layers an adapter can wrap, their shapes and their weights in ``(out, in)`` orientation.

A leaf module: it imports nothing else from the package but the quantisation backend's leaf
(``quant/backend.py``, which imports no backend until used), so the protocol (``methods/base.py``)
and the fused passes (``methods/fused.py``) can both rely on it without importing each other.

Weights are always spoken of in ``(out, in)`` orientation. ``nn.Linear`` stores ``(out, in)``;
transformers' GPT-2 ``Conv1D`` stores ``(in, out)``; an embedding table stores
``(num_embeddings, embedding_dim)``, treated as the transpose of an ``(out, in)`` matrix with
``in = num_embeddings`` (the input is a one-hot vector).

``fill_`` writes a full tensor into a plain or a sharded (FSDP2 ``DTensor``) one.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_lowrank.quant.backend import compute_dtype, dequantize, quant_format


def conv1d_type() -> type[nn.Module] | None:
    """transformers' ``Conv1D`` class, or None when transformers is not installed."""
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers is optional
        return None
    return Conv1D


def layer_kind(module: nn.Module) -> str | None:
    """Return ``"linear"``, ``"conv1d"`` or ``"embedding"`` for a supported base layer, else None."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    conv1d = conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d"
    return None


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a supported base layer, in ``(out, in)`` orientation."""
    kind = layer_kind(module)
    if kind == "linear":
        linear = cast(nn.Linear, module)
        return linear.out_features, linear.in_features
    if kind == "conv1d":
        w = cast(Tensor, module.weight)
        return w.shape[1], w.shape[0]
    if kind == "embedding":
        emb = cast(nn.Embedding, module)
        return emb.embedding_dim, emb.num_embeddings
    raise TypeError(
        f"unsupported layer type {type(module).__name__}: adapters wrap nn.Linear, "
        "transformers' Conv1D and nn.Embedding"
    )


def weight_oi(module: nn.Module) -> Tensor:
    """The base weight as an ``(out, in)`` view that shares storage with the parameter.

    Raises:
        TypeError: the layer stores its weight quantized (no dense view exists: read it with
            ``dense_weight_oi``).
    """
    if is_quantized(module):
        raise TypeError(
            f"the {type(module).__name__} base stores its weight quantized: it has no dense "
            "(out, in) view to read or write in place. Merge with unload(model, dtype=...)"
        )
    kind = layer_kind(module)
    if kind == "linear":
        return cast(Tensor, module.weight)
    if kind in ("conv1d", "embedding"):
        return cast(Tensor, module.weight).t()
    raise TypeError(f"unsupported layer type {type(module).__name__}")


# --- quantized bases (lightning_lowrank/quant): the few facts the methods need ------------------
def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a quantized linear layer (bitsandbytes ``Linear4bit`` or an int8
    ``Linear8bitLt``): its weight is frozen storage, read through ``dense_weight_oi``."""
    return quant_format(module) is not None


def weight_dtype_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype adapters of ``module`` hold their parameters in (a quantized layer's compute
    dtype, else its weight's) and the device of its weight."""
    weight = cast(Tensor, module.weight)
    dtype = compute_dtype(module) if is_quantized(module) else weight.dtype
    return dtype, weight.device


def dense_weight_oi(module: nn.Module, dtype: torch.dtype | None = None) -> Tensor:
    """The base weight in ``(out, in)`` orientation as a dense tensor: ``weight_oi`` itself
    for a plain layer (cast to ``dtype`` if given), a dequantized copy for a quantized one."""
    if is_quantized(module):
        return dequantize(module, dtype)
    w = weight_oi(module)
    return w if dtype is None else w.to(dtype)


def refuse_quantized_merge(layer: Any) -> None:
    """Raise if ``layer``'s base is quantized: merging in place would round the delta into the
    4-bit storage (an error of the order of the quantisation step, silently)."""
    if is_quantized(layer.base):
        raise ValueError(
            f"cannot merge in place into the quantized {type(layer.base).__name__} base: use "
            "unload(model, dtype=torch.float32) (or another dtype), which returns plain layers "
            "holding the dequantized base plus the delta"
        )


def embed_or_linear(layer: Any, x: Tensor, a: Tensor) -> Tensor:
    """Apply a first factor ``a`` of shape ``(r, in)`` to the input: a matmul for linear layers,
    a row lookup for embeddings (whose input is a one-hot index)."""
    if layer.kind == "embedding":
        base = cast(nn.Embedding, layer.base)
        # padding rows get no gradient, as in the base table; max_norm would renormalise the
        # adapter factor in place, so it is not forwarded
        return F.embedding(x, a.t(), padding_idx=base.padding_idx)
    return F.linear(x, a)


def kaiming_uniform_(t: Tensor) -> Tensor:
    """Kaiming-uniform with ``a = sqrt(5)``, as ``nn.Linear`` and LoRA initialise A."""
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def own_weight(module: nn.Module, tied_with: list[str]) -> None:
    """Replace ``module.weight`` by a frozen copy, untying it from ``tied_with`` (which keep the
    original tensor), and warn: the tie is broken from now on."""
    w = cast(nn.Parameter, module.weight)
    module.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
    warnings.warn(
        f"an adapted layer's base weight was tied to {tied_with[:3]}: it now has its own copy, "
        "so those keep the original weight (the tie is broken)",
        stacklevel=4,
    )


__all__ = [
    "conv1d_type",
    "dense_weight_oi",
    "embed_or_linear",
    "fill_",
    "is_quantized",
    "kaiming_uniform_",
    "layer_kind",
    "layer_shape",
    "own_weight",
    "refuse_quantized_merge",
    "weight_dtype_device",
    "weight_oi",
]


def fill_(target: Tensor, value: Tensor) -> None:
    """Copy the full tensor ``value`` into ``target``: a plain tensor, or a DTensor that receives
    its own shard (scattered from rank 0, so every rank agrees). Meta tensors are left as they
    are (a model not yet materialised has no values to fill)."""
    if target.is_meta or value.is_meta:
        return
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(value, DTensor):
        value = value.full_tensor()
    if isinstance(target, DTensor):
        value = value.to(device=target.device, dtype=target.dtype)
        target.copy_(distribute_tensor(value, target.device_mesh, target.placements))
    else:
        target.copy_(value)
