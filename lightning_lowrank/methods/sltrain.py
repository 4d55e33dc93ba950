"""SLTrain (Han et al. 2024, arXiv 2406.02214): sparse plus low-rank weights.

    adapter:   W = W0 + s * B @ A + S        (W0 frozen)
    pretrain:  W =      s * B @ A + S        (no dense weight at all)

``A: (r, in)`` Kaiming-uniform, ``B: (out, r)`` zero, ``s = alpha / r`` (or ``alpha / sqrt(r)``).
``S`` has a fixed random support of ``nnz = round(density * out * in)`` entries, drawn once per
layer from ``seed`` and the layer's name (never stored: regenerated, and checked against a
fingerprint kept in the adapter file's layer metadata). Only its values train: initialised to 0 as
an adapter and to ``U(-1/sqrt(in), 1/sqrt(in))`` for pre-training. Pure low-rank pre-training
(density 0) starts ``B`` random rather than zero: with no sparse part, ``B = 0`` is a stationary
point (every weight is zero, and stacked zero layers pass no gradient).

No sparse kernels: ``x @ S.T`` scatters the values into a dense ``(out, in)`` temporary for one
matmul, and the values' gradient is the dense weight gradient ``grad_y.T @ x`` gathered at the
support (``SparseLinearFunction``). ``S`` is rebuilt in backward rather than kept alive.
The low-rank part runs factored, ``s * (x @ A.T) @ B.T``, as in LoRA.

Pre-training mode (``SLTrain(mode="pretrain")``, or [`sltrain_pretrain`][lightning_lowrank.sltrain_pretrain]) removes the base
layer's dense weight parameter: only ``A``, ``B``, the sparse values (and the bias) train, and the
memory of a dense weight, its gradient and its optimizer state is never spent. ``merge`` / ``unload``
materialise ``s * B @ A + S`` as a plain weight again.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_lowrank.methods.base import (
    AdapterConfig,
    AdapterLayer,
    PeftExportError,
    Scaling,
    Side,
    check_bool,
    check_fraction,
    check_int,
    check_number,
    kaiming_uniform_,
    layer_kind,
    scale_factor,
)
from lightning_lowrank.methods.layers import weight_dtype_device

Mode = Literal["adapter", "pretrain"]


@dataclass
class SLTrain(AdapterConfig):
    """Sparse plus low-rank: ``dW = s * B @ A + S`` with a fixed random support for ``S``.

    Args:
        rank: r, the rank of the low-rank part.
        alpha: the numerator of the scale ``s``.
        density: the fraction of entries of ``S`` that train (paper: 0.01-0.05, default 0.03).
        seed: seed of the sparse supports (combined with each layer's name).
        scaling: ``"standard"`` (``s = alpha / r``) or ``"rslora"`` (``s = alpha / sqrt(r)``).
        mode: ``"adapter"`` (over a frozen base weight) or ``"pretrain"`` (replaces the dense
            weight; see [`sltrain_pretrain`][lightning_lowrank.sltrain_pretrain]).
        train_a: ``False`` freezes A after initialisation (LoRA-FA style, adapter mode).
    """

    rank: int = 8
    alpha: float = 16.0
    density: float = 0.03
    seed: int = 0
    scaling: Scaling = "standard"
    mode: Mode = "adapter"
    train_a: bool = True

    @classmethod
    def examples(cls) -> list[SLTrain]:
        return [
            cls(rank=2, density=0.25, seed=1),
            cls(rank=2, density=0.25, seed=1, mode="pretrain"),
        ]

    @property
    def identity_at_init(self) -> bool:
        # pre-training replaces the dense weight: there is no base model to equal
        return self.mode == "adapter"

    def __post_init__(self) -> None:
        self.rank = check_int("rank", self.rank, minimum=1)
        self.alpha = check_number("alpha", self.alpha, nonzero=True)
        self.density = check_fraction("density", self.density, closed=True)
        self.seed = check_int("seed", self.seed, minimum=0)
        check_bool("train_a", self.train_a)
        if self.mode not in ("adapter", "pretrain"):
            raise ValueError(f"mode must be 'adapter' or 'pretrain', got {self.mode!r}")
        if self.mode == "pretrain" and not self.train_a:
            raise ValueError("mode='pretrain' trains every factor: use train_a=True")
        scale_factor(self.alpha, max(self.rank, 1), self.scaling)  # validates `scaling`

    def validate_layer(self, name: str, base: nn.Module) -> None:
        if layer_kind(base) == "embedding":
            raise ValueError(
                f"SLTrain adapts linear layers, not the embedding {name!r}: exclude it with "
                "exclude_modules or target linear layers only"
            )
        super().validate_layer(name, base)

    def build(
        self, bases: dict[str, nn.Module], layer_meta: dict[str, dict[str, Any]] | None = None
    ) -> dict[str, AdapterLayer]:
        layer_meta = layer_meta or {}
        # the layer's name picks its support, so a layer keeps its support whatever else is adapted
        return {
            name: SLTrainLayer(base, self, name=name, **layer_meta.get(name, {}))
            for name, base in bases.items()
        }


def sparse_support(
    out_features: int, in_features: int, density: float, seed: int, name: str
) -> Tensor:
    """Sorted flat indices into an ``(out, in)`` matrix: ``round(density * out * in)`` of them,
    drawn without replacement from a generator seeded by ``seed`` and ``name``."""
    numel = out_features * in_features
    nnz = min(numel, round(density * numel))
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    # on the CPU whatever the default device: the generator is a CPU one (and stand-in layers
    # built on the meta device still get, and check, their real support)
    return torch.randperm(numel, generator=gen, device="cpu")[:nnz].sort().values


def support_fingerprint(indices: Tensor) -> int:
    """A checksum of a support, kept in adapter files to detect a different draw on reload."""
    return zlib.crc32(indices.to(torch.int64).cpu().numpy().tobytes())


class SparseLinearFunction(torch.autograd.Function):
    """``y = x @ S.T`` for ``S`` zero except ``S.flatten()[indices] = values``.

    Backward: ``grad_x = grad_y @ S`` (S rebuilt, not saved) and
    ``grad_values = (grad_y.T @ x).flatten()[indices]``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, values: Tensor, indices: Tensor, out_features: int) -> Tensor:
        in_features = x.shape[-1]
        ctx.save_for_backward(x, values, indices)
        ctx.shape = (out_features, in_features)
        return F.linear(x, _scatter(values, indices, out_features, in_features))

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, values, indices = ctx.saved_tensors
        out_features, in_features = ctx.shape
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ _scatter(values, indices, out_features, in_features)
        if ctx.needs_input_grad[1]:
            g = grad_out.reshape(-1, out_features)
            grad_w = g.t() @ x.reshape(-1, in_features)
            grad_values = grad_w.view(-1).index_select(0, indices)
        return grad_x, grad_values, None, None


def _scatter(values: Tensor, indices: Tensor, out_features: int, in_features: int) -> Tensor:
    dense = values.new_zeros(out_features * in_features)
    dense.index_copy_(0, indices, values)
    return dense.view(out_features, in_features)


class SLTrainLayer(AdapterLayer):
    """A base layer (or, in pre-training mode, no dense weight) plus ``s * B @ A + S``.
    See [`SLTrain`][lightning_lowrank.SLTrain]."""

    config: SLTrain
    sparse_index: Tensor

    def __init__(
        self, base: nn.Module, config: SLTrain, name: str = "", support_hash: int | None = None
    ) -> None:
        super().__init__(base, config)
        r = config.rank
        dtype, device = weight_dtype_device(base)
        self.pretrain = config.mode == "pretrain"
        self.scale = scale_factor(config.alpha, r, config.scaling)
        self.lora_A = nn.Parameter(
            kaiming_uniform_(torch.empty(r, self.in_features, dtype=dtype, device=device)),
            requires_grad=config.train_a,
        )
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=device))
        indices = sparse_support(
            self.out_features, self.in_features, config.density, config.seed, name
        )
        if support_hash is not None and support_fingerprint(indices) != support_hash:
            raise ValueError(
                f"the sparse support of layer {name!r} regenerated from seed {config.seed} differs "
                "from the one this adapter was trained with (another torch version's generator?)"
            )
        self.support_name = name  # the support is regenerated from seed and name
        self.register_buffer("sparse_index", indices.to(device), persistent=False)
        self.sparse_values = nn.Parameter(torch.zeros(indices.numel(), dtype=dtype, device=device))
        if self.pretrain:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.sparse_values, -bound, bound)
            if self.nnz == 0:
                # pure low-rank pre-training (the paper's low-rank baseline): with B = 0 and no
                # sparse part every weight is 0, and two zero layers in a row (an MLP's up and
                # down projections, attention's value and output) pass each other no gradient, so
                # B would never move. B starts as a Kaiming-uniform draw instead (variance
                # 1/(3r)), times sqrt(3)/s so that s * B @ A has the entry variance of nn.Linear's
                # default initialisation, 1/(3 in).
                with torch.no_grad():
                    kaiming_uniform_(self.lora_B).mul_(math.sqrt(3.0) / self.scale)

    def on_attach(self) -> None:
        if self.pretrain and "weight" in self.base._parameters:
            # the dense weight stops being a parameter: no storage, gradient or optimizer state
            # (here, not at construction: a refused load must leave the base as it was)
            del self.base._parameters["weight"]

    # --- protocol ---------------------------------------------------------------------------
    def low_rank_factors(self) -> None:
        """None: the sparse part makes ``s * B @ A + S`` no low-rank product."""
        return None

    def peft_form(self) -> None:
        """Always refuses: ``S`` is a full-rank update that PEFT's LoRA format cannot hold."""
        raise PeftExportError(
            "SLTrain's sparse part S is a full-rank update that PEFT's LoRA format cannot hold. "
            "Call unload(model) and save the merged model (save_pretrained) instead"
        )

    def adapter_forward(self, x: Tensor) -> Tensor:
        x = x.to(self.lora_A.dtype)
        low = F.linear(F.linear(x, self.lora_A) * self.scale, self.lora_B)
        if self.nnz == 0:  # density 0 (pure low-rank): skip the dense matmul of zeros
            return low
        values: Tensor = self.sparse_values
        device = x.device.type
        if torch.is_autocast_enabled(device):
            # the Function has no amp handling of its own: run it in the autocast dtype with
            # autocast off, so forward and backward see one dtype (the casts carry the gradient)
            dtype = torch.get_autocast_dtype(device)
            x, values = x.to(dtype), values.to(dtype)
        with torch.autocast(device, enabled=False):
            sparse = SparseLinearFunction.apply(x, values, self.sparse_index, self.out_features)
        return low + sparse.to(low.dtype)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if not self.pretrain or self.merged:
            return super().forward(x, *args, **kwargs)
        out = self.adapter_forward(x)
        bias = getattr(self.base, "bias", None)
        return out if bias is None else out + bias

    def delta_weight(self) -> Tensor:
        """``s * B @ A + S`` (the whole weight in pre-training mode)."""
        sparse = _scatter(
            self.sparse_values, self.sparse_index, self.out_features, self.in_features
        )
        return (self.lora_B @ self.lora_A) * self.scale + sparse

    def param_sides(self) -> dict[str, Side]:
        # the sparse values are a 1-D tensor: B side, by the official LoRA+ grouping rule
        sides: dict[str, Side] = {"lora_B": "B", "sparse_values": "B"}
        if self.config.train_a:
            sides["lora_A"] = "A"
        if self.pretrain and getattr(self.base, "bias", None) is not None:
            sides["base.bias"] = "B"
        return sides

    def initial_state(self) -> dict[str, Tensor]:
        config: SLTrain = self.config
        state = {
            "lora_A": kaiming_uniform_(self._empty(*self.lora_A.shape)),
            "lora_B": self._empty(*self.lora_B.shape).zero_(),
            "sparse_index": sparse_support(
                self.out_features, self.in_features, config.density, config.seed, self.support_name
            ),
            "sparse_values": self._empty(self.nnz).zero_(),
        }
        if self.pretrain:
            bound = 1.0 / math.sqrt(self.in_features)
            state["sparse_values"].uniform_(-bound, bound)
            if self.nnz == 0:  # as in __init__: a random B, so that gradients flow
                kaiming_uniform_(state["lora_B"]).mul_(math.sqrt(3.0) / self.scale)
        return state

    def _empty(self, *shape: int) -> Tensor:
        w = self.lora_A  # in pre-training mode the base has no weight
        return torch.empty(*shape, dtype=w.dtype, device=w.device)

    def layer_metadata(self) -> dict[str, Any]:
        return {"support_hash": support_fingerprint(self.sparse_index)}

    @property
    def nnz(self) -> int:
        return self.sparse_values.numel()

    @torch.no_grad()
    def merge(self) -> None:
        if not self.pretrain:
            return super().merge()
        if self.merged:
            return
        weight = self._pretrain_weight()
        stored = weight if self.kind == "linear" else weight.t().contiguous()  # Conv1D is (in, out)
        self.base.weight = nn.Parameter(stored, requires_grad=False)
        self.merged = True

    @torch.no_grad()
    def _pretrain_weight(self) -> Tensor:
        weight = self.delta_weight()
        if not torch.isfinite(weight).all():
            raise ValueError(
                "refusing to merge: the SLTrain weight has non-finite values: nothing was merged"
            )
        return weight

    def check_merge(self) -> None:
        if not self.pretrain:
            return super().check_merge()
        if not self.merged:
            self._pretrain_weight()

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.pretrain:
            return super().unmerge()
        if not self.merged:
            return
        del self.base._parameters["weight"]
        self.merged = False

    def extra_repr(self) -> str:
        mode = "pretrain" if self.pretrain else "adapter"
        return f"{super().extra_repr()}, mode={mode}, nnz={self.nnz}"


SLTrain.layer_cls = SLTrainLayer
