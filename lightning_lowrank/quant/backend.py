"""The bitsandbytes backend: quantize ``nn.Linear`` layers to ``Linear4bit`` and read quantized
weights back as dense tensors.

bitsandbytes is imported inside these functions only, so that a model without quantized layers
never loads it. Recognising a bitsandbytes layer (``quant_format``) needs no import: it reads
the class's module name.

The eval-mode repack. On CPUs with AVX512-BF16, ``Linear4bit.forward`` in eval mode without
gradients rewrites ``weight.data`` in place into a kernel-specific layout (and the absmax values
into bfloat16, transposed), flagging ``quant_state.packing_format_for_cpu``; from then on
``bitsandbytes.functional.dequantize_4bit`` reads the wrong layout (errors of the order of the
weights). ``dequantize`` detects the flag and decodes the packed layout on copies, with the
bfloat16 absmax the packed forward itself uses, leaving the layer as it is.
"""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
from torch import Tensor, nn

from lightning_lowrank.quant.spec import NF4, dtype_name

INSTALL_HINT = "pip install 'lightning-lowrank[quant]'"


def import_bnb() -> Any:
    """bitsandbytes, or an ImportError naming the extra that installs it."""
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(
            f"quantized bases need bitsandbytes: {INSTALL_HINT} (or pip install bitsandbytes)"
        ) from err
    return bitsandbytes


def quant_format(module: nn.Module) -> str | None:
    """``"nf4"``/``"fp4"`` for a bitsandbytes ``Linear4bit``, ``"int8"`` for a ``Linear8bitLt``
    holding int8 weights, else None (also for modules of other libraries)."""
    if not type(module).__module__.startswith("bitsandbytes"):
        return None
    names = {cls.__name__ for cls in type(module).__mro__}
    if "Linear4bit" in names:
        state = _state_4bit(module)
        return getattr(state, "quant_type", None) or getattr(module.weight, "quant_type", "nf4")
    if "Linear8bitLt" in names and module.weight.dtype == torch.int8:
        return "int8"
    return None


def _state_4bit(module: nn.Module) -> Any:
    state = getattr(module.weight, "quant_state", None)
    return state if state is not None else getattr(module, "quant_state", None)


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a quantized layer computes in and dequantizes to: the dtype its weight had
    before quantisation (4-bit), or its bias's (8-bit; float32 without a bias)."""
    fmt = quant_format(module)
    if fmt in ("nf4", "fp4"):
        state = _state_4bit(module)
        return getattr(state, "original_dtype", None) or state.dtype
    bias = getattr(module, "bias", None)
    return bias.dtype if bias is not None else torch.float32


def describe(module: nn.Module) -> dict[str, Any]:
    """JSON facts about a quantized layer's storage (recorded in adapter files)."""
    fmt = quant_format(module)
    if fmt is None:
        raise TypeError(f"{type(module).__name__} is not a quantized layer")
    facts: dict[str, Any] = {"format": fmt, "dtype": dtype_name(compute_dtype(module))}
    if fmt != "int8":
        state = _state_4bit(module)
        facts["blocksize"] = int(state.blocksize)
        facts["double_quant"] = bool(
            getattr(state, "original_nested", None)
            if getattr(state, "packing_format_for_cpu", False)
            else state.nested
        )
    return facts


@torch.no_grad()
def dequantize(module: nn.Module, dtype: torch.dtype | None = None) -> Tensor:
    """The dense ``(out, in)`` weight a quantized layer computes with, as a new tensor in
    ``dtype`` (default: ``compute_dtype``). The layer is not changed."""
    fmt = quant_format(module)
    if fmt is None:
        raise TypeError(f"{type(module).__name__} is not a quantized layer")
    functional = import_bnb().functional
    weight: Any = module.weight  # a bitsandbytes Int8Params or Params4bit
    if fmt == "int8":
        scb = weight.SCB
        if scb is None:  # the first forward moves the row scales into the layer's state
            scb = cast(Any, module).state.SCB
        dense = functional.int8_vectorwise_dequant(weight.data, scb)
    else:
        state = _state_4bit(module)
        data = weight.data
        if getattr(state, "packing_format_for_cpu", False):
            data, state = _unpack_cpu(functional, data, state)
        dense = functional.dequantize_4bit(data, state)
    return dense.to(dtype or compute_dtype(module))


def _unpack_cpu(functional: Any, data: Tensor, state: Any) -> tuple[Tensor, Any]:
    """The standard 4-bit layout and a plain quant state for a weight repacked by an eval-mode
    forward on an AVX512-BF16 CPU (see the docstring of ``lightning_lowrank.quant.backend``),
    built on copies."""
    mirror = copy.copy(state)
    mirror.original_nested = False  # keep the absmax as the packed forward uses it
    codes, _ = functional._convert_weight_packed_for_cpu_inverse(data, mirror)
    # the packed layout stores the absmax as a bfloat16 (in / blocksize, out) matrix
    absmax = state.absmax.t().reshape(-1).float()
    plain = functional.QuantState(
        absmax=absmax,
        shape=state.shape,
        code=state.code,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=state.original_dtype,
    )
    return codes, plain


#: the smallest absmax block bitsandbytes' 4-bit kernels take
MIN_BLOCKSIZE = 32


def layer_blocksize(in_features: int, requested: int) -> int | None:
    """The absmax block size used for a layer with ``in_features`` inputs: ``requested`` if it
    divides ``in_features``, else the largest smaller power of two (>= 32) that does, else None.

    Why: bitsandbytes' CPU kernel decodes 4-bit weights row by row and mis-decodes blocks that
    straddle two rows (measured with bitsandbytes 0.50.2: errors up to 0.87 of the block's absmax
    for 16 x 96 weights in blocks of 64, against 0.15 for blocks inside rows).
    """
    size = requested
    while size >= MIN_BLOCKSIZE:
        if in_features % size == 0:
            return size
        size //= 2
    return None


def quantizable(module: nn.Module, requested: int = 64) -> str | None:
    """None if ``quantize_linear`` takes ``module``, else the reason it does not."""
    if type(module) is not nn.Linear:
        return f"{type(module).__name__} is not a plain nn.Linear"
    if not module.weight.is_floating_point():
        return f"its weight is {module.weight.dtype}, not floating point"
    if module.weight.device.type == "meta":
        return "its weight is on the meta device"
    if layer_blocksize(module.in_features, requested) is None:
        return f"in_features={module.in_features} is not a multiple of {MIN_BLOCKSIZE}"
    return None


@torch.no_grad()
def quantize_linear(linear: nn.Linear, spec: NF4) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` (NF4) computing with ``linear``'s weight quantized.

    The new layer computes in the weight's dtype and keeps ``linear``'s bias parameter (frozen,
    unquantized); its block size follows ``layer_blocksize``. ``linear`` is not changed."""
    reason = quantizable(linear, spec.blocksize)
    if reason is not None:
        raise TypeError(f"cannot quantize this layer: {reason}")
    bnb = import_bnb()
    weight = linear.weight.detach()
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=False,
        compute_dtype=weight.dtype,
        compress_statistics=spec.double_quant,
        quant_type="nf4",
        device="meta",  # the dense weight is replaced below: never allocate a second one
    )
    param = bnb.nn.Params4bit(
        weight.contiguous().clone(),
        requires_grad=False,
        blocksize=layer_blocksize(linear.in_features, spec.blocksize),
        compress_statistics=spec.double_quant,
        quant_type="nf4",
        module=layer,
    )
    layer.weight = param.to(weight.device)  # quantizes; the dense copy is released
    layer.bias = linear.bias
    if layer.bias is not None:
        layer.bias.requires_grad_(False)
    layer.train(linear.training)
    return layer


def spec_matches(module: nn.Module, facts: dict[str, Any]) -> bool:
    """Whether a quantized layer is stored as ``facts`` (from ``describe``) say."""
    mine = describe(module)
    return all(mine.get(k) == v for k, v in facts.items() if k != "dtype")
