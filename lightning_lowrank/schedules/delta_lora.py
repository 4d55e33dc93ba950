"""Delta-LoRA (Zi et al. 2023, arXiv 2309.02411): the frozen base also moves, by the delta's delta.

After every optimizer step ``t -> t + 1`` past a warm-up of ``K`` steps, each adapted layer's base
weight follows the change of the low-rank product, with no gradient and no optimizer state:

    W_{t+1} = W_t + lambda * (dW_{t+1} - dW_t),      dW = delta_weight() (LoRA: s * B @ A).

The updates telescope: ``W_T = W_K + lambda * (dW_T - dW_K)``, so the effective weight is

    W_eff(t) = W_0 + dW_t + lambda * (dW_t - dW_K)        (t > K; W_eff = W_0 + dW_t before).

Two equivalent forms (``mode``):

- ``"inplace"`` (the paper's): the base weight is updated after each optimizer step. With
  ``low_rank_factors()`` (LoRA, SingLoRA) ``dW_{t+1} - dW_t`` is applied as ONE ``addmm_`` of rank
  ``2k`` into the weight's storage (``[c1 B1, c0 B0] @ [A1; -A0]``), so no dense ``(out, in)``
  temporary is built; other methods fall back to ``delta_weight()``.
- ``"implicit"``: the base stays pristine and the layer's forward adds
  ``lambda * (dW_t - dW_K) x`` with the factors detached (the adapter's gradient is exactly the
  in-place form's, and the input still gets the gradient of the full effective weight).

Either way each layer carries a ``DeltaLoRABase`` extension whose persistent buffers hold
``dW_K`` (as factors, or dense for methods without factors). Adapter files and checkpoints therefore
carry what rebuilds the trained model from the ORIGINAL base: ``load_adapter`` on a fresh base
model restores the implicit form, which gives the same outputs as the trained in-place model.

Dropout on the adapter path is refused: with it, the change of ``B @ A`` is no stand-in for the
base weight's gradient (the paper turns it off).
"""

from __future__ import annotations

import warnings
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from lightning_lowrank.methods.base import (
    AdapterLayer,
    LayerExtension,
    check_int,
    check_number,
    embed_or_linear,
    weight_oi,
)
from lightning_lowrank.methods.layers import is_quantized
from lightning_lowrank.schedules.base import Schedule
from lightning_lowrank.shard import gathered, shard_like

Mode = Literal["inplace", "implicit"]
#: a snapshot of ``dW``: ``(c * B, A)`` factors, or the dense matrix
Snapshot = tuple[Tensor, Tensor] | Tensor


@torch.no_grad()
def delta_snapshot(layer: AdapterLayer) -> Snapshot:
    """A copy of the layer's current ``dW``: ``(c * B, A)`` when the method has low-rank factors
    (``k * (out + in)`` values), else the dense ``delta_weight()``. Full tensors, also when the
    adapter is sharded (FSDP2: gathered, a collective)."""
    with gathered(layer, everything=False):
        factors = layer.low_rank_factors()
        if factors is None:
            return layer.delta_weight().detach().clone()
        b, a, c = factors
        return (b * c).detach().clone(), a.detach().clone()


@torch.no_grad()
def apply_base_update(layer: AdapterLayer, before: Snapshot, scale: float) -> None:
    """``W += scale * (dW_now - dW_before)`` on the layer's base weight, in place.

    With factors on both sides this is one rank-``2k`` ``addmm_`` into the weight's own storage
    (also through the transposed views of ``Conv1D`` and embedding tables)."""
    w = weight_oi(layer.base)
    now = delta_snapshot(layer)
    if isinstance(now, tuple) and isinstance(before, tuple):
        left = torch.cat([now[0], before[0]], dim=1).to(w.dtype)
        right = torch.cat([now[1], -before[1]], dim=0).to(w.dtype)
        if isinstance(layer.base.weight, DTensor):
            _addmm_sharded(layer, left, right, scale)
        else:
            w.addmm_(left, right, alpha=scale)
        return
    now = now if isinstance(now, Tensor) else now[0] @ now[1]
    old = before if isinstance(before, Tensor) else before[0] @ before[1]
    w.add_(shard_like((now - old).to(w.dtype), w), alpha=scale)


def _addmm_sharded(layer: AdapterLayer, left: Tensor, right: Tensor, scale: float) -> None:
    """``W += scale * left @ right`` on this rank's rows of a base weight sharded by FSDP2
    (``Shard(0)`` of its storage), in the shard's own storage: writes there persist, unlike
    writes into the unsharded weight FSDP2 builds for the forward."""
    weight = cast(DTensor, layer.base.weight)
    # storage (out, in) for nn.Linear; (in, out) for Conv1D and embeddings: W^T += R^T L^T
    first, second = (left, right) if layer.kind == "linear" else (right.t(), left.t())
    rows = cast(DTensor, shard_like(first.contiguous(), weight)).to_local()  # this rank's rows
    weight.to_local().addmm_(rows, second, alpha=scale)


class DeltaLoRABase(LayerExtension):
    """One layer's Delta-LoRA state: the reference delta ``dW_K`` and, in the implicit form, the
    term ``lambda * (dW_t - dW_K)`` added to the output and to the merged weight.

    Buffers (persistent, so adapter files and checkpoints carry them): ``ref_B`` ``(out, k)`` and
    ``ref_A`` ``(k, in)`` with ``dW_K = ref_B @ ref_A`` (the scale folded into ``ref_B``), or
    ``ref_delta`` ``(out, in)`` for methods without low-rank factors.

    Args:
        layer: the adapter layer this extends (for shapes, dtype and device).
        scale: lambda, the multiplier of the base update.
        rank: k, the inner size of the layer's ``low_rank_factors()``; None stores ``dW_K`` dense.
        implicit: add the term in the forward (True), or leave it to in-place base updates.
        active: whether the warm-up is over (``dW_K`` has been recorded).
    """

    name = "delta_lora"
    ref_delta: Tensor
    ref_B: Tensor
    ref_A: Tensor

    def __init__(
        self,
        layer: AdapterLayer,
        scale: float,
        rank: int | None,
        implicit: bool,
        active: bool = False,
    ) -> None:
        super().__init__()
        w = cast(Tensor, layer.base.weight)
        kw: dict[str, Any] = {"dtype": _adapter_dtype(layer), "device": w.device}
        out_f, in_f = layer.out_features, layer.in_features
        if rank is None:
            self.register_buffer("ref_delta", torch.zeros(out_f, in_f, **kw))
        else:
            self.register_buffer("ref_B", torch.zeros(out_f, rank, **kw))
            self.register_buffer("ref_A", torch.zeros(rank, in_f, **kw))
        self.scale = float(scale)
        self.rank = rank
        self.implicit = implicit
        self.active = active

    @torch.no_grad()
    def record_reference(self, layer: AdapterLayer) -> None:
        """Store the layer's current delta as ``dW_K`` and start the update."""
        snap = delta_snapshot(layer)
        if self.rank is None:
            self.ref_delta.copy_(snap if isinstance(snap, Tensor) else snap[0] @ snap[1])
        else:
            self.ref_B.copy_(snap[0])
            self.ref_A.copy_(snap[1])
        self.active = True

    def reference_delta(self) -> Tensor:
        """The dense ``dW_K`` (for merge and analysis)."""
        return self.ref_delta if self.rank is None else self.ref_B @ self.ref_A

    def add_output(self, layer: AdapterLayer, x: Tensor, out: Tensor) -> Tensor:
        if not (self.implicit and self.active):
            return out
        factors = layer.low_rank_factors()
        if factors is not None and self.rank is not None:
            with torch.no_grad():
                # detached factors: A and B get exactly the in-place form's gradient, while x
                # still sees the whole effective weight
                b, a, c = factors
                left = torch.cat([b * (c * self.scale), self.ref_B * -self.scale], dim=1)
                right = torch.cat([a, self.ref_A], dim=0)
            if layer.kind != "embedding":
                x = x.to(right.dtype)
            term = F.linear(embed_or_linear(layer, x, right), left)
        else:
            with torch.no_grad():
                dense = (layer.delta_weight() - self.reference_delta()) * self.scale
            if layer.kind != "embedding":
                x = x.to(dense.dtype)
            term = embed_or_linear(layer, x, dense)
        return out + term.to(out.dtype)

    def add_weight(self, layer: AdapterLayer, delta: Tensor) -> Tensor:
        if not (self.implicit and self.active):
            return delta
        return delta + (delta - self.reference_delta().to(delta.dtype)) * self.scale

    def base_is_original(self) -> bool:
        return self.implicit or not self.active

    def metadata(self) -> dict[str, Any]:
        # an adapter file always describes the update relative to the original base weight
        return {"scale": self.scale, "rank": self.rank, "active": self.active}

    @classmethod
    def from_metadata(cls, layer: AdapterLayer, meta: dict[str, Any]) -> DeltaLoRABase:
        return cls(layer, meta["scale"], meta["rank"], implicit=True, active=meta["active"])

    def extra_repr(self) -> str:
        form = "implicit" if self.implicit else "inplace"
        return f"scale={self.scale}, rank={self.rank}, {form}, active={self.active}"


class DeltaLoRA(Schedule):
    """Delta-LoRA: after each optimizer step past ``start_step``, ``W += scale * (dW_new - dW_old)``.

    Pass it to the callback:
    ``LowRankCallback(LoRA(rank=8, alpha=16), schedules=[DeltaLoRA(scale=2.0, start_step=500)])``.
    It works over every method whose layers use the generic forward and merge of
    [`AdapterLayer`][lightning_lowrank.AdapterLayer] (LoRA, LoRA-FA, SingLoRA, ...);
    methods with ``low_rank_factors()`` get the cheap rank-``2k`` update, others a dense one.

    Args:
        scale: lambda, the multiplier of the base update (the paper's default 2).
        start_step: K, the optimizer steps of plain LoRA before the base starts moving (~500 in
            the paper). ``dW_K`` is recorded just before step ``K + 1``.
        mode: ``"inplace"`` updates the base weights (the paper's form: no cost in the forward,
            checkpoints keep the adapted layers' base weights); ``"implicit"`` keeps them pristine
            and adds ``lambda * (dW_t - dW_K) x`` in the forward (bases may be shared, sharded
            or quantized; checkpoints stay adapter-only).
    """

    def __init__(self, scale: float = 2.0, start_step: int = 500, mode: Mode = "inplace") -> None:
        scale = check_number("scale", scale, nonzero=True)
        start_step = check_int("start_step", start_step, minimum=0)
        if mode not in ("inplace", "implicit"):
            raise ValueError(f"mode must be 'inplace' or 'implicit', got {mode!r}")
        self.scale = float(scale)
        self.start_step = int(start_step)
        self.mode: Mode = mode
        self.active = False
        self._layers: dict[str, AdapterLayer] = {}
        self._before: dict[str, Snapshot] = {}

    def setup(
        self, model: nn.Module, layers: dict[str, AdapterLayer], total_steps: int | None
    ) -> None:
        for name, layer in layers.items():
            _check_layer(name, layer)
            if self.mode == "inplace" and is_quantized(layer.base):
                raise ValueError(
                    f"DeltaLoRA(mode='inplace') would write into the quantized base of {name!r} "
                    "(4-bit storage has no dense weight to update): use mode='implicit', which "
                    "adds the same term in the forward and leaves the base untouched"
                )
        for layer in layers.values():
            if self.mode == "inplace":
                layer.own_base_weight()  # a tied weight's other users keep the original
            factors = layer.low_rank_factors()
            rank = None if factors is None else int(factors[0].shape[1])
            layer.extension = DeltaLoRABase(layer, self.scale, rank, self.mode == "implicit")
        self._layers = layers
        if total_steps is not None and self.start_step >= total_steps:
            warnings.warn(
                f"DeltaLoRA(start_step={self.start_step}) never starts in a run of "
                f"{total_steps} optimizer steps: lower start_step",
                stacklevel=2,
            )

    def before_optimizer_step(
        self, model: nn.Module, layers: dict[str, AdapterLayer], step: int
    ) -> None:
        if not self.active and step >= self.start_step:
            for layer in layers.values():
                _extension(layer).record_reference(layer)
            self.active = True
        if self.active and self.mode == "inplace":
            self._before = {n: delta_snapshot(layer) for n, layer in layers.items()}

    def after_optimizer_step(
        self, model: nn.Module, layers: dict[str, AdapterLayer], step: int
    ) -> None:
        before, self._before = self._before, {}
        if before and not _all_finite([layers[n] for n in before]):
            # a non-finite loss or gradient reached the adapter: never let it into the base
            # weights (one host sync per step, for all layers at once)
            warnings.warn(
                f"DeltaLoRA: the adapter has non-finite values after optimizer step {step} (a "
                "NaN/inf loss or gradient?): the base-weight update of this step is skipped",
                stacklevel=2,
            )
            return
        for name, snapshot in before.items():
            apply_base_update(layers[name], snapshot, self.scale)

    def checkpoint_keeps_base(self) -> bool:
        # the in-place form changes the adapted layers' base weights; the implicit one does not
        return self.mode == "inplace"

    def state_dict(self) -> dict[str, Any]:
        # dW_K lives in the layers' buffers (model state); only the phase is kept here
        return {"active": self.active, "mode": self.mode, "scale": self.scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["mode"] != self.mode or state["scale"] != self.scale:
            raise ValueError(
                f"checkpoint was trained with DeltaLoRA(mode={state['mode']!r}, "
                f"scale={state['scale']}): resume with the same mode and scale"
            )
        self.active = bool(state["active"])
        for layer in self._layers.values():
            _extension(layer).active = self.active


def _all_finite(layers: list[AdapterLayer]) -> bool:
    flags = [
        torch.isfinite(p).all()
        for layer in layers
        for n, p in layer.named_parameters()
        if not n.startswith("base.") and p.is_floating_point()
    ]
    return bool(torch.stack(flags).all()) if flags else True


def _adapter_dtype(layer: AdapterLayer) -> torch.dtype:
    for name, p in layer.named_parameters():
        if not name.startswith("base.") and p.is_floating_point():
            return p.dtype
    return cast(Tensor, layer.base.weight).dtype


def _extension(layer: AdapterLayer) -> DeltaLoRABase:
    ext = layer.extension
    if not isinstance(ext, DeltaLoRABase):
        raise RuntimeError("DeltaLoRA.setup must run before its step hooks")
    return ext


def _check_layer(name: str, layer: AdapterLayer) -> None:
    """Refuse layers Delta-LoRA cannot drive, with the fix in the message."""
    dropout = float(getattr(layer.config, "dropout", 0.0) or 0.0)
    for sub_name, module in layer.named_modules():
        if sub_name == "base" or sub_name.startswith("base."):
            continue
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            dropout = max(dropout, module.p)
    if dropout > 0:
        raise ValueError(
            f"Delta-LoRA cannot run with dropout on the adapter path (layer {name!r} has "
            f"p={dropout}): the change of the low-rank product then no longer stands in for the "
            "base weight's gradient. Set the method's dropout=0.0"
        )
    overridden = [
        hook
        for hook in ("forward", "merge", "unmerge")
        if getattr(type(layer), hook) is not getattr(AdapterLayer, hook)
    ]
    if overridden:
        raise ValueError(
            f"Delta-LoRA needs layers that use AdapterLayer's own forward/merge/unmerge (which "
            f"apply its term), but {type(layer).__name__} on {name!r} overrides {overridden}: "
            "use a method such as LoRA or SingLoRA"
        )
    if layer.extension is not None:
        raise ValueError(
            f"layer {name!r} already has an extension ({type(layer.extension).__name__}): only "
            "one DeltaLoRA schedule can drive a layer"
        )
