"""LoRA-drop (Zhou et al. 2024, arXiv 2402.07721): keep the adapters whose output matters, let the
others share one adapter per layer shape (or drop them).

The schedule runs inside ``LowRankCallback(method, schedules=[LoRADrop(...)])`` in three steps:

1. **Sampling phase.** The first ``sample_steps`` optimizer steps train every adapter as usual while
   the importance of each adapted layer ``i`` is read off the adapter's own output (no extra forward
   pass): ``g_i = sum over the phase's training inputs x of ||dW_i x||^2`` (``selection.py``).
   Only training forwards count; under DDP the per-step sums are all-reduced, so every rank holds
   the same ``g``.
2. **Selection.** ``I_i = g_i / sum_j g_j``; layers sorted by ``I_i`` (descending) are kept until the
   cumulative importance reaches ``threshold`` (0.9), the layer that crosses it included.
3. **Switch.** Every unselected layer of the same adapter shape uses ONE adapter from then on
   (``mode="share"``, the paper: members tied to a host), or is disabled (``mode="drop"``, "which
   layers to fine-tune at all"). Training continues on the full data. ``sharing.py`` says how the
   switch keeps optimizer, DDP and checkpoints valid.

The schedule's state (phase, importances, selection, groups) is its own and is all that
``state_dict`` needs: the ties and disabled flags on the layers are re-derived from it.

The shared adapter's initial value is not stated by the paper: ``shared_init="mean"`` (default)
sets it to the element-wise mean of the group's adapters after the sampling phase;
``shared_init="fresh"`` re-initialises it as the method does (seeded by ``seed``), which for LoRA
is a zero delta.

Deviation from the paper: the sample is the first ``sample_steps`` optimizer steps of the ordinary
(shuffled) training stream, not a separately drawn stratified sample, and the kept adapters continue
from their sampled values instead of restarting.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from lightning_lowrank.methods.base import AdapterLayer, check_int, check_number
from lightning_lowrank.schedules.base import Schedule
from lightning_lowrank.schedules.lora_drop.report import (
    normalised,
    plot_importance,
    report_table,
    roles,
)
from lightning_lowrank.schedules.lora_drop.selection import (
    ImportanceMeter,
    select_layers,
    shape_groups,
)
from lightning_lowrank.schedules.lora_drop.sharing import (
    Mode,
    SharedInit,
    adapter_parameter_count,
    apply_groups,
    check_groups,
    clear_idle_gradients,
    forget_optimizer_state,
    initialise_shared,
)
from lightning_lowrank.sharing import adapter_parameters


class LoRADrop(Schedule):
    """LoRA-drop: output-importance layer selection, then one shared adapter per layer shape.

    ``g_i = sum_x ||dW_i x||^2`` over the sampling phase; ``I_i = g_i / sum_j g_j``; the layers with
    the largest ``I_i`` are kept until ``sum I_i >= threshold``; the others share one adapter per
    shape (or are disabled with ``mode="drop"``).

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
            ``"drop"`` (unselected adapters are disabled and left out of adapter files).
        shared_init: the shared adapter's initial value: ``"mean"`` of the group's adapters after
            the sampling phase, or ``"fresh"`` (the method's own initialisation, seeded by ``seed``).
        seed: seed of the ``"fresh"`` initialisation (identical on every rank).
        log_table: hand the selection table to the callback (which logs it on rank zero) at the
            switch; ``report`` gives it at any time.
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
        threshold = check_number("threshold", threshold)
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if sample_steps is not None:
            sample_steps = check_int(
                "sample_steps (or None to use sample_fraction)", sample_steps, 1
            )
        seed = check_int("seed", seed, minimum=0)
        sample_fraction = check_number("sample_fraction", sample_fraction)
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
        self._meter = ImportanceMeter()
        self._messages: list[str] = []
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
            self._meter.attach(layers)
        else:  # state was loaded before setup
            self._apply(initialise=False)

    def check_run_length(self, total_steps: int | None, steps_per_epoch: int | None) -> None:
        if self.switch_step is None and steps_per_epoch is None:
            raise ValueError(
                "LoRADrop(sample_fraction=...) needs the number of optimizer steps per epoch, "
                "which this run does not know (an IterableDataset without a length?): pass "
                "LoRADrop(sample_steps=...) instead"
            )

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
        if self.phase == "switched":
            # gradients are complete and synced here (DDP), and clipping comes after this hook
            clear_idle_gradients(self._layers, self._unselected())

    def after_optimizer_step(
        self, model: nn.Module, layers: dict[str, AdapterLayer], step: int
    ) -> None:
        if self.phase != "sampling":
            return
        first = next(iter(self._layers.values()))
        device = next(iter(adapter_parameters(first).values())).device
        self._meter.flush(list(self._layers), self.importance, self.calls, device)
        if self.switch_step is None:
            raise ValueError(
                "LoRADrop does not know how long its sampling phase is: pass sample_steps=..., or "
                "call train_start(..., steps_per_epoch=...) when driving it without a Trainer"
            )
        if step >= self.switch_step:
            self.switch()

    def pop_messages(self) -> list[str]:
        messages, self._messages = self._messages, []
        return messages

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
        selected = select_layers(self.importance, self.threshold)
        unselected = [n for n in self._layers if n not in set(selected)]
        groups = shape_groups(self._layers, unselected)
        check_groups(self._layers, groups, self.mode)
        self.parameters_before = adapter_parameter_count(self._layers)
        self.selected, self.groups = selected, groups
        self.phase = "switched"
        self._apply(initialise=True)
        self.parameters_after = adapter_parameter_count(self._layers)
        if self.log_table:
            self._messages.append(self.report())

    def _apply(self, initialise: bool) -> None:
        """Put the switched structure in place; ``initialise`` sets the shared values (at the
        switch itself), otherwise the values come from a checkpoint."""
        check_groups(self._layers, self.groups, self.mode)
        self._meter.detach()
        forget_optimizer_state(self._layers, self._unselected(), self._optimizers)
        if self.mode == "share" and initialise:
            for group in self.groups:
                initialise_shared(self._layers, group, self.shared_init, self.seed)
        apply_groups(self._layers, self.groups, self.mode)

    def shares_adapters(self) -> bool:
        return self.mode == "share"

    # --- helpers ------------------------------------------------------------------------------
    def _unselected(self) -> list[str]:
        return [n for group in self.groups for n in group]

    def _check_fits(self) -> None:
        # a warning, not an error: a run may legitimately stop early and be resumed for longer
        if self.switch_step is not None and self._total_steps is not None:
            if self.switch_step > self._total_steps and _rank_zero():
                warnings.warn(
                    f"LoRADrop's sampling phase ({self.switch_step} optimizer steps) does not end "
                    f"before this run does ({self._total_steps} steps), so no layer is shared or "
                    "dropped: lower sample_steps or sample_fraction, or train longer",
                    UserWarning,
                    stacklevel=3,
                )

    def normalised_importance(self) -> dict[str, float]:
        """``I_i = g_i / sum_j g_j`` per layer (zeros while nothing was measured)."""
        return normalised(self.importance)

    def roles(self) -> dict[str, str]:
        """Each layer's role after the switch: ``"kept"``, ``"shared #k (n layers)"`` or ``"dropped"``."""
        return roles(self.selected, self.groups, self.mode)

    def report(self) -> str:
        """The selection as a text table: layers by importance, cumulative share and role."""
        header = (
            f"LoRA-drop (threshold {self.threshold:g}, mode {self.mode!r}): kept "
            f"{len(self.selected)} of {len(self.importance)} layers; {len(self._unselected())} "
            f"layers in {len(self.groups)} shape groups; adapter parameters "
            f"{self.parameters_before:,} -> {self.parameters_after:,}"
        )
        role = self.roles() if self.phase == "switched" else {}
        return report_table(self.importance, role, header)

    def plot(self, ax: Any = None) -> Any:
        """Bar chart of the normalised importance per layer with the cut-off; see ``plot_importance``."""
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
        old_phase, old_groups = self.phase, [list(g) for g in self.groups]
        self.switch_step = state["switch_step"]
        self.importance = dict(state["importance"])
        self.calls = dict(state["calls"])
        self.selected = list(state["selected"])
        self.groups = [list(g) for g in state["groups"]]
        self.parameters_before = state["parameters_before"]
        self.parameters_after = state["parameters_after"]
        self.phase = state["phase"]
        self._meter.clear()  # partial sums of an abandoned step
        if not self._layers:
            return  # not set up yet: setup puts the loaded structure in place
        # any transition, also back to before the switch (an in-process retry from an earlier
        # checkpoint): undo the structure in place, then put the loaded one in place
        if old_phase == "switched":
            for name in (n for group in old_groups for n in group):
                self._layers[name].share_adapter(None)
                self._layers[name].disabled = False
        if self.phase == "switched":
            self._apply(initialise=False)
        elif old_phase == "switched":
            self._meter.attach(self._layers)


def _rank_zero() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


__all__ = [
    "ImportanceMeter",
    "LoRADrop",
    "adapter_parameters",
    "plot_importance",
    "select_layers",
    "shape_groups",
]
