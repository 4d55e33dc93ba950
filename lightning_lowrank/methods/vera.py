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
enough tokens, the effective weight ``W0 + dW`` (``VeRALinear``). The factored order costs
``2 T r (in + out)`` multiply-adds per call of ``T`` tokens (forward and backward through two
``r``-wide products); the effective-weight order costs ``out r in + T r (in + out)``: one
``(out, in)`` product, the base matmuls run on ``W`` instead of ``W0``, and the gradients of ``d``
and ``b`` come from ``C = g^T (x A^T)``:

    dL/db_i = sum_k B_ik d_k C_ik,    dL/dd_k = sum_i b_i B_ik C_ik.

It is cheaper when ``T (in + out) > out in`` (``vera_prefers_dense``), which the layer checks
on every call. Both orders are exact; ``tests/methods/test_fused.py`` checks values and gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from lightning_lowrank.methods.base import (
    AdapterConfig,
    AdapterLayer,
    PeftLayer,
    Side,
    check_int,
    check_number,
    peft_pair,
)
from lightning_lowrank.methods.fused import AutogradCtx, fusable, rows
from lightning_lowrank.methods.layers import layer_kind, layer_shape, weight_dtype_device, weight_oi


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

    def __post_init__(self) -> None:
        self.rank = check_int("rank", self.rank, minimum=1)
        self.d_init = check_number("d_init", self.d_init, nonzero=True)
        self.seed = check_int("seed", self.seed, minimum=0)

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
        layer_meta = {n: dict(facts) for n, facts in (layer_meta or {}).items()}
        shapes = [layer_shape(b) for b in bases.values()]
        # the pair's size as recorded when it was drawn: a file may lack the widest layer
        # (LoRA-drop's "drop" mode leaves dropped layers out), and the draw depends on the size
        ins = [
            check_int("pair_in", f.pop("pair_in"), 1) for f in layer_meta.values() if "pair_in" in f
        ]
        outs = [
            check_int("pair_out", f.pop("pair_out"), 1)
            for f in layer_meta.values()
            if "pair_out" in f
        ]
        in_max = max([i for _, i in shapes] + ins)
        out_max = max([o for o, _ in shapes] + outs)
        dtype, device = weight_dtype_device(next(iter(bases.values())))
        shared = SharedProjection(
            self.rank, in_max, out_max, seed=self.seed, dtype=dtype, device=device
        )
        return {
            name: VeRALayer(base, self, shared, **layer_meta.get(name, {}))
            for name, base in bases.items()
        }


class SharedProjection(nn.Module):
    """The frozen pair ``A (r, in_max)``, ``B (out_max, r)`` shared by all VeRA layers.

    Non-persistent buffers: never saved, always regenerated from the seed (drawn in float32 on the
    CPU so every device and dtype sees the same numbers)."""

    A: Tensor
    B: Tensor

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
        self.seed = seed
        a, b = self.draw(rank, in_max, out_max, seed)
        self.register_buffer("A", a.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("B", b.to(device=device, dtype=dtype), persistent=False)

    @staticmethod
    def draw(rank: int, in_max: int, out_max: int, seed: int) -> tuple[Tensor, Tensor]:
        """The pair drawn from ``seed`` (float32, CPU)."""
        gen = torch.Generator().manual_seed(seed)
        a = kaiming_uniform_generated(torch.empty(rank, in_max), gen)
        b = kaiming_uniform_generated(torch.empty(out_max, rank), gen)
        return a, b

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Regenerate the pair from the seed (after Lightning materialises a meta-device model)."""
        if self.A.is_meta:
            return
        a, b = self.draw(self.A.shape[0], self.A.shape[1], self.B.shape[0], self.seed)
        self.A.copy_(a)
        self.B.copy_(b)

    def extra_repr(self) -> str:
        return f"rank={self.A.shape[0]}, in_max={self.A.shape[1]}, out_max={self.B.shape[0]}"


def kaiming_uniform_generated(t: Tensor, generator: torch.Generator) -> Tensor:
    """``kaiming_uniform_`` (``a = sqrt(5)``) drawing from ``generator``."""
    return nn.init.kaiming_uniform_(t, a=5**0.5, generator=generator)


def vera_prefers_dense(tokens: int, out_features: int, in_features: int) -> bool:
    """Whether VeRA's effective-weight order costs fewer multiply-adds than the factored one for
    a call of ``tokens`` rows: ``out r in + T r (in + out) < 2 T r (in + out)``."""
    return tokens * (in_features + out_features) > out_features * in_features


def vera_weight(w0: Tensor, a: Tensor, b: Tensor, d: Tensor, lam_b: Tensor) -> Tensor:
    """The effective weight ``W0 + diag(b) B diag(d) A``."""
    return torch.addcmul(w0, lam_b[:, None], (b * d) @ a)


class VeRALinear(torch.autograd.Function):
    """``y = x (W0 + diag(b) B diag(d) A)^T + bias`` through the effective weight.

    Inputs: ``x`` (..., in), ``w0`` (out, in), ``bias`` (out,) or None, ``a`` (r, in) and ``b``
    (out, r) (the frozen shared pair, sliced), ``d`` (r,), ``lam_b`` (out,).
    """

    @staticmethod
    def forward(
        ctx: AutogradCtx,
        x: Tensor,
        w0: Tensor,
        bias: Tensor | None,
        a: Tensor,
        b: Tensor,
        d: Tensor,
        lam_b: Tensor,
    ) -> Tensor:
        needs = ctx.needs_input_grad
        w = vera_weight(w0, a, b, d, lam_b)
        y = F.linear(x, w, bias)
        x2 = rows(x)
        u = x2 @ a.t() if needs[5] or needs[6] else None  # for the gradients of d and b
        ctx.save_for_backward(x2 if needs[1] else None, w, u, b, d, lam_b)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: AutogradCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x2, w, u, b, d, lam_b = ctx.saved_tensors
        needs = ctx.needs_input_grad
        g = rows(grad)
        gx = grad @ w if needs[0] else None
        g_d = g_b = None
        if needs[5] or needs[6]:
            bc = b * (g.t() @ u)  # B_ik C_ik, (out, r)
            g_d = lam_b @ bc if needs[5] else None
            g_b = bc @ d if needs[6] else None
        g_w0 = g.t() @ x2 if needs[1] else None
        g_bias = g.sum(0) if needs[2] else None
        return gx, g_w0, g_bias, None, None, g_d, g_b


def vera_linear(
    x: Tensor, w0: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, d: Tensor, lam_b: Tensor
) -> Tensor:
    """``VeRALinear`` with the base weight ``w0`` as ``(out, in)``; without autograd, one
    dense matmul."""
    if not torch.is_grad_enabled():
        return F.linear(x, vera_weight(w0, a, b, d, lam_b), bias)
    out: Tensor = VeRALinear.apply(x, w0, bias, a, b, d, lam_b)
    return out


class VeRALayer(AdapterLayer):
    """A base layer plus ``diag(b) B[:out] diag(d) A[:, :in]``. See [`VeRA`][lightning_lowrank.VeRA]."""

    def __init__(self, base: nn.Module, config: VeRA, shared: SharedProjection) -> None:
        super().__init__(base, config)
        if shared.A.shape[1] < self.in_features or shared.B.shape[0] < self.out_features:
            raise ValueError(
                "the shared VeRA pair is smaller than this layer: rebuild the adapters"
            )
        dtype, device = weight_dtype_device(base)
        # a submodule referenced by every layer: one storage, and .to() moves it once
        self.shared = shared
        self.vera_lambda_d = nn.Parameter(
            torch.full((config.rank,), float(config.d_init), dtype=dtype, device=device)
        )
        self.vera_lambda_b = nn.Parameter(
            torch.zeros(self.out_features, dtype=dtype, device=device)
        )

    def layer_metadata(self) -> dict[str, Any]:
        return {"pair_in": self.shared.A.shape[1], "pair_out": self.shared.B.shape[0]}

    def initial_state(self) -> dict[str, Tensor]:
        d_init = float(self.config.d_init)  # type: ignore[attr-defined]
        return {
            "vera_lambda_d": self._empty(*self.vera_lambda_d.shape).fill_(d_init),
            "vera_lambda_b": self._empty(*self.vera_lambda_b.shape).zero_(),
        }

    def shared_slices(self) -> tuple[Tensor, Tensor]:
        """This layer's slices ``(B[:out], A[:, :in])`` of the shared pair."""
        return self.shared.B[: self.out_features], self.shared.A[:, : self.in_features]

    def fused_output(self, x: Tensor) -> Tensor | None:
        # with enough tokens the effective-weight order is cheaper (methods/fused.py)
        b, a = self.shared_slices()
        d, lam_b = self.vera_lambda_d, self.vera_lambda_b
        tokens = x.numel() // x.shape[-1]
        if not vera_prefers_dense(tokens, self.out_features, self.in_features):
            return None
        if not fusable(self.base, x, a, b, d, lam_b):
            return None
        bias = cast("Tensor | None", self.base.bias)
        return vera_linear(x, weight_oi(self.base), bias, a, b, d, lam_b)

    def adapter_forward(self, x: Tensor) -> Tensor:
        b, a = self.shared_slices()
        h = F.linear(x.to(a.dtype), a) * self.vera_lambda_d
        return F.linear(h, b) * self.vera_lambda_b

    def delta_weight(self) -> Tensor:
        b, a = self.shared_slices()
        return self.vera_lambda_b[:, None] * (b * self.vera_lambda_d) @ a

    def peft_form(self) -> PeftLayer:
        """``dW = diag(b) B diag(d) A`` is the pair ``(diag(b) B[:out], diag(d) A[:, :in])`` at
        VeRA's rank with scale 1 (``alpha = r``): exact, though the file holds dense factors, not
        just ``b`` and ``d``."""
        b, a = self.shared_slices()
        r = a.shape[0]
        return peft_pair(
            self.vera_lambda_b[:, None] * b,
            self.vera_lambda_d[:, None] * a,
            1.0,
            float(r),
            False,
            self.kind,
        )

    def param_sides(self) -> dict[str, Side]:
        # d scales the rank space (after A), b the output (after B); both are 1-D, and the
        # official LoRA+ rule puts every 1-D tensor on the B side
        return {"vera_lambda_d": "B", "vera_lambda_b": "B"}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.vera_lambda_d.numel()}"


VeRA.layer_cls = VeRALayer
