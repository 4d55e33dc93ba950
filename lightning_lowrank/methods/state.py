"""Two per-layer states of the adapter protocol that every method obeys without knowing of them.

- **disabled** (``layer.disabled = True``, torchtune's ``LoRALinear.disabled`` is the model): the
  layer is its base layer. ``forward(x) = base(x)``, ``merge()`` adds nothing, ``delta_weight()``
  is zero and ``low_rank_factors()`` has ``c = 0``. The fused passes are never reached.
- **tied** (``layer.share_adapter(host)``): the layer computes with ``host``'s adapter
  parameters and its own base layer. Every read of an adapter parameter (``self.lora_A`` in any
  method's code) resolves to the host's *current* ``Parameter``, so the tie is a reference, not
  shared storage: ``Module.to()``, ``.double()`` or FSDP2 replacing parameters by DTensors keep
  it, and autograd sums every use's gradient into the host. The member's own parameters stay
  registered (named ``parameters()``, ``state_dict`` keys, DDP's reducer and optimizer groups are
  unchanged) but take no part in the output: they are *idle*.

Both keep DDP's reducer valid without ``find_unused_parameters``: while gradients are recorded, the
output gets an exact zero that depends on every idle trainable parameter,
``0 * sum_p sum(p)`` (no matmul), so each receives a (zero) gradient; schedules set those to
``None`` before the optimizer step so the optimizer leaves them alone.

[`AdapterLayer`][lightning_lowrank.AdapterLayer] applies the guards below to ``forward``, ``merge``, ``unmerge``,
``delta_weight`` and ``low_rank_factors`` of every subclass when the class is defined
(``__init_subclass__``), so a method that overrides them (DoRA) obeys the states too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from lightning_lowrank.methods.base import AdapterLayer

#: the protocol methods the states guard, in every subclass
GUARDED = ("forward", "merge", "unmerge", "delta_weight", "low_rank_factors")


@dataclass(frozen=True, eq=False)
class AdapterTie:
    """A member's reference to its host layer. Not an ``nn.Module``: the host must not become a
    child of its members (it would be registered, moved and saved twice)."""

    host: AdapterLayer


def idle_parameters(layer: AdapterLayer) -> list[nn.Parameter]:
    """The layer's own adapter parameters that take no part in its output: all of a disabled
    layer's, the own parameters of a tied member; none otherwise."""
    if not layer.disabled and layer.adapter_host is None:
        return []
    return [p for n, p in layer.named_parameters() if not n.startswith("base.")]


def zero_anchor(layer: AdapterLayer, out: Tensor) -> Tensor:
    """``out`` plus an exact zero that depends on every idle trainable parameter (for DDP)."""
    if not torch.is_grad_enabled():
        return out
    idle = [p for p in idle_parameters(layer) if p.requires_grad]
    if not idle:
        return out
    anchor = cast(Tensor, sum(p.sum() for p in idle) * 0.0)  # idle is not empty
    return out + anchor.to(out.dtype)


def _adapter_like(layer: AdapterLayer) -> Tensor:
    return next(p for n, p in layer.named_parameters() if not n.startswith("base."))


def _guard_forward(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    @functools.wraps(fn)
    def forward(self: AdapterLayer, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.disabled:
            out = self.base(x, *args, **kwargs)
        else:
            out = fn(self, x, *args, **kwargs)
        if self.disabled or self.adapter_host is not None:
            out = zero_anchor(self, out)
        return out

    return forward


def _guard_merge(fn: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(fn)
    def merge(self: AdapterLayer) -> None:
        if self.disabled:
            self.merged = True  # nothing to fold in: the forward then returns the base output
            return
        fn(self)

    return merge


def _guard_unmerge(fn: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(fn)
    def unmerge(self: AdapterLayer) -> None:
        if self.disabled:
            self.merged = False
            return
        fn(self)

    return unmerge


def _guard_delta(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    @functools.wraps(fn)
    def delta_weight(self: AdapterLayer) -> Tensor:
        if self.disabled:
            like = _adapter_like(self)
            return like.new_zeros(self.out_features, self.in_features)
        return fn(self)

    return delta_weight


def _guard_factors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def low_rank_factors(self: AdapterLayer) -> Any:
        factors = fn(self)
        if factors is None or not self.disabled:
            return factors
        b, a, _ = factors
        return b, a, 0.0  # c = 0: the contract delta_weight() == c * B @ A still holds

    return low_rank_factors


_GUARDS: dict[str, Callable[[Any], Any]] = {
    "forward": _guard_forward,
    "merge": _guard_merge,
    "unmerge": _guard_unmerge,
    "delta_weight": _guard_delta,
    "low_rank_factors": _guard_factors,
}


def guard_class(cls: type) -> None:
    """Wrap the protocol methods ``cls`` defines or inherits unguarded (a mixin's, DoRA's)."""
    for name in GUARDED:
        fn = getattr(cls, name)
        if not getattr(fn, "_obeys_layer_state", False):
            guarded = _GUARDS[name](fn)
            guarded._obeys_layer_state = True
            setattr(cls, name, guarded)


class LayerState:
    """The disabled flag's and the tie's part of [`AdapterLayer`][lightning_lowrank.AdapterLayer] (mixed in before
    ``nn.Module``, whose attribute lookup it extends)."""

    disabled: bool
    _tie: AdapterTie | None
    _parameters: dict[str, nn.Parameter | None]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        guard_class(cls)  # every method's forward / merge / delta obeys disabled and ties

    @property
    def adapter_host(self) -> AdapterLayer | None:
        """The layer whose adapter parameters this one computes with, or None (its own)."""
        return self._tie.host if self._tie is not None else None

    def share_adapter(self, host: AdapterLayer | None) -> None:
        """Compute with ``host``'s adapter parameters from now on (``None``: with its own again).

        The own parameters stay registered and idle. Raises a ``ValueError`` (changing nothing)
        unless both are unmerged layers of one class with the same adapter parameter names,
        shapes and dtypes, and ``host`` is not itself a member."""
        if host is not None:
            check_tie(self, host)  # type: ignore[arg-type]  # mixed into AdapterLayer only
        self._tie = AdapterTie(host) if host is not None else None

    def idle_parameters(self) -> list[nn.Parameter]:
        """Own adapter parameters that take no part in the output (disabled, or tied)."""
        return idle_parameters(self)  # type: ignore[arg-type]  # mixed into AdapterLayer only

    def __getattr__(self, name: str) -> Tensor | nn.Module:
        # a tied member reads each adapter parameter from its host, at every access, so the
        # tie survives any replacement of the host's parameters (moves, FSDP2's DTensors)
        tie = self.__dict__.get("_tie")
        if tie is not None and name in self.__dict__["_parameters"]:
            param = tie.host._parameters[name]
            if param is not None:
                return param
        return super().__getattr__(name)  # type: ignore[misc]  # nn.Module's, next in the MRO

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        # a tied member's state shows what it computes with (the host's values), as storage
        # ties did: a plain state_dict copy into an untied model gives the same outputs
        super()._save_to_state_dict(destination, prefix, keep_vars)  # type: ignore[misc]  # as above
        if self._tie is not None:
            for name, p in self._tie.host._parameters.items():
                if p is not None and prefix + name in destination:
                    destination[prefix + name] = p if keep_vars else p.detach()


def check_tie(member: AdapterLayer, host: AdapterLayer) -> None:
    """Raise a ``ValueError`` unless ``member`` can compute with ``host``'s adapter parameters."""
    if host is member:
        raise ValueError("a layer cannot share its own adapter")
    if host.adapter_host is not None:
        raise ValueError("the host of a shared adapter must use its own parameters (no chains)")
    if member.merged or host.merged:
        raise ValueError("unmerge both layers before sharing an adapter between them")
    mine = {n: (p.shape, p.dtype) for n, p in member._parameters.items() if p is not None}
    theirs = {n: (p.shape, p.dtype) for n, p in host._parameters.items() if p is not None}
    nested = [n for n in member.adapter_parameter_names() if n not in mine]
    if nested or mine != theirs or type(member) is not type(host):
        raise ValueError(
            f"cannot share an adapter between a {type(member).__name__} with parameters {mine} "
            f"and a {type(host).__name__} with {theirs}: only layers of one method and one "
            "adapter shape can share"
        )
