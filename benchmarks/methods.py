"""The benchmarked methods: one small entry each, this library's config and PEFT's equivalent.

A method whose module has not landed yet (or that PEFT lacks) is skipped with a note, so adding one
is adding an entry here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from benchmarks.common import TARGET, Runner, training_step_fn
from lightning_lowrank import inject
from lightning_lowrank.inject import adapter_layers

#: AdaLoRA's schedule in both libraries; the benchmark's few steps stay inside t_init, so both
#: libraries update importance scores every step and never mask (the steady cost of most steps)
ADALORA_SCHEDULE = {"t_init": 200, "t_final": 200, "delta_t": 10, "total_steps": 1000}


@dataclass
class MethodEntry:
    """One method: how to build this library's config and PEFT's, from the same hyperparameters."""

    name: str
    module: str  # lightning_lowrank.methods.<module>
    config_name: str
    kwargs: dict[str, Any]
    peft: Callable[..., Any] | None  # PEFT config factory (target=...); None: PEFT lacks it

    def ours_config(self) -> Any:
        mod = importlib.import_module(f"lightning_lowrank.methods.{self.module}")
        return getattr(mod, self.config_name)(**self.kwargs)

    def available(self) -> str | None:
        """``None`` if this library has the method now, else why not."""
        try:
            self.ours_config()
        except (ImportError, AttributeError) as err:
            return f"not available yet ({err})"
        return None


def _peft_lora(use_dora: bool = False, target: str = TARGET) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=target, use_dora=use_dora
    )


def _peft_vera(target: str = TARGET) -> Any:
    from peft import VeraConfig

    return VeraConfig(r=256, target_modules=target, d_initial=0.1, projection_prng_key=0)


def _peft_adalora(target: str = TARGET) -> Any:
    from peft import AdaLoraConfig

    s = ADALORA_SCHEDULE
    return AdaLoraConfig(
        init_r=12,
        target_r=8,
        lora_alpha=12,  # scale alpha / init_r = 1 in both libraries
        tinit=s["t_init"],
        tfinal=s["t_final"],
        deltaT=s["delta_t"],
        total_step=s["total_steps"],
        beta1=0.85,
        beta2=0.85,
        orth_reg_weight=0.1,
        target_modules=target,
    )


ENTRIES: list[MethodEntry] = [
    MethodEntry("LoRA", "lora", "LoRA", {"rank": 8, "alpha": 16.0}, _peft_lora),
    MethodEntry(
        "DoRA",
        "dora",
        "DoRA",
        {"rank": 8, "alpha": 16.0},
        lambda target=TARGET: _peft_lora(use_dora=True, target=target),
    ),
    MethodEntry("VeRA", "vera", "VeRA", {"rank": 256, "d_init": 0.1, "seed": 0}, _peft_vera),
    MethodEntry(
        "AdaLoRA",
        "adalora",
        "AdaLoRA",
        {"init_rank": 12, "target_rank": 8, "alpha": 12.0, **ADALORA_SCHEDULE},
        _peft_adalora,
    ),
    MethodEntry("SingLoRA", "singlora", "SingLoRA", {"rank": 8, "alpha": 16.0}, None),
]


#: LoRA-FA: LoRA with A frozen after initialisation; PEFT has no such config (only an optimizer)
LORA_FA = MethodEntry("LoRA-FA", "lora", "LoRA", {"rank": 8, "alpha": 16.0, "train_a": False}, None)


def build_ours(
    entry: MethodEntry,
    model: nn.Module,
    batch: dict,
    target: str = TARGET,
    inject_kwargs: dict[str, Any] | None = None,
) -> Runner:
    """Inject this library's adapter into ``model`` and return its training-step runner.

    Scheduled parts of a method (AdaLoRA's allocator) run from the same hooks the callback uses.
    ``inject_kwargs`` go to :func:`~lightning_lowrank.inject` (``quantize_base="nf4"``, say).
    """
    from lightning_lowrank.schedules import default_schedules

    config = entry.ours_config()
    inject(model, config, target_modules=target, **(inject_kwargs or {}))
    layers = adapter_layers(model)
    schedules = default_schedules(config)
    for s in schedules:
        s.setup(model, layers, ADALORA_SCHEDULE["total_steps"])

    def before(step: int) -> None:
        for s in schedules:
            s.before_optimizer_step(model, layers, step)

    def after(step: int) -> None:
        for s in schedules:
            s.after_optimizer_step(model, layers, step)

    step = training_step_fn(
        model, batch, before if schedules else None, after if schedules else None
    )
    return Runner(f"{entry.name} (ours)", model, step, {"schedules": len(schedules)})


def build_peft(entry: MethodEntry, model: nn.Module, batch: dict, target: str = TARGET) -> Runner:
    """Wrap ``model`` with PEFT's version of the method and return its training-step runner."""
    from peft import get_peft_model

    assert entry.peft is not None
    pmodel = get_peft_model(model, entry.peft(target=target))
    after = None
    if entry.name == "AdaLoRA":
        # PEFT's AdaLoRA needs this call after every optimizer step (gradients still present)
        def after(step: int) -> None:
            pmodel.base_model.update_and_allocate(step)

    step = training_step_fn(pmodel, batch, None, after)
    return Runner(f"{entry.name} (PEFT)", pmodel, step)
