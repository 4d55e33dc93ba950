"""LoRA (Hu et al. 2021), with rsLoRA scaling (Kalajdzievski 2023) and LoRA-FA (Zhang et al. 2023).

The update of a frozen weight ``W0`` of shape ``(out, in)`` is

    dW = s * B @ A,    A: (r, in),  B: (out, r),
    s = alpha / r  (``scaling="standard"``)  or  alpha / sqrt(r)  (``scaling="rslora"``).

A is Kaiming-uniform and B is zero, so the adapted model equals the base at initialisation. The
forward pass is ``base(x) + s * (dropout(x) @ A.T) @ B.T``: the dense ``dW`` is never built.
``train_a=False`` freezes A after its random initialisation (LoRA-FA): only B trains, and autograd
keeps ``x @ A.T`` (r values per token) instead of the full input for A's gradient.
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
    Scaling,
    Side,
    check_bool,
    check_fraction,
    check_int,
    check_number,
    embed_or_linear,
    kaiming_uniform_,
    peft_pair,
    scale_factor,
)
from lightning_lowrank.methods.layers import weight_dtype_device


@dataclass
class LoRA(AdapterConfig):
    """Low-rank adaptation: ``dW = s * B @ A``.

    Args:
        rank: r, the inner dimension of the update.
        alpha: the numerator of the scale ``s``.
        dropout: dropout probability on the adapter's input only (the base path sees ``x``).
        scaling: ``"standard"`` (``s = alpha / r``) or ``"rslora"`` (``s = alpha / sqrt(r)``).
        train_a: ``False`` freezes A after initialisation (LoRA-FA); only B trains.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    scaling: Scaling = "standard"
    train_a: bool = True

    @classmethod
    def examples(cls) -> list[LoRA]:
        return [
            cls(rank=2, alpha=4.0),
            cls(rank=2, alpha=4.0, scaling="rslora"),
            cls(rank=2, train_a=False),
        ]

    def __post_init__(self) -> None:
        self.rank = check_int("rank", self.rank, minimum=1)
        self.alpha = check_number("alpha", self.alpha, nonzero=True)
        self.dropout = check_fraction("dropout", self.dropout)
        check_bool("train_a", self.train_a)
        scale_factor(self.alpha, max(self.rank, 1), self.scaling)  # validates `scaling`


class LoRALayer(AdapterLayer):
    """A base layer plus ``s * B @ A``. See [`LoRA`][lightning_lowrank.LoRA]."""

    config: LoRA

    def __init__(
        self, base: nn.Module, config: LoRA, rank: int | None = None, alpha: float | None = None
    ) -> None:
        super().__init__(base, config)
        # per-layer rank / alpha overrides (PEFT's rank_pattern / alpha_pattern); None: the config's
        self.rank = config.rank if rank is None else int(rank)
        self.alpha = config.alpha if alpha is None else float(alpha)
        r = self.rank
        dtype, device = weight_dtype_device(base)
        self.scale = scale_factor(self.alpha, r, config.scaling)
        self.lora_A = nn.Parameter(
            torch.empty(r, self.in_features, dtype=dtype, device=device),
            requires_grad=config.train_a,
        )
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=device))
        if self.kind == "embedding":
            # as in PEFT: A is zero and B random, so the embedding lookup of A gets a gradient
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)
            if not config.train_a:
                raise ValueError("train_a=False (LoRA-FA) is not supported on embedding layers")
        else:
            kaiming_uniform_(self.lora_A)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def initial_state(self) -> dict[str, Tensor]:
        a, b = self._empty(*self.lora_A.shape), self._empty(*self.lora_B.shape)
        if self.kind == "embedding":
            return {"lora_A": a.zero_(), "lora_B": nn.init.normal_(b)}
        return {"lora_A": kaiming_uniform_(a), "lora_B": b.zero_()}

    def fused_output(self, x: Tensor) -> Tensor | None:
        # one pass for base and adapter: on one MiniLM layer (1024 tokens, one CPU thread)
        # forward + backward costs about 1.1x the frozen layer's, against 1.2-1.4x for base(x)
        # plus the adapter through plain autograd (methods/fused.py)
        return self.fused_low_rank(x, self.lora_A, self.lora_B, self.scale)

    def adapter_input(self, x: Tensor) -> Tensor:
        return self.dropout(x)

    def adapter_forward(self, x: Tensor) -> Tensor:
        if self.kind != "embedding":
            x = self.adapter_input(x.to(self.lora_A.dtype))
        h = embed_or_linear(self, x, self.lora_A)
        # scaling the (..., r) intermediate is cheaper than scaling either factor or the output
        return F.linear(h * self.scale, self.lora_B)

    def delta_weight(self) -> Tensor:
        return (self.lora_B @ self.lora_A) * self.scale

    def low_rank_factors(self) -> tuple[Tensor, Tensor, float]:
        return self.lora_B, self.lora_A, self.scale

    def peft_form(self) -> PeftLayer:
        """The pair itself, one to one: LoRA, rsLoRA, LoRA-FA (a frozen A is still a pair) and
        LoRA-drop (each sharing layer writes its own copy of the shared pair)."""
        return peft_pair(
            self.lora_B,
            self.lora_A,
            self.scale,
            self.alpha,
            self.config.scaling == "rslora",
            self.kind,
        )

    def layer_metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {}
        if self.rank != self.config.rank:
            meta["rank"] = self.rank
        if self.alpha != self.config.alpha:
            meta["alpha"] = self.alpha
        return meta

    def param_sides(self) -> dict[str, Side]:
        sides: dict[str, Side] = {"lora_B": "B"}
        if self.config.train_a:
            sides["lora_A"] = "A"
        return sides


LoRA.layer_cls = LoRALayer
