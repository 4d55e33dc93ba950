"""Reproduction study: the scheduled methods against plain LoRA on Debian fortunes topics.

- AdaLoRA (Zhang et al. 2023) vs LoRA at an equal final budget: AdaLoRA starts every layer at
  rank 12 and keeps an average of 8 per layer, LoRA r=8's budget. The paper claims better accuracy
  at the same budget.
- LoRA-drop (Zhou et al. 2024): the paper claims about half the LoRA parameters for the same
  accuracy. Reported: the adapter parameters stored at the end and the accuracy.
- Delta-LoRA (Zi et al. 2023): the paper claims better accuracy than LoRA at the same memory.

All runs fine-tune MiniLM for the same steps at the same learning rate on 36 encoder layers.

    python -m benchmarks.study --studies methods
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from benchmarks.common import TARGET
from benchmarks.study_common import Study, finetune, quick, stored_adapter_parameters

STEPS, BATCH, MAX_LENGTH, LR = (6, 4, 32, 5e-4) if quick() else (1000, 32, 64, 5e-4)
ADALORA = {"init_rank": 12, "target_rank": 8, "t_init": 100, "t_final": 300, "delta_t": 10}
DELTA_LORA = {"scale": 2.0, "start_step": 200}
LORA_DROP: dict[str, Any] = {"threshold": 0.9, "sample_fraction": 0.1}
if quick():
    ADALORA.update(t_init=1, t_final=2, delta_t=1)
    DELTA_LORA["start_step"] = 2
    LORA_DROP = {"threshold": 0.9, "sample_steps": 2}
CONFIGS = ("LoRA r=8", "AdaLoRA 12 -> 8", "LoRA-drop r=8", "Delta-LoRA r=8")


def tasks(seeds: Iterable[int]) -> list[dict[str, Any]]:
    return [{"config": name, "seed": seed} for seed in seeds for name in CONFIGS]


def run(task: dict[str, Any]) -> dict[str, Any]:
    from lightning_lowrank import AdaLoRA, DeltaLoRA, LoRA, LoRADrop, LowRankCallback

    name = task["config"]

    def callbacks() -> list[Any]:
        schedules: list[Any] = []
        method: Any = LoRA(rank=8, alpha=16.0)
        if name.startswith("AdaLoRA"):
            method = AdaLoRA(alpha=16.0, **ADALORA)
        elif name.startswith("LoRA-drop"):
            schedules = [LoRADrop(**LORA_DROP, log_table=False)]
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
        lr=LR,
        batch_size=BATCH,
        max_length=MAX_LENGTH,
        accelerator=task["accelerator"],
        callbacks_for=callbacks,
        after_fit=sizes,
    )
    return {"config": name, "seed": task["seed"], **result}


STUDY = Study(
    name="methods",
    title="AdaLoRA, LoRA-drop and Delta-LoRA vs LoRA",
    tasks=tasks,
    run=run,
    key=("config", "seed"),
    meta={
        "data": "fortunes",
        "steps": STEPS,
        "batch_size": BATCH,
        "max_length": MAX_LENGTH,
        "lr": LR,
        "adalora": ADALORA,
        "delta_lora": DELTA_LORA,
        "lora_drop": LORA_DROP,
    },
)

if __name__ == "__main__":
    from benchmarks.study_common import main

    main(studies=["methods"])
