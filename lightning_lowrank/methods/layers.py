"""The base layers an adapter can wrap, their shapes and their weights in ``(out, in)`` orientation.

A leaf module: it imports nothing else from the package but the quantisation backend's leaf
(``quant/backend.py``, which imports no backend until used), so the protocol (``methods/base.py``)
and the fused passes (``methods/fused.py``) can both rely on it without importing each other.

Weights are always spoken of in ``(out, in)`` orientation. ``nn.Linear`` stores ``(out, in)``;
transformers' GPT-2 ``Conv1D`` stores ``(in, out)``; an embedding table stores
``(num_embeddings, embedding_dim)``, treated as the transpose of an ``(out, in)`` matrix with
``in = num_embeddings`` (the input is a one-hot vector).
"""

from __future__ import annotations

from typing import cast

import torch
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
            :func:`dense_weight_oi`).
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
    ``Linear8bitLt``): its weight is frozen storage, read through :func:`dense_weight_oi`."""
    return quant_format(module) is not None


def weight_dtype_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype adapters of ``module`` hold their parameters in (a quantized layer's compute
    dtype, else its weight's) and the device of its weight."""
    weight = cast(Tensor, module.weight)
    dtype = compute_dtype(module) if is_quantized(module) else weight.dtype
    return dtype, weight.device


def dense_weight_oi(module: nn.Module, dtype: torch.dtype | None = None) -> Tensor:
    """The base weight in ``(out, in)`` orientation as a dense tensor: :func:`weight_oi` itself
    for a plain layer (cast to ``dtype`` if given), a dequantized copy for a quantized one."""
    if is_quantized(module):
        return dequantize(module, dtype)
    w = weight_oi(module)
    return w if dtype is None else w.to(dtype)


__all__ = [
    "conv1d_type",
    "dense_weight_oi",
    "is_quantized",
    "layer_kind",
    "layer_shape",
    "weight_dtype_device",
    "weight_oi",
]
