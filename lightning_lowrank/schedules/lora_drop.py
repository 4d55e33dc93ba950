"""LoRA-drop (Zhou et al. 2024, arXiv 2402.07721): keep the adapters whose output matters, let the
others share one adapter per layer shape (or drop them).

The schedule runs inside ``LowRankCallback(method, schedules=[LoRADrop(...)])`` in three steps:

1. **Sampling phase.** The first ``sample_steps`` optimizer steps train every adapter as usual while
   the importance of each adapted layer ``i`` is read off the adapter's own output (no extra forward
   pass)::

       g_i = sum over the phase's training inputs x of ||dW_i x||^2

   where ``dW_i x`` is the adapter's contribution to the layer's output, read by two forward hooks
   as ``layer(x) - base(x)`` (for LoRA exactly :meth:`AdapterLayer.adapter_forward`'s output; for
   DoRA, whose forward rescales the whole output, the full change ``W' x - W0 x``). Only training
   forwards count (validation runs in eval mode); under DDP the per-step sums are all-reduced, so
   every rank holds the same ``g``.
2. **Selection.** ``I_i = g_i / sum_j g_j``; layers sorted by ``I_i`` (descending) are kept until the
   cumulative importance reaches ``threshold`` (0.9), the layer that crosses it included.
3. **Switch.** Every unselected layer of the same adapter shape uses ONE adapter from then on
   (``mode="share"``, the paper), or its adapter is switched off (``mode="drop"``, "which layers to
   fine-tune at all"). Training continues on the full data.

How the switch keeps a run valid. No parameter is created, removed or (un)frozen after the
strategy wrapped the model:

- Sharing ties storage: in each shape group the first layer (model order) is the *host*; the other
  members' adapter parameters are re-pointed (``param.data = host.data``) to the host's tensors. Each
  member keeps its own ``Parameter`` object, so DDP's reducer still sees every parameter used and
  synced; before each optimizer step the members' gradients are summed into the host's (the
  gradient of one shared tensor) and set to ``None``, so the optimizer updates the shared tensor once.
- Dropping replaces the layer's forward by the base layer's plus an exact zero that depends on the
  adapter parameters (a zero-valued sum, no matmul), so DDP needs no ``find_unused_parameters``;
  their gradients are set to ``None`` before each step, ``delta_weight()`` is zero and merging adds
  nothing. Adapter files leave dropped layers out entirely.
- Optimizer groups are unchanged; the optimizer state of every unselected layer's parameters is
  cleared at the switch (the shared tensor starts with fresh moments). LR schedulers are untouched.
- The shared adapter's initial value: the paper does not state it. ``shared_init="mean"`` (default)
  sets each shared tensor to the element-wise mean of the group's adapters after the sampling
  phase; ``shared_init="fresh"`` re-initialises it as the method does (seeded by ``seed``, the same
  on every rank), which for LoRA is a zero delta.

Deviation from the paper: the sample is the first ``sample_steps`` optimizer steps of the ordinary
(shuffled) training stream, not a separately drawn stratified sample, and the kept adapters continue
from their sampled values instead of restarting.
"""

from __future__ import annotations

import math
import types
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_lowrank.methods.base import AdapterLayer
from lightning_lowrank.schedules.base import Schedule
from lightning_lowrank.sharing import adapter_parameters, tie

Mode = Literal["share", "drop"]
SharedInit = Literal["mean", "fresh"]

#: per-layer attribute holding the importance accumulated since the last optimizer step
_PENDING = "_lora_drop_pending"
#: per-base-layer attribute holding the base output of the forward in progress
_BASE_OUT = "_lora_drop_base_out"


def select_layers(importance: Mapping[str, float], threshold: float) -> list[str]:
    """The layers LoRA-drop keeps: the most important ones until the cumulative normalised
    importance ``sum I_i`` reaches ``threshold`` (the crossing layer included), in input order.

    Ties keep input (model) order. Raises ``ValueError`` if every importance is zero.
    """
    total = math.fsum(importance.values())
    if not total > 0 or not math.isfinite(total):
        raise ValueError(
            f"LoRA-drop: the adapters' outputs summed to {total} during the sampling phase, so no "
            "layer can be ranked: use a nonzero learning rate and more sample_steps"
        )
    names = list(importance)
    order = sorted(range(len(names)), key=lambda i: -importance[names[i]])  # stable: ties by order
    kept: set[str] = set()
    cumulative = 0.0
    for i in order:
        kept.add(names[i])
        cumulative += importance[names[i]] / total
        if cumulative >= threshold - 1e-9:
            break
    return [n for n in names if n in kept]


def shape_groups(layers: Mapping[str, AdapterLayer], names: Sequence[str]) -> list[list[str]]:
    """Group ``names`` by adapter shape (layer kind and every adapter tensor's shape and dtype);
    groups and members keep model order, the first member is the group's host."""
    groups: dict[tuple, list[str]] = {}
    for name in names:
        layer = layers[name]
        params = adapter_parameters(layer)
        key = (
            layer.kind,
            tuple((n, tuple(p.shape), str(p.dtype)) for n, p in sorted(params.items())),
        )
        groups.setdefault(key, []).append(name)
    return list(groups.values())


# --- hooks and instance-level replacements (module-level functions: deepcopy and pickle safe) -------
def _capture_base_output(base: nn.Module, args: Any, output: Tensor) -> None:
    base.__dict__[_BASE_OUT] = output


def _measure_adapter_output(layer: AdapterLayer, args: Any, output: Tensor) -> None:
    base_out = layer.base.__dict__.pop(_BASE_OUT, None)  # never keep it past this forward
    if not (layer.training and torch.is_grad_enabled()) or layer.merged:
        return  # training forwards only: validation runs in eval mode and without grad
    # the adapter's contribution dW x = layer(x) - base(x), whatever the method's forward does
    delta = output.detach().double()
    if base_out is not None:
        delta = delta - base_out.detach().double()
    sq = delta.square().sum()
    pending = layer.__dict__.get(_PENDING)
    layer.__dict__[_PENDING] = sq if pending is None else pending + sq


def _dropped_forward(self: AdapterLayer, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    out = self.base(x, *args, **kwargs)
    if self.merged:
        return out
    params = [p for p in adapter_parameters(self).values() if p.requires_grad]
    if not params:
        return out
    # an exact zero that still depends on every parameter: DDP's reducer gets a (zero) gradient
    # for each parameter it was built with, without find_unused_parameters and without a matmul
    anchor = sum(p.sum() for p in params) * 0.0
    return out + anchor.to(out.dtype)


def _dropped_delta_weight(self: AdapterLayer) -> Tensor:
    return torch.zeros(
        self.out_features, self.in_features, dtype=_param_dtype(self), device=_device(self)
    )


def _dropped_merge(self: AdapterLayer) -> None:
    self.merged = True  # nothing to fold in: the forward then returns the base output


def _dropped_unmerge(self: AdapterLayer) -> None:
    self.merged = False


def _device(layer: AdapterLayer) -> torch.device:
    return next(iter(adapter_parameters(layer).values())).device


def _param_dtype(layer: AdapterLayer) -> torch.dtype:
    return next(iter(adapter_parameters(layer).values())).dtype


_DROPPED_METHODS = {
    "forward": _dropped_forward,
    "delta_weight": _dropped_delta_weight,
    "merge": _dropped_merge,
    "unmerge": _dropped_unmerge,
}


class LoRADrop(Schedule):
    """LoRA-drop: output-importance layer selection, then one shared adapter per layer shape.

    ``g_i = sum_x ||dW_i x||^2`` over the sampling phase; ``I_i = g_i / sum_j g_j``; the layers with
    the largest ``I_i`` are kept until ``sum I_i >= threshold``; the others share one adapter per
    shape (or are switched off with ``mode="drop"``). See the module docstring for how the switch
    keeps optimizer, DDP and checkpoints valid.

    Without a Trainer, drive it by hand: ``setup(model, layers, total_steps)`` after ``inject``,
    ``train_start(model, layers, 0, optimizers=[opt])``, then per step ``before_optimizer_step``
    after ``backward()`` and ``after_optimizer_step(model, layers, step + 1)`` after ``opt.step()``.

    Args:
        threshold: T, the cumulative normalised importance the kept layers must reach (paper: 0.9).
        sample_steps: length of the sampling phase in optimizer steps. ``None``: use
            ``sample_fraction`` of an epoch.
        sample_fraction: the sampling phase as a fraction of one epoch's optimizer steps (paper:
            about 10 % of the training data), used when ``sample_steps`` is ``None``.
        mode: ``"share"`` (the paper: unselected layers of one shape share one adapter) or
            ``"drop"`` (unselected adapters are switched off and left out of adapter files).
        shared_init: the shared adapter's initial value: ``"mean"`` of the group's adapters after
            the sampling phase, or ``"fresh"`` (the method's own initialisation, seeded by ``seed``).
        seed: seed of the ``"fresh"`` initialisation (identical on every rank).
        log_table: log the selection table with ``rank_zero_info`` at the switch.
    """

    def __init__(
        self,
        threshold: float = 0.9,
        sample_steps: int | None = None,
        sample_fraction: float = 0.1,
        mode: Mode = "share",
        shared_init: SharedInit = "mean",
        seed: int = 0,
        log_table: bool = True,
    ) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if sample_steps is not None and sample_steps < 1:
            raise ValueError(
                f"sample_steps must be >= 1 (or None to use sample_fraction), got {sample_steps}"
            )
        if not 0.0 < sample_fraction <= 1.0:
            raise ValueError(f"sample_fraction must be in (0, 1], got {sample_fraction}")
        if mode not in ("share", "drop"):
            raise ValueError(f"mode must be 'share' or 'drop', got {mode!r}")
        if shared_init not in ("mean", "fresh"):
            raise ValueError(f"shared_init must be 'mean' or 'fresh', got {shared_init!r}")
        self.threshold = threshold
        self.sample_steps = sample_steps
        self.sample_fraction = sample_fraction
        self.mode = mode
        self.shared_init = shared_init
        self.seed = seed
        self.log_table = log_table
        self.phase: Literal["sampling", "switched"] = "sampling"
        #: resolved length of the sampling phase (None until known)
        self.switch_step: int | None = sample_steps
        self.importance: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.selected: list[str] = []
        #: unselected layers by shape; the first name of each group is its host
        self.groups: list[list[str]] = []
        self.parameters_before = 0
        self.parameters_after = 0
        self._layers: dict[str, AdapterLayer] = {}
        self._optimizers: list[Optimizer] = []
        self._handles: list[Any] = []
        self._total_steps: int | None = None

    # --- hooks --------------------------------------------------------------------------------
    def setup(
        self, model: nn.Module, layers: dict[str, AdapterLayer], total_steps: int | None
    ) -> None:
        self._layers = dict(layers)
        self._total_steps = total_steps
        self.importance = dict.fromkeys(layers, 0.0) | {
            n: v for n, v in self.importance.items() if n in layers
        }
        self.calls = dict.fromkeys(layers, 0) | {n: v for n, v in self.calls.items() if n in layers}
        self._check_fits()
        if self.phase == "sampling":
            for layer in layers.values():
                self._handles.append(layer.base.register_forward_hook(_capture_base_output))
                self._handles.append(layer.register_forward_hook(_measure_adapter_output))
        else:  # state was loaded before setup
            self._apply(initialise=False)

    def train_start(
        self,
        model: nn.Module,
        layers: dict[str, AdapterLayer],
        step: int,
        steps_per_epoch: int | None = None,
        optimizers: Sequence[Optimizer] = (),
    ) -> None:
        self._optimizers = list(optimizers)
        if self.switch_step is None and steps_per_epoch is not None:
            self.switch_step = max(1, math.ceil(self.sample_fraction * steps_per_epoch))
            self._check_fits()

    def before_optimizer_step(
        self, model: nn.Module, layers: dict[str, AdapterLayer], step: int
    ) -> None:
        if self.phase != "switched":
            return
        # gradients are complete and synced here (DDP), and clipping comes after this hook
        if self.mode == "drop":
            for name in self._unselected():
                for p in adapter_parameters(self._layers[name]).values():
                    p.grad = None
            return
        for host, *members in self.groups:
            host_params = adapter_parameters(self._layers[host])
            for pname, hp in host_params.items():
                for member in members:
                    mp = adapter_parameters(self._layers[member])[pname]
                    if mp is hp or mp.grad is None:
                        continue
                    # the shared tensor's gradient is the sum of its uses' gradients
                    hp.grad = mp.grad.clone() if hp.grad is None else hp.grad.add_(mp.grad)
                    mp.grad = None

    def after_optimizer_step(
        self, model: nn.Module, layers: dict[str, AdapterLayer], step: int
    ) -> None:
        if self.phase != "sampling":
            return
        self._flush()
        if self.switch_step is None:
            raise ValueError(
                "LoRADrop does not know how long its sampling phase is: pass sample_steps=..., or "
                "call train_start(..., steps_per_epoch=...) when driving it without a Trainer"
            )
        if step >= self.switch_step:
            self.switch()

    # --- the switch ---------------------------------------------------------------------------
    def switch(self) -> None:
        """Select layers from the accumulated importances and share (or drop) the others now."""
        never = [n for n, c in self.calls.items() if c == 0]
        if never:
            raise ValueError(
                f"LoRA-drop measured no adapter output for {len(never)} layers (e.g. {never[:3]}): "
                "they saw no training forward pass during the sampling phase; adapt only layers "
                "the model uses, or raise sample_steps"
            )
        self.parameters_before = self._adapter_parameter_count()
        self.selected = select_layers(self.importance, self.threshold)
        unselected = [n for n in self._layers if n not in set(self.selected)]
        self.groups = shape_groups(self._layers, unselected)
        self.phase = "switched"
        self._apply(initialise=True)
        self.parameters_after = self._adapter_parameter_count()
        if self.log_table:
            rank_zero_info(self.report())

    @torch.no_grad()
    def _apply(self, initialise: bool) -> None:
        """Put the switched structure in place; ``initialise`` sets the shared values (at the
        switch itself), otherwise the values come from a checkpoint."""
        self._remove_hooks()
        affected = self._unselected()
        for name in affected:
            for p in adapter_parameters(self._layers[name]).values():
                for opt in self._optimizers:
                    opt.state.pop(p, None)  # stale moments of a tensor that changed its meaning
        if self.mode == "drop":
            for name in affected:
                layer = self._layers[name]
                for attr, fn in _DROPPED_METHODS.items():
                    setattr(layer, attr, types.MethodType(fn, layer))
                layer.dropped = True
            return
        for host, *members in self.groups:
            if initialise:
                self._initialise_shared(host, [host, *members])
            for member in members:
                tie(self._layers[member], self._layers[host])  # keeps the Parameters (DDP)
                self._layers[member].shared_with = host

    def _initialise_shared(self, host: str, members: list[str]) -> None:
        host_params = adapter_parameters(self._layers[host])
        if self.shared_init == "mean":
            for pname, hp in host_params.items():
                stack = [adapter_parameters(self._layers[m])[pname].double() for m in members]
                hp.copy_(torch.stack(stack).mean(dim=0).to(hp.dtype))
            return
        layer = self._layers[host]
        device = _device(layer)
        devices = (
            [device.index if device.index is not None else torch.cuda.current_device()]
            if device.type == "cuda"
            else []
        )
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            fresh = layer.config.build({host: layer.base})[host]
        for pname, fp in adapter_parameters(fresh).items():
            host_params[pname].copy_(fp.to(host_params[pname].dtype))

    def _flush(self) -> None:
        """Add the importance accumulated since the last step, summed over ranks."""
        names = list(self._layers)
        device = _device(next(iter(self._layers.values())))
        values = torch.zeros(2 * len(names), dtype=torch.float64, device=device)
        for i, name in enumerate(names):
            pending = self._layers[name].__dict__.pop(_PENDING, None)
            if pending is not None:
                values[i] = pending.to(device)
                values[len(names) + i] = 1.0
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(values)
        values = values.cpu().tolist()
        for i, name in enumerate(names):
            self.importance[name] += values[i]
            self.calls[name] += int(values[len(names) + i] > 0)

    # --- helpers ------------------------------------------------------------------------------
    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for layer in self._layers.values():
            layer.__dict__.pop(_PENDING, None)
            layer.base.__dict__.pop(_BASE_OUT, None)

    def _unselected(self) -> list[str]:
        return [n for group in self.groups for n in group]

    def _check_fits(self) -> None:
        # a warning, not an error: a run may legitimately stop early and be resumed for longer
        if self.switch_step is not None and self._total_steps is not None:
            if self.switch_step > self._total_steps:
                rank_zero_warn(
                    f"LoRADrop's sampling phase ({self.switch_step} optimizer steps) does not end "
                    f"before this run does ({self._total_steps} steps), so no layer is shared or "
                    "dropped: lower sample_steps or sample_fraction, or train longer"
                )

    def _adapter_parameter_count(self) -> int:
        """Trainable adapter parameters, shared storage counted once, dropped layers not at all."""
        seen: set[tuple] = set()
        total = 0
        for layer in self._layers.values():
            if getattr(layer, "dropped", False):
                continue
            for p in adapter_parameters(layer).values():
                key = (p.data_ptr(), tuple(p.shape))
                if p.requires_grad and key not in seen:
                    seen.add(key)
                    total += p.numel()
        return total

    def normalised_importance(self) -> dict[str, float]:
        """``I_i = g_i / sum_j g_j`` per layer (zeros while nothing was measured)."""
        total = math.fsum(self.importance.values())
        return {n: (g / total if total > 0 else 0.0) for n, g in self.importance.items()}

    def roles(self) -> dict[str, str]:
        """Each layer's role after the switch: ``"kept"``, ``"shared #k (n layers)"`` or ``"dropped"``."""
        roles = dict.fromkeys(self.selected, "kept")
        for index, group in enumerate(self.groups):
            for name in group:
                roles[name] = (
                    "dropped" if self.mode == "drop" else f"shared #{index} ({len(group)} layers)"
                )
        return roles

    def report(self) -> str:
        """The selection as a text table: layers by importance, cumulative share and role."""
        norm = self.normalised_importance()
        roles = self.roles() if self.phase == "switched" else {}
        order = sorted(norm, key=lambda n: -norm[n])
        width = max(len(n) for n in order)
        lines = [
            f"LoRA-drop (threshold {self.threshold:g}, mode {self.mode!r}): kept "
            f"{len(self.selected)} of {len(norm)} layers; {len(self._unselected())} layers in "
            f"{len(self.groups)} shape groups; adapter parameters {self.parameters_before:,} -> "
            f"{self.parameters_after:,}",
            f"{'layer':<{width}}  importance  cumulative  role",
        ]
        cumulative = 0.0
        for name in order:
            cumulative += norm[name]
            lines.append(
                f"{name:<{width}}  {norm[name]:>10.4f}  {cumulative:>10.4f}  {roles.get(name, '-')}"
            )
        return "\n".join(lines)

    def plot(self, ax: Any = None) -> Any:
        """Bar chart of the normalised importance per layer with the cut-off; see :func:`plot_importance`."""
        return plot_importance(self.normalised_importance(), self.selected, self.threshold, ax=ax)

    # --- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "switch_step": self.switch_step,
            "importance": dict(self.importance),
            "calls": dict(self.calls),
            "selected": list(self.selected),
            "groups": [list(g) for g in self.groups],
            "mode": self.mode,
            "parameters_before": self.parameters_before,
            "parameters_after": self.parameters_after,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["mode"] != self.mode:
            raise ValueError(
                f"checkpoint was written by LoRADrop(mode={state['mode']!r}); resume with the same mode"
            )
        self.switch_step = state["switch_step"]
        self.importance = dict(state["importance"])
        self.calls = dict(state["calls"])
        self.selected = list(state["selected"])
        self.groups = [list(g) for g in state["groups"]]
        self.parameters_before = state["parameters_before"]
        self.parameters_after = state["parameters_after"]
        was_sampling = self.phase == "sampling"
        self.phase = state["phase"]
        if self._layers:
            for layer in self._layers.values():
                layer.__dict__.pop(_PENDING, None)  # partial sums of an abandoned step
            if self.phase == "switched" and was_sampling:
                self._apply(initialise=False)


def plot_importance(
    importance: Mapping[str, float],
    selected: Sequence[str] = (),
    threshold: float | None = None,
    ax: Any = None,
) -> Any:
    """Draw the normalised importance of each layer (model order), kept layers highlighted, with a
    dashed line at the cut-off (the smallest kept importance). Returns the matplotlib Axes."""
    import matplotlib.pyplot as plt  # lazily: plotting is optional

    if ax is None:
        _, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(importance)), 3.5))
    names = list(importance)
    total = math.fsum(importance.values()) or 1.0
    values = [importance[n] / total for n in names]
    kept = set(selected)
    colors = ["tab:blue" if n in kept else "tab:gray" for n in names]
    ax.bar(range(len(names)), values, color=colors)
    prefix = _common_prefix(names)
    ax.set_xticks(range(len(names)), [n[len(prefix) :] for n in names], rotation=90, fontsize=7)
    ax.set_ylabel("normalised importance $I_i$")
    if kept:
        cut = min(v for n, v in zip(names, values, strict=True) if n in kept)
        label = "cut-off" + (f" (cumulative {threshold:g})" if threshold is not None else "")
        ax.axhline(cut, color="tab:red", linestyle="--", linewidth=1, label=label)
        ax.legend(loc="upper right")
    ax.set_title(f"LoRA-drop: {len(kept)} of {len(names)} layers kept (blue)")
    ax.figure.tight_layout()
    return ax


def _common_prefix(names: Sequence[str]) -> str:
    if len(names) < 2:
        return ""
    parts = [n.split(".") for n in names]
    common: list[str] = []
    for pieces in zip(*parts, strict=False):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    common = common[: min(len(p) for p in parts) - 1]
    return ".".join(common) + "." if common else ""
