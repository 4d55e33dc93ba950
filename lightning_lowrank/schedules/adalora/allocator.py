"""AdaLoRA's rank allocator (Zhang et al. 2023, arXiv 2303.10512), as a schedule.

Once per optimizer step ``t`` (``t`` counts the step just taken), for every element ``w`` of every
P, lambda and Q, from ``w`` and its gradient ``g``:

    I = |w * g|
    I_bar <- beta1 * I_bar + (1 - beta1) * I                (sensitivity)
    U_bar <- beta2 * U_bar + (1 - beta2) * |I - I_bar|      (its uncertainty)
    score = I_bar * U_bar

and the triplet score of rank slot ``i`` of a layer is
``score(lambda_i) + mean_j score(Q[i, j]) + mean_j score(P[j, i])``.

With ``b0 = init_rank * L`` and ``bT = target_rank * L`` slots over ``L`` layers and ``T`` total
steps, the budget (total kept slots) is by default the paper's cubic schedule
([`cubic_budget`][lightning_lowrank.schedules.adalora.budget.cubic_budget])

    b(t) = b0                                                        t <= t_init
    b(t) = int(bT + (b0 - bT) * (1 - (t - t_init) / (T - t_final - t_init))^3)
                                                                     t_init < t <= T - t_final
    b(t) = bT                                                        t > T - t_final

and any other ``b(t)`` can be passed as ``RankAllocator(budget=...)`` (a number or a callable of
the step, resolved at every optimizer step; see [`lightning_lowrank.schedules.adalora.budget`][lightning_lowrank.schedules.adalora.budget]).

The phases come from the config whatever the budget: no masking while ``t <= t_init``; while
``t_init < t <= T - t_final``, every ``delta_t`` steps the ``b(t)`` slots with the highest triplet
scores over all layers (one global threshold) are kept and the others get ``lambda = 0`` (soft
masking: they keep receiving gradients and may come back at the next masking). At the first step of
the final phase the pattern is chosen once more, with budget ``b(t)`` (``bT`` for the default), and
then fixed: after every later step the masked lambdas are zeroed again. Importance EMAs stop
updating at ``T - t_final`` as in the official code.

The orthogonality regulariser ``gamma * mean over matrices of ||P^T P - I||_F and ||Q Q^T - I||_F``
is applied by adding its gradient after the gradients are complete (and DDP-synced), before the
optimizer step, so it acts whatever the user's ``training_step`` returns and is identical on every
rank (parameters are). The importance then sees the gradient the optimizer used, regulariser
included, as in the official code where the term is part of the loss.

Deviation from the official code: it masks every slot whose score is ``<=`` the ``(b0 - b)``-th
smallest, which can keep fewer than ``b`` slots when scores tie; here exactly ``b`` slots are kept
(a stable sort breaks ties by layer order, the same on every rank).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from lightning_lowrank.methods.adalora import AdaLoRA, AdaLoRALayer
from lightning_lowrank.methods.base import AdapterLayer
from lightning_lowrank.schedules.adalora.budget import (
    Budget,
    check_budget,
    cubic_budget,
    resolve_budget,
)
from lightning_lowrank.schedules.adalora.orthogonality import adalora_layers, add_orthogonality_grad
from lightning_lowrank.schedules.base import Schedule
from lightning_lowrank.shard import full_tensor, shard_like


def _layers_config(layers: dict[str, AdaLoRALayer]) -> AdaLoRA:
    """The one config the layers were built with (``inject`` gives every layer the same)."""
    configs = [layer.config for layer in layers.values()]
    first = configs[0]
    if not isinstance(first, AdaLoRA) or any(c != first for c in configs[1:]):
        raise ValueError(
            "the AdaLoRA layers were built with different configs: pass the one the schedule "
            "should follow, RankAllocator(config=AdaLoRA(...))"
        )
    return first


def _check_fits(cfg: AdaLoRA, total: int) -> None:
    if cfg.t_init + cfg.t_final >= total:
        raise ValueError(
            f"the AdaLoRA schedule does not fit the run: t_init ({cfg.t_init}) + t_final "
            f"({cfg.t_final}) must be < total steps ({total}), leaving steps for the budget to "
            "fall. Lower t_init / t_final, train longer (Trainer max_steps) or set "
            "AdaLoRA(total_steps=...)"
        )


class RankAllocator(Schedule):
    """AdaLoRA's importance scores, budget schedule and global soft masking. See the module
    docstring.

    ``LowRankCallback`` adds one automatically when its method is [`AdaLoRA`][lightning_lowrank.AdaLoRA] and none is in
    its ``schedules``; pass your own to change the budget, e.g.
    ``LowRankCallback(AdaLoRA(...), schedules=[RankAllocator(budget=my_budget)])``. Without a
    Trainer call ``setup`` once, then per optimizer step ``before_optimizer_step`` (after
    ``backward``) and ``after_optimizer_step`` (after ``optimizer.step()``, before
    ``zero_grad``).

    Args:
        config: the AdaLoRA config (schedule knobs, ``orth_reg`` and optionally ``total_steps``);
            ``None`` takes the config the layers were built with, at ``setup``.
        budget: the kept rank slots ``b(t)`` over all layers: ``None`` for the paper's cubic
            schedule, a number of slots (``int``), a fraction of the initial slots (``float`` in
            ``[0, 1]``), or a callable of the optimizer step returning either, resolved at every
            optimizer step (see [`lightning_lowrank.schedules.adalora.budget`][lightning_lowrank.schedules.adalora.budget]).

    Raises:
        TypeError: ``budget`` is not ``None``, a number or a callable.
        ValueError: a constant ``budget`` that is negative or a fraction outside ``[0, 1]``.
    """

    def __init__(self, config: AdaLoRA | None = None, budget: Budget | None = None) -> None:
        check_budget(budget)
        self.config = config
        self.budget_schedule = budget
        self.total_steps: int | None = None
        self.names: list[str] = []
        self.initial_budget = 0
        self.target_budget = 0
        self.step = 0
        self.num_updates = 0
        self.fixed = False
        self.skipped_updates = 0
        self.ipt: list[Tensor] = []
        self.unc: list[Tensor] = []
        self.history_steps: list[int] = []
        self.history_ranks: list[list[int]] = []
        self._layers: dict[str, AdaLoRALayer] = {}

    # --- schedule hooks ---------------------------------------------------------------------
    def setup(
        self, model: nn.Module, layers: dict[str, AdapterLayer], total_steps: int | None
    ) -> None:
        """Check that the schedule fits the run and record the starting rank pattern.

        Raises:
            ValueError: ``t_init + t_final >= T``, ``target_rank > init_rank``, layers built from
                different configs while ``config`` is ``None``, or a constant ``budget`` above
                the initial slots.
        """
        adalora = adalora_layers(layers)
        if not adalora:
            raise ValueError("the rank allocator got no layers: check target_modules")
        cfg = self.config if self.config is not None else _layers_config(adalora)
        if cfg.target_rank > cfg.init_rank:
            raise ValueError(
                f"AdaLoRA target_rank ({cfg.target_rank}) exceeds init_rank ({cfg.init_rank}): "
                "lower target_rank or raise init_rank"
            )
        total = cfg.total_steps if cfg.total_steps is not None else total_steps
        if total is not None:
            _check_fits(cfg, total)
        initial = sum(layer.rank for layer in adalora.values())
        if self.budget_schedule is not None and not callable(self.budget_schedule):
            resolve_budget(self.budget_schedule, initial)
        self.config, self._layers, self.total_steps = cfg, adalora, total
        self.names = list(adalora)
        self.initial_budget = initial
        self.target_budget = min(cfg.target_rank * len(self.names), initial)
        self._record(0)

    def _cfg(self) -> AdaLoRA:
        if self.config is None:
            raise RuntimeError("the rank allocator is not set up: call setup(model, layers, T)")
        return self.config

    def check_run_length(self, total_steps: int | None, steps_per_epoch: int | None) -> None:
        if self.total_steps is None and total_steps is not None:
            # set up before the length was known (trainer.validate before fit): take it now
            _check_fits(self._cfg(), total_steps)
            self.total_steps = total_steps
        self._total()  # raises the message that names the fix while the length is unknown

    def _total(self) -> int:
        if self.total_steps is None:
            raise ValueError(
                "AdaLoRA needs the run's total optimizer steps, and this run's length is unknown "
                "(an IterableDataset without max_steps?): set Trainer(max_steps=...), "
                "LowRankCallback(total_steps=...) or AdaLoRA(total_steps=...)"
            )
        return self.total_steps

    def before_optimizer_step(
        self, model: nn.Module, layers: dict[str, AdapterLayer], step: int
    ) -> None:
        """Add the orthogonality regulariser's gradient (gradients are complete and synced)."""
        add_orthogonality_grad(layers, self._cfg().orth_reg)

    def after_optimizer_step(
        self, model: nn.Module, layers: dict[str, AdapterLayer], step: int
    ) -> None:
        """Update the importance EMAs and, when the schedule says so, the masks."""
        self.update_and_mask(adalora_layers(layers), step)

    # --- the algorithm ----------------------------------------------------------------------
    def budget(self, step: int) -> tuple[int, bool]:
        """``(b(t), whether to mask at step t)``; see [the allocator's description][lightning_lowrank.schedules.adalora.allocator].

        ``b(t)`` is the ``budget`` argument resolved at ``step`` (the cubic schedule by default);
        whether to mask follows the config's phases: never while ``t <= t_init``, every
        ``delta_t`` steps until ``T - t_final``, and at every later step (the first of them
        chooses the final pattern, the others re-apply it).

        Raises:
            ValueError: the total steps are unknown, or the budget at ``step`` lies outside
                ``[0, b0]`` slots (``[0, 1]`` as a fraction).
            TypeError: the budget callable returned something other than a number.
        """
        cfg = self._cfg()
        total = self._total()
        if self.budget_schedule is None:
            slots = cubic_budget(
                step, self.initial_budget, self.target_budget, total, cfg.t_init, cfg.t_final
            )
        else:
            value = (
                self.budget_schedule(step)
                if callable(self.budget_schedule)
                else self.budget_schedule
            )
            slots = resolve_budget(value, self.initial_budget, step)
        if step <= cfg.t_init:
            return slots, False
        if step > total - cfg.t_final:
            return slots, True
        return slots, step % cfg.delta_t == 0

    def update_and_mask(self, layers: dict[str, AdaLoRALayer], step: int) -> None:
        """One optimizer step of the allocator: EMAs, then masking if the schedule says so.

        The budget is resolved first, so that a budget callable's bad value changes nothing.
        """
        total = self._total()
        budget, mask_now = self.budget(step)
        self.step = step
        self.num_updates += 1
        if step < total - self._cfg().t_final:
            self.update_importance(layers)
        if not mask_now:
            return
        if step > total - self._cfg().t_final:
            if not self.fixed:
                self.mask_to_budget(layers, budget)
                self.fixed = True
                self._record(step)
            else:
                # the optimizer moved the masked lambdas: put the fixed pattern back
                torch._foreach_mul_(
                    [layers[n].lora_E.data for n in self.names],
                    [shard_like(layers[n].rank_mask, layers[n].lora_E) for n in self.names],
                )
            return
        self.mask_to_budget(layers, budget)
        self._record(step)

    def _tensors(self, layers: dict[str, AdaLoRALayer]) -> list[Tensor]:
        return [
            t for n in self.names for t in (layers[n].lora_A, layers[n].lora_E, layers[n].lora_B)
        ]

    @torch.no_grad()
    def update_importance(self, layers: dict[str, AdaLoRALayer]) -> None:
        """``I = |w * g|``, then the sensitivity and uncertainty EMAs, for every element at once
        (``torch._foreach_*``: a few fused kernels for all layers instead of a loop of small ones).
        """
        # sharded (FSDP2) factors and gradients are gathered: the scores, and so the masks, are
        # global and the same on every rank
        params = [full_tensor(p.detach()) for p in self._tensors(layers)]
        grads = [
            full_tensor(p.grad) if p.grad is not None else torch.zeros_like(q)
            for p, q in zip(self._tensors(layers), params, strict=True)
        ]
        if not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            # a NaN/inf gradient (a step GradScaler skipped under fp16, or a NaN loss) would stay
            # in the averages forever and make every score NaN: this step's update is skipped
            self.skipped_updates += 1
            warnings.warn(
                f"AdaLoRA: non-finite gradients at optimizer step {self.step} (a step skipped "
                "by fp16 loss scaling, or a NaN loss): the importance update is skipped "
                f"({self.skipped_updates} so far)",
                stacklevel=2,
            )
            return
        self._ensure_state(params)
        ipt: tuple[Tensor, ...] | list[Tensor] = torch._foreach_mul(params, grads)
        torch._foreach_abs_(ipt)
        if ipt[0].dtype != self.ipt[0].dtype:
            ipt = [t.to(self.ipt[0].dtype) for t in ipt]
        # lerp_(avg, x, 1 - beta) is beta * avg + (1 - beta) * x
        torch._foreach_lerp_(self.ipt, ipt, 1.0 - self._cfg().beta1)
        torch._foreach_sub_(ipt, self.ipt)
        torch._foreach_abs_(ipt)
        torch._foreach_lerp_(self.unc, ipt, 1.0 - self._cfg().beta2)

    def _ensure_state(self, params: list[Tensor]) -> None:
        if not self.ipt:
            # EMAs of low-precision parameters are kept in float32
            dtype = [torch.promote_types(p.dtype, torch.float32) for p in params]
            self.ipt = [torch.zeros_like(p, dtype=d) for p, d in zip(params, dtype, strict=True)]
            self.unc = [torch.zeros_like(p, dtype=d) for p, d in zip(params, dtype, strict=True)]
        elif self.ipt[0].device != params[0].device:  # restored from a checkpoint on another device
            self.ipt = [t.to(params[0].device) for t in self.ipt]
            self.unc = [t.to(params[0].device) for t in self.unc]

    @torch.no_grad()
    def slot_scores(self) -> list[Tensor]:
        """The triplet score of every rank slot, one ``(r,)`` tensor per layer (in layer order)."""
        if not self.ipt:
            raise RuntimeError("no importance yet: the allocator has not seen a gradient")
        scores = torch._foreach_mul(self.ipt, self.unc)
        out = []
        for i in range(len(self.names)):
            s_q, s_lambda, s_p = scores[3 * i : 3 * i + 3]
            out.append(s_lambda + s_q.mean(dim=1) + s_p.mean(dim=0))
        return out

    @torch.no_grad()
    def mask_to_budget(self, layers: dict[str, AdaLoRALayer], budget: int) -> None:
        """Keep the ``budget`` slots with the highest triplet scores over all layers; zero the
        lambda of every other slot and record the pattern in each layer's ``rank_mask``."""
        scores = torch.cat(self.slot_scores())
        keep = torch.zeros_like(scores)
        if budget > 0:
            order = torch.argsort(scores, descending=True, stable=True)
            keep[order[:budget]] = 1.0
        ranks = [layers[n].rank for n in self.names]
        for name, mask in zip(self.names, keep.split(ranks), strict=True):
            layer = layers[name]
            layer.rank_mask.copy_(mask)
            layer.lora_E.mul_(shard_like(layer.rank_mask, layer.lora_E))

    def _record(self, step: int) -> None:
        self.history_steps.append(step)
        self.history_ranks.append([self._layers[n].live_rank() for n in self.names])

    # --- analysis and persistence -----------------------------------------------------------
    def rank_pattern(self) -> dict[str, int]:
        """The live rank of every layer now."""
        return {n: self._layers[n].live_rank() for n in self.names}

    def rank_history(self) -> dict[str, Any]:
        """``{"layers": names, "steps": [t...], "ranks": [[rank per layer] per recorded step],
        "step": the last optimizer step seen}``.

        A row is recorded at setup (step 0) and whenever the masks change; the rank between two
        recorded steps is that of the earlier one.
        """
        return {
            "layers": list(self.names),
            "step": self.step,
            "steps": list(self.history_steps),
            "ranks": [list(r) for r in self.history_ranks],
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "total_steps": self.total_steps,
            "step": self.step,
            "num_updates": self.num_updates,
            "fixed": self.fixed,
            "ipt": [t.detach().clone() for t in self.ipt],
            "unc": [t.detach().clone() for t in self.unc],
            "masks": {n: self._layers[n].rank_mask.detach().clone() for n in self.names},
            "history_steps": list(self.history_steps),
            "history_ranks": [list(r) for r in self.history_ranks],
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.names and state["names"] != self.names:
            raise ValueError(
                "the checkpoint's AdaLoRA allocator covers other layers than this model: resume "
                "with the same target_modules"
            )
        self.total_steps = state["total_steps"]
        self.step = state["step"]
        self.num_updates = state["num_updates"]
        self.fixed = state["fixed"]
        self.ipt = list(state["ipt"])
        self.unc = list(state["unc"])
        for name, mask in state["masks"].items():
            if name in self._layers:
                self._layers[name].rank_mask.copy_(mask)
        self.history_steps = list(state["history_steps"])
        self.history_ranks = [list(r) for r in state["history_ranks"]]
