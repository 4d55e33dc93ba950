"""The adapter protocol shared by every method, and the PEFT form a layer may give.

A method is one file: a config dataclass (a subclass of [`AdapterConfig`][lightning_lowrank.AdapterConfig]) and a layer class
(a subclass of [`AdapterLayer`][lightning_lowrank.AdapterLayer]) named by the config's ``layer_cls``. Defining the config
class registers it by its class name (``methods/registry.py``): adapter files, LightningCLI's
``class_path`` and PEFT export find it without any list to edit.

Every method wraps a frozen base layer (``nn.Linear``, transformers' GPT-2 ``Conv1D`` or
``nn.Embedding``, see ``methods/layers.py``) in an [`AdapterLayer`][lightning_lowrank.AdapterLayer]. The rest of the library
(inject, merge, save/load, PEFT export, LoRA+ grouping, the callback and its schedules) only uses
this protocol:

- ``adapter_forward(x)``: the adapter's additive contribution; ``forward(x)`` adds it to the base
  output. Low-rank methods never build a dense delta; on a plain ``nn.Linear`` or ``Conv1D`` base
  a layer may compute both in one pass via ``fused_output(x)`` (``methods/fused.py``);
- ``delta_weight()``: the dense ``(out, in)`` update, for merge and analysis only;
- ``param_sides()``: which parameters train, and which are A-side and B-side (for LoRA+);
- optionally ``set_step(step)`` (methods with a ramp), ``layer_metadata()`` (per-layer facts that
  rebuild the layer from an adapter file), ``truncated_state()`` (a smaller equivalent state);
- optionally ``low_rank_factors()``: ``(B, A, c)`` with ``delta_weight() == c * B @ A``, the whole
  update as one low-rank product, or None (DoRA, SLTrain: their updates are not one product).
  This is the one accessor for a layer's low-rank factors; Delta-LoRA uses it;
- optionally ``peft_form()``: the update in PEFT's LoRA form (a ``PeftLayer``: B, A, scale
  and DoRA's magnitude), or a ``PeftExportError`` giving the reason it has none. Subclasses
  inherit their parent's form: a subclass that changes the update must override it;
- two states every method obeys through the generic path (``methods/state.py``): ``disabled``
  (the layer is its base) and a tie (``share_adapter(host)``: compute with the host's adapter
  parameters), read through ``adapter_host`` and ``idle_parameters()``;
- ``merge()`` / ``unmerge()`` and an optional ``extension`` (a ``LayerExtension``, e.g.
  Delta-LoRA's implicit base update) come with the base class.

Weights are always spoken of in ``(out, in)`` orientation (``methods/layers.py``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Literal, TypeVar, cast

import torch
from torch import Tensor, nn

from lightning_lowrank.methods.checks import (  # noqa: F401 - re-exported for the methods
    check_bool,
    check_fraction,
    check_int,
    check_number,
)
from lightning_lowrank.methods.fused import fusable, low_rank_linear
from lightning_lowrank.methods.layers import (  # noqa: F401 - re-exported: defined here first
    embed_or_linear,
    fill_,
    is_quantized,
    kaiming_uniform_,
    layer_kind,
    layer_shape,
    own_weight,
    refuse_quantized_merge,
    weight_oi,
)
from lightning_lowrank.methods.peft_form import (  # noqa: F401 - re-exported
    PeftExportError,
    PeftLayer,
    peft_pair,
)
from lightning_lowrank.methods.registry import register_config
from lightning_lowrank.methods.state import AdapterTie, LayerState

Scaling = Literal["standard", "rslora"]
Side = Literal["A", "B"]
_Config = TypeVar("_Config", bound="AdapterConfig")


def scale_factor(alpha: float, rank: int, scaling: Scaling) -> float:
    """LoRA's ``alpha / r`` or rsLoRA's ``alpha / sqrt(r)``."""
    if scaling == "standard":
        return alpha / rank
    if scaling == "rslora":
        return alpha / math.sqrt(rank)
    raise ValueError(f"scaling must be 'standard' or 'rslora', got {scaling!r}")


@dataclass
class AdapterConfig:
    """Base class of the method configs. Subclasses are typed dataclasses with paper defaults.

    Defining a subclass registers it by class name (``register_config``); pass
    ``register=False`` in the class statement (``class Draft(LoRA, register=False)``) to opt out.
    """

    #: the layer class that implements the method: set in the class body or right after it
    layer_cls: ClassVar[type[AdapterLayer]]

    def __init_subclass__(cls, register: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if register:
            register_config(cls)

    @classmethod
    def examples(cls: type[_Config]) -> list[_Config]:
        """Small configs of this method, one per variant worth checking, sized for layers of a
        few features: the contract suite (``tests/methods/test_contract.py``) runs over them.
        A subclass that needs other values overrides this; build them with ``cls(...)`` so that
        subclasses of the subclass are checked as themselves."""
        return [cls()]

    @property
    def identity_at_init(self) -> bool:
        """Whether the adapted model equals the base at initialisation (the paper's init)."""
        return True

    def to_dict(self) -> dict[str, Any]:
        return {"type": type(self).__name__, **asdict(self)}

    def validate_layer(self, name: str, base: nn.Module) -> None:
        """Raise a ``ValueError`` naming the fix if this config cannot adapt ``base``."""
        rank = getattr(self, "rank", None)
        if rank is None:
            return
        out_f, in_f = layer_shape(base)
        limit = min(out_f, in_f)
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if rank > limit:
            raise ValueError(
                f"rank {rank} is too large for layer {name!r} of shape (out={out_f}, in={in_f}): "
                f"use rank <= {limit} or exclude this layer with exclude_modules"
            )

    def build(
        self, bases: dict[str, nn.Module], layer_meta: dict[str, dict[str, Any]] | None = None
    ) -> dict[str, AdapterLayer]:
        """Create one adapter layer per base layer. Methods with state shared across layers
        (VeRA's random pair) override this."""
        layer_meta = layer_meta or {}
        if getattr(type(self), "layer_cls", None) is None:
            raise TypeError(
                f"{type(self).__name__} has no layer class: set {type(self).__name__}.layer_cls "
                "to its AdapterLayer subclass"
            )
        return {
            name: self.layer_cls(base, self, **layer_meta.get(name, {}))
            for name, base in bases.items()
        }

    @staticmethod
    def field_names(cls: type) -> list[str]:
        return [f.name for f in fields(cls)]


class AdapterLayer(LayerState, nn.Module):
    """A frozen base layer plus a trainable low-rank adapter. See [the adapter protocol][lightning_lowrank.methods.base].

    ``LayerState`` adds the ``disabled`` flag and the tie (``methods/state.py``)."""

    def __init__(self, base: nn.Module, config: AdapterConfig) -> None:
        super().__init__()
        self.kind = layer_kind(base)
        if self.kind is None:
            layer_shape(base)  # raises the unsupported-type error
        self.base = base
        self.config = config
        self.out_features, self.in_features = layer_shape(base)
        self.merged = False
        #: an optional ``LayerExtension`` (a child module once set): Delta-LoRA's base update
        self.extension: LayerExtension | None = None
        #: the layer is its base layer: forward is ``base(x)``, merge adds nothing, the delta is
        #: zero (``methods/state.py``); LoRA-drop's ``mode="drop"`` sets it, adapter files omit it
        self.disabled = False
        self._tie: AdapterTie | None = None
        self.tied_with: list[str] = []  # others holding the base weight (ties), set by attach

    # --- protocol ---------------------------------------------------------------------------
    def adapter_forward(self, x: Tensor) -> Tensor:
        """The adapter's additive contribution to the output for input ``x``."""
        raise NotImplementedError

    def delta_weight(self) -> Tensor:
        """The dense ``(out, in)`` update. For merge and analysis only, never in ``forward``."""
        raise NotImplementedError

    def param_sides(self) -> dict[str, Side]:
        """Map each trainable adapter parameter name (relative to this layer) to "A" or "B".

        This defines which parameters train: ``inject`` enables exactly these. It must depend on
        the config only, not on the current ``requires_grad`` flags."""
        raise NotImplementedError

    def set_step(self, step: int) -> None:  # noqa: B027 - optional hook
        """Tell the layer how many optimizer steps have been taken. No-op unless it has a ramp."""

    def low_rank_factors(self) -> tuple[Tensor, Tensor, Tensor | float] | None:
        """``(B, A, c)`` with ``delta_weight() == c * B @ A``, B: (out, k), A: (k, in), or None
        when the method has no such factorisation (then callers fall back to ``delta_weight()``).
        Lets Delta-LoRA update a base weight without building a dense ``(out, in)`` temporary."""
        return None

    def peft_form(self) -> PeftLayer | None:
        """This layer's update in PEFT's LoRA form, ``dW = s * lora_B @ lora_A`` (times DoRA's
        magnitude over the row norm when ``magnitude`` is set), or None when the update is zero
        by construction (nothing to export). Used by ``export_peft``; a subclass inherits its
        parent's form, so a subclass that changes the update must override this.

        Raises:
            PeftExportError: the update has no exact PEFT form; the message gives the reason
                and what to do instead.
        """
        raise PeftExportError(
            f"{type(self).__name__} has no PEFT LoRA form: call unload(model) and save the "
            "merged model (save_pretrained) instead"
        )

    def layer_metadata(self) -> dict[str, Any]:
        """Keyword arguments (JSON-serialisable) needed to rebuild this layer's shapes."""
        return {}

    def on_attach(self) -> None:  # noqa: B027 - optional hook
        """Called once the layer is in the model. Building a layer never changes its base (so a
        refused load leaves the model as it was); a method that must change it does so here."""

    def truncated_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The smallest adapter state that gives the same output, with the layer metadata that
        rebuilds its shapes (``save_adapter(..., truncate=True)``). Methods without prunable
        parts (all but AdaLoRA) return their full state."""
        return self.adapter_state_dict(), self.layer_metadata()

    def initial_state(self) -> dict[str, Tensor]:
        """The adapter's initial tensors by attribute name (full, plain, drawn as ``__init__``)."""
        return {}

    def init_from_base(self) -> None:  # noqa: B027 - optional hook
        """Set what the init derives from the base's values (DoRA's magnitude) from the current
        base: after a meta-device model is materialised or loaded (the callback's on_fit_start)."""

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-draw ``initial_state`` into the adapter (A as the paper says, B zero, ...), as
        Lightning does when it materialises a meta-device model; the base resets itself. A
        DTensor shard gets its part of one full draw, as one process would."""
        for name, value in self.initial_state().items():
            fill_(getattr(self, name), value)

    def _empty(self, *shape: int) -> Tensor:
        """An uninitialised tensor with the base weight's dtype and (local) device."""
        w = weight_oi(self.base)
        return torch.empty(*shape, dtype=w.dtype, device=w.device)

    # --- generic behaviour ------------------------------------------------------------------
    def adapter_parameter_names(self) -> list[str]:
        return [n for n, _ in self.named_parameters() if not n.startswith("base.")]

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """Adapter parameters and persistent adapter buffers, keyed relative to this layer."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("base.")}

    def adapter_input(self, x: Tensor) -> Tensor:
        """What the adapter's first factor sees: ``x``, or its dropout for methods that have one."""
        return x

    def fused_output(self, x: Tensor) -> Tensor | None:
        """Base plus adapter output for ``x`` in one fused pass (``methods/fused.py``), or None
        when this layer has none for this input; ``forward`` then computes ``base(x)`` and adds
        ``adapter_forward``. Called only for linear and Conv1D layers, unmerged, with no extra
        arguments.
        """
        return None

    def fused_low_rank(
        self, x: Tensor, a: Tensor, b: Tensor, scale: float, factor: Tensor | None = None
    ) -> Tensor | None:
        """``factor * (base(x) - bias + scale * (x' a^T) b^T) + bias`` in one pass, or None when
        ``fusable`` refuses (then the generic path runs)."""
        extra = (factor,) if factor is not None else ()
        if not fusable(self.base, x, a, b, *extra):
            return None
        w0, bias = weight_oi(self.base), cast("Tensor | None", self.base.bias)
        return low_rank_linear(x, self.adapter_input(x), w0, bias, a, b, scale, factor)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.merged:
            return self.base(x, *args, **kwargs)
        out = None
        if self.kind in ("linear", "conv1d") and not args and not kwargs:
            out = self.fused_output(x)
        if out is None:
            out = self.add_adapter_output(x, self.base(x, *args, **kwargs))
        if self.extension is not None:
            out = self.extension.add_output(self, x, out)
        return out

    def add_adapter_output(self, x: Tensor, out: Tensor) -> Tensor:
        """``out + adapter_forward(x)``; a method may override it to fuse the add (LoRA does)."""
        return out + self.adapter_forward(x).to(out.dtype)

    def merged_delta(self) -> Tensor:
        """What [`merge`][lightning_lowrank.merge] adds to the base weight: ``delta_weight()`` plus the extension's
        term, if any; zero for a disabled layer."""
        delta = self.delta_weight()
        if self.disabled:
            return delta
        if self.extension is not None:
            delta = self.extension.add_weight(self, delta)
        return delta

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """The ``(out, in)`` weight ``merge`` would write; a ``ValueError`` if any value is
        non-finite in the base's own dtype (float16 overflows where the delta does not), or if
        the base is quantized (``refuse_quantized_merge``)."""
        refuse_quantized_merge(self)
        w = weight_oi(self.base)
        merged = w + self.merged_delta().to(w.dtype)
        if not torch.isfinite(merged).all():
            raise ValueError(
                f"refusing to merge: base weight plus adapter delta has non-finite values in "
                f"{w.dtype} (the adapter diverged, or its delta overflows {w.dtype}): nothing was "
                "merged; keep the adapter unmerged or merge into a float32 copy of the model"
            )
        return merged

    def check_merge(self) -> None:
        """Raise what ``merge`` would raise, changing nothing (``merge(model)`` checks all)."""
        if not self.merged:
            self.merged_weight()

    def own_base_weight(self) -> None:
        """Untie the base weight from ``tied_with`` (GPT-2's ``lm_head``), which keep the original."""
        if self.tied_with:
            own_weight(self.base, self.tied_with)
            self.tied_with = []

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the delta into the base weight; the forward then costs what the base costs."""
        if self.merged:
            return
        merged = self.merged_weight()
        self.own_base_weight()
        weight_oi(self.base).copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the delta that [`merge`][lightning_lowrank.merge] added, restoring the base weight."""
        if not self.merged:
            return
        w = weight_oi(self.base)
        w.sub_(self.merged_delta().to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"kind={self.kind}, in={self.in_features}, out={self.out_features}, merged={self.merged}"


#: every ``LayerExtension`` subclass by its ``name``, to rebuild one from adapter metadata
EXTENSION_TYPES: dict[str, type[LayerExtension]] = {}


class LayerExtension(nn.Module):
    """An add-on to one adapter layer that changes its effective weight beyond the method's delta.

    A scheduled method attaches one as ``layer.extension`` (Delta-LoRA's implicit base update).
    The layer's forward passes its output through ``add_output``, and [`merge`][lightning_lowrank.merge] folds
    ``add_weight`` into the base. Its persistent buffers belong to the adapter: adapter files
    and checkpoints store them under ``"<layer>.extension.<buffer>"``; ``metadata`` (JSON) and
    ``from_metadata`` let ``load_adapter`` rebuild it. Subclasses set a unique ``name``.
    """

    name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            EXTENSION_TYPES[cls.name] = cls

    def add_output(self, layer: AdapterLayer, x: Tensor, out: Tensor) -> Tensor:
        """The layer's output ``out`` (base plus adapter) for input ``x``, plus this term."""
        return out

    def add_weight(self, layer: AdapterLayer, delta: Tensor) -> Tensor:
        """The dense ``(out, in)`` ``delta`` that merge folds in, plus this term."""
        return delta

    def base_is_original(self) -> bool:
        """False once the extension has changed the base weight itself (in-place updates)."""
        return True

    def metadata(self) -> dict[str, Any]:
        """JSON-serialisable facts that ``from_metadata`` needs (shapes, constants)."""
        return {}

    @classmethod
    def from_metadata(cls, layer: AdapterLayer, meta: dict[str, Any]) -> LayerExtension:
        """Rebuild the extension for ``layer`` (buffers are then filled from the file)."""
        raise NotImplementedError
