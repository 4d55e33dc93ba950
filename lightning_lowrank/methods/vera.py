"""VeRA (Kopiczko et al. 2023, arXiv 2310.11454): vector-based random matrix adaptation.

One frozen random pair is shared by every adapted layer: ``A`` of shape ``(r, in_max)`` and ``B`` of
shape ``(out_max, r)`` (Kaiming-uniform, drawn from ``seed``), where ``in_max`` and ``out_max`` are
the largest input and output sizes among the adapted layers. Each layer trains two vectors:

    dW = diag(b) @ B[:out] @ diag(d) @ A[:, :in],    d: (r,) init d_init,  b: (out,) init 0.

Trainable parameters per layer: ``r + out``. The pair is regenerated from the seed when the
adapters are built, held as non-persistent buffers of ONE module that every layer references (same
storage, moved once by ``.to()``), so adapter files and checkpoints hold only ``d``, ``b`` and, in
the file's metadata, the seed. ``r`` is the shared pair's rank and may exceed a layer's
``min(out, in)`` (the paper uses r = 256 and up on 768-wide layers and r = 1024 on smaller ones):
the update's rank is then simply at most ``min(out, in)``.

The forward pass takes whichever of two exact orders costs fewer multiply-adds for the input at
hand: the factored ``base(x) + ((x @ A.T) * d) @ B.T * b``, or, on a plain linear layer with
enough tokens, the effective weight ``W0 + dW`` (``methods/fused.py``, ``VeRALinear``).
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
    Side,
    layer_kind,
    layer_shape,
    weight_oi,
)
from lightning_lowrank.methods.fused import fusable, vera_linear, vera_prefers_dense


@dataclass
class VeRA(AdapterConfig):
    """Shared random low-rank pair, per-layer scaling vectors: ``dW = diag(b) B diag(d) A``.

    Args:
        rank: r, the rank of the shared random pair (typically large: 256).
        d_init: initial value of every entry of ``d``.
        seed: seed of the shared pair; the same seed always regenerates the same pair.
    """

    rank: int = 256
    d_init: float = 0.1
    seed: int = 0

    @classmethod
    def examples(cls) -> list[VeRA]:
        return [cls(rank=4, seed=3)]

    def validate_layer(self, name: str, base: nn.Module) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if layer_kind(base) == "embedding":
            raise ValueError(
                f"VeRA does not adapt embedding layers ({name!r}): exclude it with "
                "exclude_modules or target linear layers only"
            )
        layer_shape(base)  # raises for unsupported types

    def build(
        self, bases: dict[str, nn.Module], layer_meta: dict[str, dict[str, Any]] | None = None
    ) -> dict[str, AdapterLayer]:
        layer_meta = layer_meta or {}
        shapes = [layer_shape(b) for b in bases.values()]
        first = next(iter(bases.values())).weight
        shared = SharedProjection(
            self.rank,
            in_max=max(i for _, i in shapes),
            out_max=max(o for o, _ in shapes),
            seed=self.seed,
            dtype=first.dtype,
            device=first.device,
        )
        return {
            name: VeRALayer(base, self, shared, **layer_meta.get(name, {}))
            for name, base in bases.items()
        }


class SharedProjection(nn.Module):
    """The frozen pair ``A (r, in_max)``, ``B (out_max, r)`` shared by all VeRA layers.

    Non-persistent buffers: never saved, always regenerated from the seed (drawn in float32 on the
    CPU so every device and dtype sees the same numbers)."""

    def __init__(
        self,
        rank: int,
        in_max: int,
        out_max: int,
        seed: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        a = kaiming_uniform_generated(torch.empty(rank, in_max), gen)
        b = kaiming_uniform_generated(torch.empty(out_max, rank), gen)
        self.register_buffer("A", a.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("B", b.to(device=device, dtype=dtype), persistent=False)

    def extra_repr(self) -> str:
        return f"rank={self.A.shape[0]}, in_max={self.A.shape[1]}, out_max={self.B.shape[0]}"


def kaiming_uniform_generated(t: Tensor, generator: torch.Generator) -> Tensor:
    """:func:`kaiming_uniform_` (``a = sqrt(5)``) drawing from ``generator``."""
    return nn.init.kaiming_uniform_(t, a=5**0.5, generator=generator)


class VeRALayer(AdapterLayer):
    """A base layer plus ``diag(b) B[:out] diag(d) A[:, :in]``. See :class:`VeRA`."""

    def __init__(self, base: nn.Module, config: VeRA, shared: SharedProjection) -> None:
        super().__init__(base, config)
        if shared.A.shape[1] < self.in_features or shared.B.shape[0] < self.out_features:
            raise ValueError(
                "the shared VeRA pair is smaller than this layer: rebuild the adapters"
            )
        w = base.weight
        # a submodule referenced by every layer: one storage, and .to() moves it once
        self.shared = shared
        self.vera_lambda_d = nn.Parameter(
            torch.full((config.rank,), float(config.d_init), dtype=w.dtype, device=w.device)
        )
        self.vera_lambda_b = nn.Parameter(
            torch.zeros(self.out_features, dtype=w.dtype, device=w.device)
        )

    def factors(self) -> tuple[Tensor, Tensor]:
        """This layer's slices ``(B[:out], A[:, :in])`` of the shared pair."""
        return self.shared.B[: self.out_features], self.shared.A[:, : self.in_features]

    def fused_output(self, x: Tensor) -> Tensor | None:
        # with enough tokens the effective-weight order is cheaper (methods/fused.py)
        b, a = self.factors()
        d, lam_b = self.vera_lambda_d, self.vera_lambda_b
        tokens = x.numel() // x.shape[-1]
        if not vera_prefers_dense(tokens, self.out_features, self.in_features):
            return None
        if not fusable(self.base, x, a, b, d, lam_b):
            return None
        return vera_linear(x, weight_oi(self.base), self.base.bias, a, b, d, lam_b)

    def adapter_forward(self, x: Tensor) -> Tensor:
        b, a = self.factors()
        h = F.linear(x.to(a.dtype), a) * self.vera_lambda_d
        return F.linear(h, b) * self.vera_lambda_b

    def delta_weight(self) -> Tensor:
        b, a = self.factors()
        return self.vera_lambda_b[:, None] * (b * self.vera_lambda_d) @ a

    def param_sides(self) -> dict[str, Side]:
        # d scales the rank space (after A), b the output (after B); both are 1-D, and the
        # official LoRA+ rule puts every 1-D tensor on the B side
        return {"vera_lambda_d": "B", "vera_lambda_b": "B"}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.vera_lambda_d.numel()}"


VeRA.layer_cls = VeRALayer
