"""AdaLoRA (Zhang et al. 2023, arXiv 2303.10512): an SVD-form adapter whose rank is reallocated.

The update of a frozen weight ``W0`` of shape ``(out, in)`` is

    dW = s * P @ diag(lambda) @ Q,    P: (out, r),  lambda: (r,),  Q: (r, in),
    s = alpha / r_init  (fixed: it does not follow the live rank).

P and Q start as N(0, 0.02) and lambda as zeros, so the adapted model equals the base at
initialisation. As in the official code and PEFT the tensors are named ``lora_B`` (P, the output
side), ``lora_E`` (lambda) and ``lora_A`` (Q, the input side). The forward pass is
``base(x) + ((dropout(x) @ Q.T) * s * lambda) @ P.T``: the dense ``dW`` is never built.

Rank slots are switched off by the rank allocator
([`RankAllocator`][lightning_lowrank.RankAllocator]), which sets the slot's lambda to 0 and
clears its entry of the ``rank_mask`` buffer. Shapes never change during training (DDP and
checkpoints rely on that); ``AdaLoRALayer.truncated_state`` gives the physically smaller adapter
(only the kept slots) for ``save_adapter(..., truncate=True)``, and the ``rank`` layer metadata
rebuilds those shapes when the file is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_lowrank.methods.base import (
    AdapterConfig,
    AdapterLayer,
    PeftLayer,
    Side,
    check_fraction,
    check_int,
    check_number,
    embed_or_linear,
    layer_shape,
    peft_pair,
)
from lightning_lowrank.methods.layers import weight_dtype_device

#: standard deviation of P and Q at initialisation (official code)
INIT_STD = 0.02


@dataclass
class AdaLoRA(AdapterConfig):
    """SVD-form adapters with importance-driven rank allocation: ``dW = s * P diag(lambda) Q``.

    The rank allocator runs automatically when this config is given to ``LowRankCallback``. Over
    ``T`` optimizer steps the total number of kept rank slots (the budget) is ``b0 = init_rank * L``
    for the first ``t_init`` steps (``L`` adapted layers), then falls cubically to
    ``bT = target_rank * L``, re-masking every ``delta_t`` steps, and stays at ``bT`` with a fixed
    pattern for the last ``t_final`` steps. Defaults are the official ones (README quick start;
    ``alpha`` and ``orth_reg`` from the GLUE scripts).

    Args:
        init_rank: r_init, the rank every layer starts with.
        target_rank: the final average rank per layer (total budget ``target_rank * L``).
        alpha: the numerator of the fixed scale ``s = alpha / init_rank``.
        t_init: warm-up steps without masking.
        t_final: final steps with the budget at its target and the rank pattern fixed.
        delta_t: steps between two maskings while the budget falls.
        beta1: EMA coefficient of the sensitivity ``|w * grad|``.
        beta2: EMA coefficient of its uncertainty.
        orth_reg: gamma, the weight of the orthogonality regulariser on P and Q.
        total_steps: T, total optimizer steps; ``None`` takes them from the Trainer.
        dropout: dropout probability on the adapter's input only.
    """

    init_rank: int = 12
    target_rank: int = 8
    alpha: float = 16.0
    t_init: int = 500
    t_final: int = 1500
    delta_t: int = 10
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg: float = 0.1
    total_steps: int | None = None
    dropout: float = 0.0

    @classmethod
    def examples(cls) -> list[AdaLoRA]:
        return [cls(init_rank=4, target_rank=2, t_init=2, t_final=2, delta_t=1, total_steps=20)]

    def __post_init__(self) -> None:
        for name in ("init_rank", "delta_t"):
            setattr(self, name, check_int(name, getattr(self, name), minimum=1))
        for name in ("target_rank", "t_init", "t_final"):
            setattr(self, name, check_int(name, getattr(self, name), minimum=0))
        if self.total_steps is not None:
            self.total_steps = check_int("total_steps", self.total_steps, minimum=1)
        self.alpha = check_number("alpha", self.alpha, nonzero=True)
        self.orth_reg = check_number("orth_reg", self.orth_reg, minimum=0.0)
        self.dropout = check_fraction("dropout", self.dropout)
        for name in ("beta1", "beta2"):
            setattr(self, name, check_fraction(name, getattr(self, name)))
        if not 0 <= self.target_rank <= self.init_rank:
            raise ValueError(
                f"target_rank ({self.target_rank}) must be between 0 and init_rank "
                f"({self.init_rank}): lower target_rank or raise init_rank"
            )
        if self.t_init < 0 or self.t_final < 0 or self.delta_t < 1:
            raise ValueError(
                f"need t_init >= 0, t_final >= 0 and delta_t >= 1, got t_init={self.t_init}, "
                f"t_final={self.t_final}, delta_t={self.delta_t}"
            )
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.orth_reg < 0:
            raise ValueError(f"orth_reg must be >= 0, got {self.orth_reg}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def validate_layer(self, name: str, base: nn.Module) -> None:
        out_f, in_f = layer_shape(base)
        limit = min(out_f, in_f)
        if self.init_rank > limit:
            raise ValueError(
                f"init_rank {self.init_rank} is too large for layer {name!r} of shape "
                f"(out={out_f}, in={in_f}): use init_rank <= {limit} or exclude this layer with "
                "exclude_modules"
            )


class AdaLoRALayer(AdapterLayer):
    """A base layer plus ``s * P diag(lambda) Q``. See [`AdaLoRA`][lightning_lowrank.AdaLoRA].

    Args:
        base: the frozen layer.
        config: the method config.
        rank: the number of rank slots to build; ``None`` means ``config.init_rank``. A smaller
            value rebuilds a truncated adapter (see ``truncated_state``).
    """

    rank_mask: Tensor

    def __init__(self, base: nn.Module, config: AdaLoRA, rank: int | None = None) -> None:
        super().__init__(base, config)
        r = config.init_rank if rank is None else int(rank)
        if not 0 <= r <= config.init_rank:
            raise ValueError(f"rank must be between 0 and init_rank={config.init_rank}, got {r}")
        dtype, device = weight_dtype_device(base)
        self.rank = r
        # fixed at alpha / r_init, so truncating or masking slots does not rescale the others
        self.scale = config.alpha / config.init_rank
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        self.lora_A = nn.Parameter(torch.randn(r, self.in_features, **kw) * INIT_STD)
        self.lora_E = nn.Parameter(torch.zeros(r, **kw))
        self.lora_B = nn.Parameter(torch.randn(self.out_features, r, **kw) * INIT_STD)
        # 1 = slot kept, 0 = masked; persistent so checkpoints and adapter files carry the pattern
        self.register_buffer("rank_mask", torch.ones(r, **kw))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def initial_state(self) -> dict[str, Tensor]:
        r = self.rank
        a = self._empty(r, self.in_features).normal_() * INIT_STD
        b = self._empty(self.out_features, r).normal_() * INIT_STD
        return {
            "lora_A": a,
            "lora_E": self._empty(r).zero_(),
            "lora_B": b,
            "rank_mask": self._empty(r).fill_(1.0),
        }

    def adapter_input(self, x: Tensor) -> Tensor:
        return self.dropout(x)

    def fused_output(self, x: Tensor) -> Tensor | None:
        return self.fused_low_rank(x, self.lora_A, self.lora_B * self.lora_E, self.scale)

    def adapter_forward(self, x: Tensor) -> Tensor:
        if self.kind != "embedding":
            x = self.adapter_input(x.to(self.lora_A.dtype))
        h = embed_or_linear(self, x, self.lora_A)
        # scaling the (..., r) intermediate is cheaper than forming diag(lambda) with a factor
        return F.linear(h * (self.lora_E * self.scale), self.lora_B)

    def delta_weight(self) -> Tensor:
        return (self.lora_B * (self.lora_E * self.scale)) @ self.lora_A

    def param_sides(self) -> dict[str, Side]:
        # lambda is a 1-D tensor: LoRA+ puts it with the output side, as it does biases
        return {"lora_A": "A", "lora_E": "B", "lora_B": "B"}

    def layer_metadata(self) -> dict[str, Any]:
        return {"rank": self.rank}

    def peft_form(self) -> PeftLayer | None:
        """``dW = s P diag(lambda) Q`` over the slots in use: the kept slots, and any slot whose
        lambda is non-zero (so the export is exact mid-schedule too). lambda goes into A; the
        scale stays ``s = alpha / r_init`` through a per-layer ``alpha = s * r_kept``. None when
        every slot is pruned (a zero update)."""
        keep = (self.rank_mask != 0) | (self.lora_E != 0)
        k = int(keep.sum())
        if k == 0:
            return None
        a = self.lora_E[keep, None] * self.lora_A[keep]
        return peft_pair(self.lora_B[:, keep], a, self.scale, self.scale * k, False, self.kind)

    def live_rank(self) -> int:
        """Number of slots the rank mask keeps (all of them before a meta-device model has
        values)."""
        if self.rank_mask.is_meta:
            return self.rank
        return int(self.rank_mask.count_nonzero())

    @torch.no_grad()
    def truncated_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The adapter restricted to its kept slots, and the metadata that rebuilds it.

        Slots that are masked AND have ``lambda = 0`` are dropped, so the output is unchanged
        at any point of the schedule (mid-schedule the optimizer may have moved a masked slot's
        lambda off zero; such a slot is kept).
        """
        # a masked slot whose lambda the optimizer moved off zero (mid-schedule, before the
        # allocator re-masks) still contributes: keep it, as the PEFT export does
        keep = (self.rank_mask != 0) | (self.lora_E != 0)
        k = int(keep.sum())
        state = self.adapter_state_dict()  # anything else the layer carries is kept as it is
        state["lora_A"] = self.lora_A[keep]
        state["lora_E"] = self.lora_E[keep]
        state["lora_B"] = self.lora_B[:, keep]
        state["rank_mask"] = self.rank_mask[keep]
        meta = self.layer_metadata()
        meta["rank"] = k
        return state, meta

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scale={self.scale:g}"


AdaLoRA.layer_cls = AdaLoRALayer
