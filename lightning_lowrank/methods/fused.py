"""Fused forward and backward passes for adapted linear layers.

Autograd on the textbook formulas runs one node per operation: the base matmul, the adapter's
matmuls, the scaling and the add, and in backward it builds the input's gradient from two
separately allocated halves. On a CPU, where the rank-8 matmuls are cheap and memory traffic is
not, that bookkeeping costs more than the adapter's arithmetic. ``LowRankLinear`` computes
the same values in fewer passes:

    y = f * (x W0^T + s (x' A^T) B^T) + bias

for LoRA, AdaLoRA (``B = P diag(lambda)``) and SingLoRA (``f = 1``), and DoRA (``f = m / ||V||``,
a constant in backward); ``x'`` is the adapter's (possibly dropped-out) input. The adapter's
product is added in place into the base output, and the input gradient is accumulated in place:
``dx = g_z W0 + s (g_z B) A``. Only the tensors a gradient needs are saved: with A frozen
(LoRA-FA) the input is not kept, only ``x' A^T``. DoRA's factor needs ``sum_t g * z`` (z is the
bracket above). With no bias and no zero in ``f``, on a CPU and outside ``torch.compile``, ``z``
is scaled into ``y`` in place and recovered in backward as ``y / f`` instead of being kept beside
``y``; ``y`` is what the next operation usually keeps anyway, so one ``(tokens, out)`` tensor per
layer is saved rather than two. An in-place change of such a layer's output is then refused in
backward, with a message naming the fix. The result is never a view, so after any other layer
an in-place operation on its output is allowed, as after a plain ``nn.Linear``. VeRA's
effective-weight pass (``VeRALinear``) is VeRA-only and lives in ``methods/vera.py``; it shares
``fusable`` with this one.

It is an exact rewrite (the same sums in another order); ``tests/methods/test_fused.py`` checks values and
every gradient against the plain formulas in float64 and with ``torch.autograd.gradcheck``. The
layers use it only for a plain ``nn.Linear`` or GPT-2 ``Conv1D`` base with no hooks, one dtype
throughout and no autocast (``fusable``); anything else takes the generic path. It does not
support double backward (``once_differentiable``).

This module imports only the leaf ``methods/layers.py`` from the package.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules import module

from lightning_lowrank.methods.layers import conv1d_type


def fusable(base: nn.Module, x: Tensor, *tensors: Tensor) -> bool:
    """Whether a fused pass may replace ``base(x) + adapter``: ``base`` is a plain ``nn.Linear``
    or GPT-2 ``Conv1D`` (its class's own forward, no forward or backward hooks that would expect
    to see it run), autocast is off and ``x`` and ``tensors`` share the base weight's dtype."""
    if not _plain_forward(base):
        return False
    if _hooked(base) or _global_hooks():
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False
    dtype = base.weight.dtype
    return x.dtype == dtype and all(t.dtype == dtype for t in tensors)


class AutogradCtx(Protocol):
    """What autograd's ``ctx`` has at run time: torch's ``FunctionCtx`` stub lacks
    ``needs_input_grad`` and ``saved_tensors``, and saved Nones come back as None."""

    needs_input_grad: tuple[bool, ...]
    saved_tensors: tuple[Any, ...]

    def save_for_backward(self, *tensors: Tensor | None) -> None: ...


class _LowRankCtx(AutogradCtx, Protocol):
    same: bool
    scale: float
    from_output: bool


def _plain_forward(base: nn.Module) -> bool:
    forward = type(base).forward
    if forward is nn.Linear.forward:
        return True
    conv1d = conv1d_type()
    return conv1d is not None and forward is conv1d.forward


def _hooked(base: nn.Module) -> bool:
    return bool(
        base._forward_hooks
        or base._forward_pre_hooks
        or base._backward_hooks
        or base._backward_pre_hooks
    )


def _global_hooks() -> bool:
    return bool(
        module._global_forward_hooks
        or module._global_forward_pre_hooks
        or module._global_backward_hooks
        or module._global_backward_pre_hooks
    )


def _recoverable(factor: Tensor, bias: Tensor | None) -> bool:
    """Whether ``z`` is recovered exactly enough from ``y = f * z`` for the factor's gradient:
    no bias (``y - bias`` would lose the digits a large bias holds) and no zero in ``f``. The
    zero check reads the factor on the host, free on a CPU; on an accelerator it would stall the
    device once per layer, so there ``z`` is kept as before; so it is under ``torch.compile``,
    which cannot trace a branch on the factor's values."""
    if bias is not None or factor.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    return bool(factor.ne(0).all())


def rows(t: Tensor) -> Tensor:
    """``t`` as a 2-D ``(tokens, features)`` matrix."""
    return t.reshape(-1, t.shape[-1])


class LowRankLinear(torch.autograd.Function):
    """``y = f * (x W0^T + s (x' A^T) B^T) + bias``, with ``f`` optional. See the description of ``lightning_lowrank.methods.fused``.

    Inputs: ``x`` (..., in), ``x_adapter`` (None: ``x`` itself; or its dropout), ``w0`` (out, in),
    ``bias`` (out,) or None, ``a`` (r, in), ``b`` (out, r), ``scale`` (a float), ``factor`` (out,)
    or None.
    """

    @staticmethod
    def forward(
        ctx: _LowRankCtx,
        x: Tensor,
        x_adapter: Tensor | None,
        w0: Tensor,
        bias: Tensor | None,
        a: Tensor,
        b: Tensor,
        scale: float,
        factor: Tensor | None,
    ) -> Tensor:
        needs = ctx.needs_input_grad
        same = x_adapter is None
        x2 = rows(x)
        xa2 = x2 if x_adapter is None else rows(x_adapter)
        # the result is allocated in the output's shape and filled through a 2-D view of it, so
        # what the Function returns is not a view: a following in-place op (nn.ReLU(inplace=True))
        # is then allowed, as after a plain nn.Linear
        out = x2.new_empty(*x.shape[:-1], w0.shape[0])
        z = out.view(-1, w0.shape[0])
        # the bias goes in with the base matmul unless the factor must scale z without it
        if bias is None or factor is not None:
            torch.mm(x2, w0.t(), out=z)
        else:
            torch.addmm(bias, x2, w0.t(), out=z)
        # u = x' A^T, computed as (A x'^T)^T: the same numbers, faster for a narrow A on CPU BLAS
        u_t = a @ xa2.t()
        z.addmm_(u_t.t(), b.t(), alpha=scale)
        ctx.from_output = False
        kept = None
        if factor is not None:
            ctx.from_output = needs[7] and _recoverable(factor, bias)
            if ctx.from_output:
                # the factor's gradient, sum_t g * z, is recovered from the output (z = y / f):
                # z is scaled in place and not kept, so the only (T, out) tensor kept is y,
                # which the next operation often keeps anyway (an activation, a product)
                z.mul_(factor)
            else:
                kept = z if needs[7] else None
                out = out * factor if bias is None else torch.addcmul(bias, out, factor)
        ctx.same, ctx.scale = same, scale
        ctx.save_for_backward(
            x2 if needs[2] else None,  # W0's gradient (a base left trainable)
            xa2 if needs[4] else None,  # A's gradient
            u_t if needs[5] else None,  # B's gradient
            w0,
            a,
            b,
            factor,
            out if ctx.from_output else kept,
        )
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: _LowRankCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        try:
            x2, xa2, u_t, w0, a, b, factor, kept = ctx.saved_tensors
        except RuntimeError as err:
            if not ctx.from_output or "inplace" not in str(err):
                raise
            raise RuntimeError(
                "an operation after a DoRA layer changed the layer's output in place (for "
                "example nn.ReLU(inplace=True) or a `+=` on it); DoRA's fused pass keeps that "
                "output for the magnitude's gradient, so make the operation out of place"
            ) from err
        needs = ctx.needs_input_grad
        g = rows(grad)
        if not needs[7]:
            g_factor = None
        elif ctx.from_output:  # kept is y = f * z (see forward): sum_t g * z = sum_t g * y / f
            g_factor = (g * rows(kept)).sum(0).div_(factor)
        else:
            g_factor = (g * kept).sum(0)
        gz = g if factor is None else g * factor
        gx = gxa = None
        if needs[0] or needs[1] or needs[4]:
            # the gradient of u = x' A^T, as its transpose B^T gz^T: CPU BLAS runs these skinny
            # products 2-3x faster with the narrow (r, k) operand contiguous on the left
            gh_t = (b.t().contiguous() @ gz.t()).mul_(ctx.scale)
            if needs[0]:
                gx = gz @ w0
                if ctx.same:
                    gx.addmm_(gh_t.t(), a)
                gx = gx.view(*grad.shape[:-1], gx.shape[-1])
            if needs[1] and not ctx.same:
                gxa = (gh_t.t() @ a).view(*grad.shape[:-1], a.shape[-1])
            g_a = gh_t @ xa2 if needs[4] else None
        else:
            g_a = None
        # (u^T gz)^T rather than gz^T u, for the same reason (up to 6x on a 1536-wide layer)
        g_b = (u_t @ gz).mul_(ctx.scale).t() if needs[5] else None
        g_w0 = gz.t() @ x2 if needs[2] else None
        g_bias = g.sum(0) if needs[3] else None
        return gx, gxa, g_w0, g_bias, g_a, g_b, None, g_factor


def low_rank_linear(
    x: Tensor,
    x_adapter: Tensor,
    w0: Tensor,
    bias: Tensor | None,
    a: Tensor,
    b: Tensor,
    scale: float,
    factor: Tensor | None = None,
) -> Tensor:
    """``LowRankLinear`` with the base weight ``w0`` as ``(out, in)`` (a view for Conv1D).
    ``x_adapter`` is what the adapter sees (``x`` itself without dropout)."""
    # x itself goes in once: torch.compile cannot trace a Function given one tensor twice
    xa = None if x_adapter is x else x_adapter
    out: Tensor = LowRankLinear.apply(x, xa, w0, bias, a, b, scale, factor)
    return out


__all__ = [
    "LowRankLinear",
    "fusable",
    "rows",
    "low_rank_linear",
]
