"""Optimizer parameter groups: LoRA+ learning-rate ratios and decay / no-decay subgroups.

LoRA+ (Hayou et al. 2024) trains the B side faster than the A side: ``lr_B = ratio * lr_A``. The
grouping follows the official code:

- B matrices and every trainable 1-D tensor (biases, norms, DoRA magnitudes) get ``lr * ratio``;
- A matrices and other trainable matrices (e.g. a classifier head) get ``lr``;
- adapters on embedding layers get a fixed small learning rate (``embedding_lr``, 1e-6).

Two ways in: [`lora_plus_param_groups`][lightning_lowrank.lora_plus_param_groups] builds groups for users who create the optimizer
themselves, and [`split_optimizer`][lightning_lowrank.split_optimizer] re-groups an existing optimizer (what the callback does
with the optimizer returned by ``configure_optimizers``), keeping every group's own settings
(weight decay, betas, ...) and keeping LR schedulers consistent with the new groups.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from torch import nn
from torch.optim import Optimizer

from lightning_lowrank.inject import adapter_layers

Role = Literal["A", "B", "embedding"]

#: LR-valued keys of a param group, scaled together with "lr"
_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
#: LR-valued per-group lists kept by torch schedulers, scaled together with "lr"
_SCHEDULER_LR_LISTS = ("base_lrs", "_last_lr", "min_lrs", "max_lrs")


def parameter_roles(model: nn.Module) -> dict[int, Role]:
    """The LoRA+ role of every trainable parameter of ``model``, keyed by ``id(param)``."""
    roles: dict[int, Role] = {}
    for layer in adapter_layers(model).values():
        params = dict(layer.named_parameters())
        for name, side in layer.param_sides().items():
            p = params[name]
            roles[id(p)] = "embedding" if layer.kind == "embedding" else side
    for p in model.parameters():
        if p.requires_grad and id(p) not in roles:
            roles[id(p)] = "B" if p.ndim <= 1 else "A"
    return roles


def lora_plus_param_groups(
    model: nn.Module,
    lr: float,
    lr_ratio: float = 16.0,
    weight_decay: float = 0.0,
    embedding_lr: float = 1e-6,
) -> list[dict[str, Any]]:
    """LoRA+ parameter groups for ``torch.optim.AdamW(groups)`` and friends.

    Matrices decay with ``weight_decay``; 1-D tensors (biases, norms, magnitudes) do not.

    Args:
        model: a model with injected adapters.
        lr: the A-side learning rate.
        lr_ratio: ``lr_B / lr_A`` (the paper recommends 16).
        weight_decay: weight decay of matrices.
        embedding_lr: learning rate of adapters on embedding layers.
    """
    roles = parameter_roles(model)
    lrs = {"A": lr, "B": lr * lr_ratio, "embedding": embedding_lr}
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        role = roles[id(p)]
        decay = p.ndim >= 2
        key = (role, decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "lr": lrs[role],
                "weight_decay": weight_decay if decay else 0.0,
                "name": f"lora_plus_{role}" + ("" if decay else "_no_decay"),
            }
        groups[key]["params"].append(p)
    order = [
        ("A", True),
        ("A", False),
        ("B", True),
        ("B", False),
        ("embedding", True),
        ("embedding", False),
    ]
    return [groups[k] for k in order if k in groups]


def split_optimizer(
    optimizer: Optimizer,
    model: nn.Module,
    lr_ratio: float,
    schedulers: Iterable[Any] = (),
    embedding_lr: float = 1e-6,
) -> list[int]:
    """Re-group ``optimizer`` in place for LoRA+, before any step was taken.

    Each existing group is split by role (A, B, embedding); new groups copy their source group's
    settings, B-side groups with every learning rate multiplied by ``lr_ratio`` and embedding groups
    at ``embedding_lr``. Frozen parameters are dropped (they never receive a gradient). Per-group
    lists kept by ``schedulers`` (base LRs, lambdas, ...) are rebuilt to match.

    Returns:
        For each new group, the index of the group it came from.
    """
    if any(optimizer.state.values()):
        raise RuntimeError("split_optimizer must run before the optimizer's first step")
    roles = parameter_roles(model)
    new_groups: list[dict[str, Any]] = []
    sources: list[int] = []
    factors: list[float | None] = []  # None: fixed embedding lr
    for index, group in enumerate(optimizer.param_groups):
        by_role: dict[Role, list] = {}
        for p in group["params"]:
            if p.requires_grad:
                by_role.setdefault(roles.get(id(p), "A"), []).append(p)
        for role in ("A", "B", "embedding"):
            if role not in by_role:
                continue
            new = {k: v for k, v in group.items() if k != "params"}
            new["params"] = by_role[role]
            factor = {"A": 1.0, "B": lr_ratio, "embedding": None}[role]
            for key in _LR_KEYS:
                if key in new and isinstance(new[key], (int, float)):
                    new[key] = new[key] * factor if factor is not None else embedding_lr
            new_groups.append(new)
            sources.append(index)
            factors.append(factor)
    if not new_groups:
        raise ValueError(
            "the optimizer holds none of the model's trainable parameters: build it from "
            "self.parameters() (or lora_plus_param_groups) in configure_optimizers"
        )
    n_old = len(optimizer.param_groups)
    optimizer.param_groups[:] = new_groups
    for scheduler in schedulers:
        _regroup_scheduler(scheduler, n_old, sources, factors, embedding_lr)
    return sources


def _regroup_scheduler(
    scheduler: Any, n_old: int, sources: list[int], factors: list[float | None], embedding_lr: float
) -> None:
    for inner in getattr(scheduler, "_schedulers", []):  # SequentialLR, ChainedScheduler
        _regroup_scheduler(inner, n_old, sources, factors, embedding_lr)
    for attr, value in list(vars(scheduler).items()):
        if not isinstance(value, list) or len(value) != n_old or attr == "_schedulers":
            continue
        if attr in _SCHEDULER_LR_LISTS:
            rebuilt = [
                value[s] * f if f is not None else embedding_lr
                for s, f in zip(sources, factors, strict=True)
            ]
        else:  # per-group callables or settings (lr_lambdas, ...): reuse the source group's
            rebuilt = [value[s] for s in sources]
        setattr(scheduler, attr, rebuilt)
