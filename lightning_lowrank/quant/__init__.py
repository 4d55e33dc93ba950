"""Quantized frozen bases (QLoRA): adapters over 4-bit NF4 weights.

``inject(model, method, quantize_base="nf4")`` (or ``LowRankCallback(..., quantize_base="nf4")``)
stores the adapted layers' frozen weights as bitsandbytes ``Linear4bit`` (NF4) layers before the
adapters are built; models already quantized by bitsandbytes are adapted as they come. Nothing here
imports bitsandbytes until a layer is quantized or dequantized.
"""

from lightning_lowrank.quant.backend import compute_dtype, dequantize, describe, quant_format
from lightning_lowrank.quant.spec import NF4, QuantizeSpec, resolve

__all__ = [
    "NF4",
    "QuantizeSpec",
    "compute_dtype",
    "dequantize",
    "describe",
    "quant_format",
    "resolve",
]
