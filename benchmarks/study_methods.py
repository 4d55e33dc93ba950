"""Reproduction study: the scheduled methods against plain LoRA on Debian fortunes topics.

- AdaLoRA (Zhang et al. 2023) vs LoRA at an equal final budget, in the paper's small-budget regime
  (every layer starts at rank 3 and the allocator keeps an average of 2, against LoRA r=2) and at
  rank 8 (12 -> 8 against LoRA r=8), every run at ``ADALORA_LR`` (near LoRA r=8's best rate).
  The paper claims better accuracy at the same budget.
- LoRA-drop (Zhou et al. 2024) vs LoRA r=8 at the same rate, on the same device, for each of the
  ``LORA_DROP_THRESHOLDS``: the paper claims about the same accuracy with about half the LoRA
  parameters. "The same" is the equivalence margin ``LORA_DROP_MARGIN`` on test accuracy, fixed
  here before any run.
- Delta-LoRA (Zi et al. 2023) vs LoRA, both over the rate grid ``DELTA_LRS`` (Delta-LoRA's update
  of the base weight makes its effective step larger, so a shared untuned rate would favour one of
  them); each method at its best rate by validation accuracy, compared on test accuracy. The paper
  claims better accuracy than LoRA at the same memory.

    python -m benchmarks.study --studies methods
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from benchmarks.common import TARGET
from benchmarks.study_common import Study, finetune, quick, stored_adapter_parameters

STEPS, BATCH, MAX_LENGTH = (6, 4, 32) if quick() else (1000, 32, 64)
ADALORA_LR = 1e-3
DELTA_LRS = (2.5e-4, 5e-4, 1e-3, 2e-3)
LORA_DROP_THRESHOLDS = (0.8, 0.9, 0.95)
#: LoRA-drop "keeps the accuracy": the 95 % interval of (LoRA-drop - LoRA) test accuracy must lie
#: inside +/- this margin (1 point), stated before the runs
LORA_DROP_MARGIN = 0.01
ADALORA_SCHEDULE = {"t_init": 100, "t_final": 300, "delta_t": 10}
ADALORA_BUDGETS = {"AdaLoRA 3 -> 2": (3, 2), "AdaLoRA 12 -> 8": (12, 8)}
DELTA_LORA = {"scale": 2.0, "start_step": 200}
LORA_DROP: dict[str, Any] = {"sample_fraction": 0.1}
if quick():
    ADALORA_SCHEDULE.update(t_init=1, t_final=2, delta_t=1)
    DELTA_LORA["start_step"] = 2
    LORA_DROP = {"sample_steps": 2}

#: config -> (rank of the LoRA pair or AdaLoRA's budget, learning rates it runs at)
CONFIGS: dict[str, tuple[float, ...]] = {
    "LoRA r=2": (ADALORA_LR,),
    "AdaLoRA 3 -> 2": (ADALORA_LR,),
    "LoRA r=8": tuple(sorted({ADALORA_LR, *DELTA_LRS})),
    "AdaLoRA 12 -> 8": (ADALORA_LR,),
    **{f"LoRA-drop r=8 t={t:g}": (ADALORA_LR,) for t in LORA_DROP_THRESHOLDS},
    "Delta-LoRA r=8": DELTA_LRS,
}


def tasks(seeds: Iterable[int]) -> list[dict[str, Any]]:
    return [
        {"config": name, "lr": lr, "seed": seed}
        for seed in seeds
        for name, lrs in CONFIGS.items()
        for lr in lrs
    ]


def run(task: dict[str, Any]) -> dict[str, Any]:
    from lightning_lowrank import AdaLoRA, DeltaLoRA, LoRA, LoRADrop, LowRankCallback

    name = task["config"]

    def callbacks() -> list[Any]:
        schedules: list[Any] = []
        rank = 2 if name == "LoRA r=2" else 8
        method: Any = LoRA(rank=rank, alpha=2.0 * rank)
        if name in ADALORA_BUDGETS:
            init, target = ADALORA_BUDGETS[name]
            method = AdaLoRA(
                init_rank=init, target_rank=target, alpha=2.0 * target, **ADALORA_SCHEDULE
            )
        elif name.startswith("LoRA-drop"):
            threshold = float(name.rsplit("t=", 1)[1])
            schedules = [LoRADrop(threshold=threshold, **LORA_DROP, log_table=False)]
        elif name.startswith("Delta-LoRA"):
            schedules = [DeltaLoRA(**DELTA_LORA)]
        return [
            LowRankCallback(
                method, target_modules=TARGET, train_modules=["classifier"], schedules=schedules
            )
        ]

    def sizes(module: Any, model: Any) -> dict[str, Any]:
        if name.startswith("Delta-LoRA"):  # its result lives in the base weights too
            return {}
        return {
            "adapter_parameters": stored_adapter_parameters(
                module, truncate=name.startswith("AdaLoRA")
            )
        }

    result = finetune(
        data="fortunes",
        seed=task["seed"],
        steps=STEPS,
        lr=task["lr"],
        batch_size=BATCH,
        max_length=MAX_LENGTH,
        accelerator=task["accelerator"],
        callbacks_for=callbacks,
        after_fit=sizes,
    )
    return {"config": name, "lr": task["lr"], "seed": task["seed"], **result}


STUDY = Study(
    name="methods",
    title="AdaLoRA, LoRA-drop and Delta-LoRA vs LoRA",
    tasks=tasks,
    run=run,
    key=("config", "lr", "seed"),
    meta={
        "data": "fortunes",
        "steps": STEPS,
        "batch_size": BATCH,
        "max_length": MAX_LENGTH,
        "adalora_lr": ADALORA_LR,
        "delta_lrs": DELTA_LRS,
        "lora_drop_thresholds": LORA_DROP_THRESHOLDS,
        "lora_drop_margin": LORA_DROP_MARGIN,
        "adalora": ADALORA_SCHEDULE,
        "delta_lora": DELTA_LORA,
        "lora_drop": LORA_DROP,
    },
)

if __name__ == "__main__":
    from benchmarks.study_common import main

    main(studies=["methods"])
