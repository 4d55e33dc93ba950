"""SingLoRA (Bensaid et al. 2025, arXiv 2507.05566): a low-rank update from one matrix.

For a frozen weight ``W0`` of shape ``(out, in)`` and one trainable ``A`` of shape
``(max(out, in), r)``:

    dW = s * u(t) * A[:out] @ A[:in].T,     u(t) = min(t / T, 1),
    s = alpha / r  (``scaling="standard"``)  or  alpha / sqrt(r)  (``scaling="rslora"``).

On a square layer this is the symmetric ``s * u(t) * A @ A.T``: half of LoRA's parameters at the
same rank. ``t`` counts OPTIMIZER steps; it lives in the persistent buffer ``step`` so checkpoints
and adapter files carry it. ``LowRankCallback`` advances it once per optimizer step (gradient
accumulation and validation never do); without a Trainer call ``layer.set_step(t)`` or
[`set_step`][lightning_lowrank.set_step]. ``u(0) = 0`` makes the adapted model equal the base at step 0
while ``A`` itself is random: ``A = 0`` would receive a zero gradient forever.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_lowrank.methods.base import (
    AdapterConfig,
    AdapterLayer,
    PeftLayer,
    Scaling,
    Side,
    check_int,
    check_number,
    embed_or_linear,
    kaiming_uniform_,
    peft_pair,
    scale_factor,
)
from lightning_lowrank.methods.layers import weight_dtype_device


@dataclass
class SingLoRA(AdapterConfig):
    """Single-matrix low-rank adaptation: ``dW = s * u(t) * A[:out] @ A[:in].T``.

    Args:
        rank: r, the number of columns of ``A``.
        alpha: the numerator of the scale ``s``.
        scaling: ``"standard"`` (``s = alpha / r``) or ``"rslora"`` (``s = alpha / sqrt(r)``).
        ramp_steps: T, the optimizer steps over which ``u(t)`` ramps from 0 to 1 (third-party
            default 1000). ``0`` disables the ramp (``u = 1`` from the start).
    """

    rank: int = 8
    alpha: float = 16.0
    scaling: Scaling = "standard"
    ramp_steps: int = 1000

    @classmethod
    def examples(cls) -> list[SingLoRA]:
        return [cls(rank=2, alpha=4.0, ramp_steps=10)]

    def __post_init__(self) -> None:
        self.rank = check_int("rank", self.rank, minimum=1)
        self.alpha = check_number("alpha", self.alpha, nonzero=True)
        self.ramp_steps = check_int("ramp_steps", self.ramp_steps, minimum=0)
        scale_factor(self.alpha, max(self.rank, 1), self.scaling)  # validates `scaling`


def ramp(step: Tensor, ramp_steps: int) -> Tensor:
    """``u(t) = min(t / T, 1)`` as a 0-dim float64 tensor (no host sync on accelerators)."""
    if ramp_steps <= 0:
        return torch.ones((), dtype=torch.float64, device=step.device)
    return (step.to(torch.float64) / ramp_steps).clamp(max=1.0)


class SingLoRALayer(AdapterLayer):
    """A base layer plus ``s * u(t) * A[:out] @ A[:in].T``. See [`SingLoRA`][lightning_lowrank.SingLoRA].

    ``config`` may be any config with ``rank``, ``alpha``, ``scaling`` and ``ramp_steps`` (DoRA
    reuses this layer as its low-rank part).
    """

    config: SingLoRA
    step: Tensor

    def __init__(self, base: nn.Module, config: SingLoRA) -> None:
        super().__init__(base, config)
        r = config.rank
        dtype, device = weight_dtype_device(base)
        self.scale = scale_factor(config.alpha, r, config.scaling)
        self.ramp_steps = config.ramp_steps
        d = max(self.out_features, self.in_features)
        # A plays LoRA's A (it projects the input), so it gets LoRA's A init: Kaiming-uniform with
        # fan_in = d (drawn as (r, d) and transposed), not fan_in = r, which would make the update
        # at u = 1 about d / r times larger
        a_t = kaiming_uniform_(torch.empty(r, d, dtype=dtype, device=device))
        self.lora_A = nn.Parameter(a_t.t().contiguous())
        # the optimizer step count: persistent so checkpoints and adapter files resume the ramp
        self.register_buffer("step", torch.zeros((), dtype=torch.int64, device=device))

    def set_step(self, step: int) -> None:
        self.step.fill_(check_int("step", step, minimum=0))

    def initial_state(self) -> dict[str, Tensor]:
        d, r = self.lora_A.shape
        a_t = kaiming_uniform_(self._empty(r, d))
        return {"lora_A": a_t.t().contiguous(), "step": torch.zeros((), dtype=torch.int64)}

    def ramp_value(self) -> Tensor:
        """The current ``u(t)`` as a 0-dim tensor."""
        return ramp(self.step, self.ramp_steps)

    def low_rank_factors(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, A, c)`` with ``dW = c * B @ A``: here ``B = A[:out]``, ``A = A[:in].T`` and
        ``c = s * u(t)`` (0-dim tensor).

        This class's own methods call it as ``SingLoRALayer.low_rank_factors(self)``: a
        composition (DoRA) overrides ``low_rank_factors`` for its whole update, while the delta
        these methods compute stays SingLoRA's."""
        a = self.lora_A
        return a[: self.out_features], a[: self.in_features].t(), self.scale * self.ramp_value()

    def peft_form(self) -> PeftLayer:
        """``dW = s u(t) A[:out] A[:in]^T`` is the pair ``B = A[:out]``, ``A' = u(t) A[:in]^T``:
        exact on square and non-square layers alike, the ramp's current value folded into A'."""
        b, a, c = SingLoRALayer.low_rank_factors(self)
        cfg = self.config
        return peft_pair(b, a, c, cfg.alpha, cfg.scaling == "rslora", self.kind)

    def fused_output(self, x: Tensor) -> Tensor | None:
        b, a, c = SingLoRALayer.low_rank_factors(self)
        return self.fused_low_rank(x, a, b * c.to(b.dtype), 1.0)  # u(t) folded into (out, r)

    def adapter_forward(self, x: Tensor) -> Tensor:
        b, a, c = SingLoRALayer.low_rank_factors(self)
        if self.kind != "embedding":
            x = x.to(a.dtype)
        h = embed_or_linear(self, x, a)
        return F.linear(h * c.to(h.dtype), b)

    def delta_weight(self) -> Tensor:
        b, a, c = SingLoRALayer.low_rank_factors(self)
        return (b @ a) * c.to(b.dtype)

    def param_sides(self) -> dict[str, Side]:
        # the one matrix projects the input (A-side role) and the output (B-side role); LoRA+
        # needs one rate per tensor, and A's input role comes first in the data path
        return {"lora_A": "A"}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ramp_steps={self.ramp_steps}"


SingLoRA.layer_cls = SingLoRALayer
