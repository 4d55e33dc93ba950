"""DoRA (Liu et al. 2024, arXiv 2402.09353): weight-decomposed low-rank adaptation.

The adapted weight splits into a trainable magnitude and a direction:

    W' = m * V / ||V||_row,    V = W0 + dW,    m: (out,) initialised to ||W0||_row,

where ``dW`` is a low-rank delta: LoRA's ``s * B @ A`` by default, or SingLoRA's
``s * u(t) * A[:out] @ A[:in].T`` with ``delta="singlora"`` (DoRA's magnitude over a SingLoRA delta).
The row norm ``||V||`` is a constant in backward (detached), the paper's memory-saving choice.

The forward never builds ``V`` (or any ``(out, in)`` tensor):

    y = (m / ||V||) * (base(x) - bias + dW x) + bias,

and the norm comes from the factors ``dW = c * B @ A`` in ``O(out * in * r)``:

    ||V_i||^2 = ||W0_i||^2 + 2 c B_i . (W0 A^T)_i + c^2 B_i (A A^T) B_i^T.

``merge`` writes ``m * V / ||V||`` into the base weight and keeps the factor ``m / ||V||`` it used,
so ``unmerge`` restores ``W0`` exactly (to rounding) even if the norm would now differ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from lightning_lowrank.methods.base import (
    AdapterConfig,
    AdapterLayer,
    PeftLayer,
    Scaling,
    Side,
    check_bool,
    check_fraction,
    check_int,
    check_number,
    refuse_quantized_merge,
)
from lightning_lowrank.methods.layers import dense_weight_oi, fill_, is_quantized, weight_oi
from lightning_lowrank.methods.lora import LoRALayer
from lightning_lowrank.methods.singlora import SingLoRALayer

Delta = Literal["lora", "singlora"]


@dataclass
class DoRA(AdapterConfig):
    """Weight-decomposed low-rank adaptation: ``W' = m * (W0 + dW) / ||W0 + dW||_row``.

    Args:
        rank: r, the rank of the low-rank delta.
        alpha: the numerator of the delta's scale ``s``.
        dropout: dropout probability on the delta's input (LoRA delta only).
        scaling: ``"standard"`` (``s = alpha / r``) or ``"rslora"`` (``s = alpha / sqrt(r)``).
        train_a: ``False`` freezes the LoRA delta's A (LoRA-FA style); B and m train.
        delta: the low-rank delta under the magnitude: ``"lora"`` (``s * B @ A``) or
            ``"singlora"`` (``s * u(t) * A[:out] @ A[:in].T``).
        ramp_steps: SingLoRA's ramp length T in optimizer steps (``delta="singlora"`` only).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    scaling: Scaling = "standard"
    train_a: bool = True
    delta: Delta = "lora"
    ramp_steps: int = 1000

    @classmethod
    def examples(cls) -> list[DoRA]:
        return [cls(rank=2, alpha=4.0), cls(rank=2, alpha=4.0, delta="singlora", ramp_steps=10)]

    def __post_init__(self) -> None:
        self.rank = check_int("rank", self.rank, minimum=1)
        self.alpha = check_number("alpha", self.alpha, nonzero=True)
        self.ramp_steps = check_int("ramp_steps", self.ramp_steps, minimum=0)
        self.dropout = check_fraction("dropout", self.dropout)
        check_bool("train_a", self.train_a)
        if self.delta not in _DELTA_LAYERS:
            raise ValueError(f"delta must be one of {sorted(_DELTA_LAYERS)}, got {self.delta!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.delta == "singlora" and (self.dropout > 0 or not self.train_a):
            raise ValueError(
                "delta='singlora' has one matrix and no dropout: use dropout=0 and train_a=True"
            )
        if self.ramp_steps < 0:
            raise ValueError(f"ramp_steps must be >= 0, got {self.ramp_steps}")
        if self.scaling not in ("standard", "rslora"):
            raise ValueError(f"scaling must be 'standard' or 'rslora', got {self.scaling!r}")

    def build(
        self, bases: dict[str, nn.Module], layer_meta: dict[str, dict[str, Any]] | None = None
    ) -> dict[str, AdapterLayer]:
        layer_meta = layer_meta or {}
        cls = _DELTA_LAYERS[self.delta]
        return {name: cls(base, self, **layer_meta.get(name, {})) for name, base in bases.items()}


class DoRAMagnitude:
    """DoRA's magnitude over any low-rank layer whose delta factors as ``c * B @ A``.

    Mixed in before the delta's layer class (``class X(DoRAMagnitude, LoRALayer)``): the delta
    layer keeps its parameters, forward, ramp and ``low_rank_factors`` (read here as
    ``direction_factors``); this class adds ``magnitude`` and replaces the forward,
    ``delta_weight``, ``merge``, ``unmerge``, ``low_rank_factors`` (None: the whole update is not
    low-rank) and ``peft_form`` (the delta layer's pair plus the magnitude).
    """

    # provided by the AdapterLayer subclass this is mixed into
    base: nn.Module
    kind: str | None
    merged: bool
    base_norm_sq: Tensor | None  # a buffer: ||W0||^2 per row over a quantized base
    register_buffer: Callable[..., None]
    fused_low_rank: Callable[..., Tensor | None]
    #: the row factor ``m / ||V||`` folded into the base weight while merged, else None
    merge_factor: Tensor | None

    def __init__(self, base: nn.Module, config: DoRA, **layer_kwargs: Any) -> None:
        # a mixin: super() is the delta layer class at run time, mypy sees object
        super().__init__(base, config, **layer_kwargs)  # type: ignore[call-arg]  # mixin
        w0 = dense_weight_oi(base).detach()  # a quantized base: a temporary dequantized copy
        norm = torch.linalg.vector_norm(w0, dim=1, dtype=_compute_dtype(w0.dtype))
        self.magnitude = nn.Parameter(norm.to(w0.dtype))
        # a quantized base never changes and has no dense view: keep ||W0||^2, drop the copy
        self.register_buffer(
            "base_norm_sq", norm.square() if is_quantized(base) else None, persistent=False
        )
        del w0
        self.register_buffer("merge_factor", None, persistent=False)

    def direction_factors(self) -> tuple[Tensor, Tensor, Tensor | float]:
        """``(B, A, c)`` of the low-rank ``dW = c * B @ A`` inside the direction
        ``V = W0 + dW``: the delta layer's own ``low_rank_factors`` (LoRA's or SingLoRA's)."""
        factors = super().low_rank_factors()  # type: ignore[misc]  # mixin: super() is the delta layer
        if factors is None:
            raise TypeError(
                f"{type(self).__name__}: DoRA's magnitude needs a delta layer with low-rank factors"
            )
        return factors

    def initial_state(self) -> dict[str, Tensor]:
        state = super().initial_state()  # type: ignore[misc]
        state["magnitude"] = self._base_norm()
        return state

    @torch.no_grad()
    def init_from_base(self) -> None:
        """``m = ||W0||_row`` from the current base weight (DoRA's init, paper Sec. 4.1)."""
        fill_(self.magnitude, self._base_norm())

    def _base_norm(self) -> Tensor:
        # on a sharded base, a row-sharded norm: fill_ gathers it; a quantized base: a
        # temporary dequantized copy
        w0 = dense_weight_oi(self.base).detach()
        return torch.linalg.vector_norm(w0, dim=1, dtype=_compute_dtype(w0.dtype)).to(w0.dtype)

    def low_rank_factors(self) -> None:
        """None: DoRA's update ``m * V / ||V|| - W0`` is not a low-rank product (the delta under
        the magnitude is, see ``direction_factors``)."""
        return None

    def peft_form(self) -> PeftLayer:
        """PEFT's DoRA is ``m * (W0 + dW) / ||W0 + dW||_row`` over a LoRA pair, as here: the delta
        layer's form (LoRA's or SingLoRA's pair) with the magnitude."""
        form: PeftLayer = super().peft_form()  # type: ignore[misc]  # mixin: super() is the delta layer
        form.magnitude = self.magnitude
        return form

    @torch.no_grad()
    def weight_norm(self) -> Tensor:
        """``||W0 + dW||_row`` from the factors of ``dW = c * B @ A``, detached (paper, Sec. 4.3).

        Only ``(out, r)`` and ``(r, r)`` intermediates: ``W0 A^T`` and ``A A^T``."""
        b, a, c = self.direction_factors()
        dtype = _compute_dtype(a.dtype)
        if self.base_norm_sq is not None:
            # quantized base: W0 A^T through the base's own (dequantizing) matmul, the r rows of
            # A as a batch of inputs; ||W0||^2 was kept at init
            w0_at = self._quantized_base_times(a).t().to(dtype)  # (out, r)
            w0_sq = self.base_norm_sq.to(dtype)
        else:
            w0 = weight_oi(self.base)
            # cast the (r, in) factor to the base's dtype rather than W0 to the factor's: no
            # copy of W0
            w0_at = (w0 @ a.to(w0.dtype).t()).to(dtype)  # (out, r)
            w0_sq = torch.linalg.vector_norm(w0, dim=1, dtype=dtype).square()
        b, a = b.to(dtype), a.to(dtype)
        c = c.to(dtype) if isinstance(c, Tensor) else c
        cross = (b * w0_at).sum(dim=1)
        quad = ((b @ (a @ a.t())) * b).sum(dim=1)
        return (w0_sq + 2 * c * cross + c * c * quad).clamp_min(0).sqrt()

    def _quantized_base_times(self, a: Tensor) -> Tensor:
        """``A W0^T`` (r, out) for a quantized base, computed by the base layer itself."""
        out = self.base(a.to(self.magnitude.dtype))
        bias = self._bias()
        return out if bias is None else out - bias

    def _bias(self) -> Tensor | None:
        return None if self.kind == "embedding" else getattr(self.base, "bias", None)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if getattr(self, "extension", None) is not None:
            raise NotImplementedError(
                "DoRA does not combine with layer extensions (Delta-LoRA changes W0 under the "
                "norm): use LoRA or SingLoRA with Delta-LoRA"
            )
        if self.merged:
            return self.base(x, *args, **kwargs)
        factor = self.magnitude / self.weight_norm().to(self.magnitude.dtype)
        if self.kind in ("linear", "conv1d") and not args and not kwargs:
            b, a, c = self.direction_factors()
            if isinstance(c, Tensor):  # SingLoRA's ramp: fold it into the (out, r) factor
                b, c = b * c.to(b.dtype), 1.0
            # one pass for base, delta and magnitude (methods/fused.py)
            out = self.fused_low_rank(x, a, b, c, factor)
            if out is not None:
                return out
        out = self.base(x, *args, **kwargs)
        factor = factor.to(out.dtype)
        delta = super().adapter_forward(x).to(out.dtype)  # type: ignore[misc]  # mixin, as above
        bias = self._bias()
        if bias is None:
            return factor * (out + delta)
        return factor * (out - bias + delta) + bias

    def adapter_forward(self, x: Tensor) -> Tensor:
        """The full additive contribution ``W' x - W0 x`` (runs the base again: analysis only)."""
        base_out = self.base(x)
        return self.forward(x) - base_out

    def _dense_factor(self, v: Tensor) -> Tensor:
        norm = torch.linalg.vector_norm(v, dim=1, dtype=_compute_dtype(v.dtype))
        return self.magnitude.to(norm.dtype) / norm

    def delta_weight(self) -> Tensor:
        """The dense effective update ``m * V / ||V|| - W0`` (merge and analysis only)."""
        low = super().delta_weight()  # type: ignore[misc]  # mixin: super() is the delta layer
        w = dense_weight_oi(self.base)  # merged is never true over a quantized base
        w0 = (
            w / cast(Tensor, self.merge_factor).to(w.dtype)[:, None] - low.to(w.dtype)
            if self.merged
            else w
        )
        v = w0 + low.to(w.dtype)
        return (self._dense_factor(v).to(w.dtype)[:, None] * v - w0).to(low.dtype)

    @torch.no_grad()
    def _merge_plan(self) -> tuple[Tensor, Tensor]:
        refuse_quantized_merge(self)
        w = weight_oi(self.base)
        v = w + super().delta_weight().to(w.dtype)  # type: ignore[misc]  # mixin, as above
        factor = self._dense_factor(v)
        merged = factor.to(w.dtype)[:, None] * v
        if not torch.isfinite(merged).all():
            raise ValueError(
                f"refusing to merge: the DoRA weight has non-finite values in {w.dtype}: nothing "
                "was merged"
            )
        return merged, factor.to(w.dtype)

    def check_merge(self) -> None:
        if not self.merged:
            self._merge_plan()

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        merged, factor = self._merge_plan()
        self.own_base_weight()  # type: ignore[attr-defined]
        weight_oi(self.base).copy_(merged)
        self.merge_factor = factor
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = weight_oi(self.base)
        low = super().delta_weight().to(w.dtype)  # type: ignore[misc]  # mixin, as above
        w.copy_(w / cast(Tensor, self.merge_factor)[:, None] - low)
        self.merge_factor = None
        self.merged = False

    def param_sides(self) -> dict[str, Side]:
        # LoRA+ (official code): every trainable 1-D tensor, the magnitude included, is B-side
        return {**super().param_sides(), "magnitude": "B"}  # type: ignore[misc]  # mixin, as above


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32 for norms: half-precision sums of squares overflow or lose digits."""
    return torch.promote_types(dtype, torch.float32)


# the [misc] ignores below: DoRA's low_rank_factors is None (its whole update is not one low-rank
# product) where the delta layer's returns factors; callers use the protocol's Optional result
class DoRALayer(DoRAMagnitude, LoRALayer):  # type: ignore[misc]  # see above
    """DoRA over a LoRA delta ``s * B @ A``. See [`DoRA`][lightning_lowrank.DoRA]."""


class DoRASingLoRALayer(DoRAMagnitude, SingLoRALayer):  # type: ignore[misc]  # see above
    """DoRA over a SingLoRA delta ``s * u(t) * A[:out] @ A[:in].T``. See [`DoRA`][lightning_lowrank.DoRA]."""


_DELTA_LAYERS: dict[str, type[AdapterLayer]] = {"lora": DoRALayer, "singlora": DoRASingLoRALayer}

DoRA.layer_cls = DoRALayer
