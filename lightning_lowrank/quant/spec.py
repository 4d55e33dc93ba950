"""What ``quantize_base=`` asks for: the storage format of the frozen base weights.

``quantize_base="nf4"`` is ``NF4`` with its defaults. Importing this module imports no
quantisation backend: bitsandbytes is imported only when a layer is quantized or dequantized.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class NF4:
    """4-bit NormalFloat storage of frozen base weights (QLoRA, Dettmers et al. 2023).

    Each block of ``blocksize`` consecutive weights (row-major over the ``(out, in)`` matrix) is
    stored as 4-bit indices into the 16 NF4 levels ``q_j`` (quantiles of a standard normal,
    scaled to ``[-1, 1]``) and one absmax ``a_b``; the weight is read back as ``w = a_b * q_j``.
    The round trip error of a weight is at most ``a_b * max_j (q_{j+1} - q_j) / 2``.

    Args:
        blocksize: weights per absmax block (bitsandbytes: 32, 64, ..., 4096; QLoRA uses 64).
        double_quant: store the absmax values themselves in 8 bits (blocks of 256): about
            0.37 fewer bits per weight, at a small extra dequantisation cost.
        frozen_linear: also quantize the frozen ``nn.Linear`` layers that get no adapter (not
            the output head, not ``train_modules``).
        head: with ``frozen_linear``, quantize the output head too (it is left alone by
            default: its rounding error reaches every logit directly).
    """

    blocksize: int = 64
    double_quant: bool = True
    frozen_linear: bool = False
    head: bool = False

    def __post_init__(self) -> None:
        if self.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise ValueError(
                f"blocksize must be a power of two from 32 to 4096, got {self.blocksize}"
            )
        if self.head and not self.frozen_linear:
            raise ValueError("head=True only applies with frozen_linear=True")

    def to_dict(self) -> dict[str, Any]:
        return {"format": "nf4", **asdict(self)}


QuantizeSpec = str | NF4 | None


def resolve(spec: QuantizeSpec) -> NF4 | None:
    """``None``, ``"nf4"`` or an ``NF4`` as an ``NF4`` (or None)."""
    if spec is None or isinstance(spec, NF4):
        return spec
    if isinstance(spec, str) and spec.lower() == "nf4":
        return NF4()
    raise ValueError(
        f"quantize_base must be None, 'nf4' or lightning_lowrank.quant.NF4(...), got {spec!r}"
    )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_schedules_over(spec: NF4 | None, schedules: Sequence[Any]) -> NF4 | None:
    """``spec``, after refusing a schedule that writes into base weights a quantized base keeps
    in 4 bits (``DeltaLoRA(mode='inplace')``)."""
    if spec is not None and any(getattr(s, "mode", None) == "inplace" for s in schedules):
        raise ValueError(
            "DeltaLoRA(mode='inplace') writes into the base weights, which quantize_base "
            "stores in 4 bits: use DeltaLoRA(mode='implicit') over a quantized base"
        )
    return spec
