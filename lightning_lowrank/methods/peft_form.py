"""PEFT's LoRA form of one adapted layer, as ``AdapterLayer.peft_form()`` returns it.

A leaf module: the PEFT exporter and every method's ``peft_form()`` use these, and it imports
nothing else from the package but the scale rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor


def _peft_scale(alpha: float, rank: int, rslora: bool) -> float:
    # PEFT's own rule: lora_alpha / r, or / sqrt(r) with use_rslora (as scale_factor here)
    return alpha / math.sqrt(rank) if rslora else alpha / rank


class PeftExportError(ValueError):
    """The model's adapter has no exact PEFT LoRA form; the message says what to do instead."""


@dataclass
class PeftLayer:
    """One adapted layer in PEFT's LoRA form: ``dW = s * lora_B @ lora_A`` with
    ``s = alpha / r`` (``alpha / sqrt(r)`` if ``rslora``), ``r = lora_A.shape[0]``; with a
    ``magnitude`` m, DoRA's ``W' = m * (W0 + dW) / ||W0 + dW||_row``."""

    kind: str  # "linear", "conv1d" or "embedding"
    lora_A: Tensor  # (r, in)
    lora_B: Tensor  # (out, r)
    alpha: float
    rslora: bool
    magnitude: Tensor | None = None  # DoRA's m, (out,)

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[0])


def peft_pair(
    b: Tensor, a: Tensor, c: Tensor | float, alpha: float, rslora: bool, kind: str | None
) -> PeftLayer:
    """PEFT's pair for ``dW = c * b @ a`` under PEFT's scale ``s`` for ``alpha`` and
    ``r = a.shape[0]``: a ``c`` other than ``s`` (a ramp, AdaLoRA's fixed scale) is folded into
    A as ``a * (c / s)``, so ``s * b @ a' == c * b @ a``."""
    s_peft = _peft_scale(alpha, a.shape[0], rslora)
    c = float(c)
    if c != s_peft:
        a = a * (c / s_peft)
    return PeftLayer(kind=kind or "linear", lora_A=a, lora_B=b, alpha=alpha, rslora=rslora)
