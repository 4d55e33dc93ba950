"""Reproduction study: LoRA+ vs LoRA (Hayou, Ghosh and Yu 2024): steps to a target loss.

The paper claims that giving the B matrices a learning rate ``lambda = 16`` times the A matrices'
speeds fine-tuning up (up to about 2x) and improves the final result by 1-2 %. A fair test tunes
both: plain LoRA r=8 over ``LORA_LRS`` and LoRA+ (the same adapter, ``lr_ratio=16``) over the
A-side rates ``LORAPLUS_LRS`` (B side 16x), validating every ``EVAL_EVERY`` steps. Each method's
tuned rate is the one with the lowest mean best validation loss; per seed, the target is the best
validation loss of tuned LoRA, and the page compares the steps each tuned method needs to reach it
(a run that never reaches it counts ``STEPS + EVAL_EVERY`` steps, a stated penalty), and the final
validation accuracy.

    python -m benchmarks.study --studies loraplus
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from benchmarks.common import TARGET
from benchmarks.study_common import Study, finetune, quick

STEPS, BATCH, MAX_LENGTH, EVAL_EVERY = (4, 4, 32, 2) if quick() else (1000, 32, 64, 50)
LORA_LRS = (5e-4, 1e-3, 2e-3)
LORAPLUS_LRS = (3e-5, 6e-5, 1e-4, 2e-4)
RATIO = 16.0
CONFIGS = {"LoRA r=8": None, "LoRA+ r=8": RATIO}
GRIDS = {"LoRA r=8": LORA_LRS, "LoRA+ r=8": LORAPLUS_LRS}


def tasks(seeds: Iterable[int]) -> list[dict[str, Any]]:
    return [
        {"config": name, "lr": lr, "seed": seed}
        for seed in seeds
        for name in CONFIGS
        for lr in GRIDS[name]
    ]


def run(task: dict[str, Any]) -> dict[str, Any]:
    from lightning_lowrank import LoRA, LowRankCallback

    ratio = CONFIGS[task["config"]]

    def callbacks() -> list[Any]:
        lora = LoRA(rank=8, alpha=16.0)
        return [
            LowRankCallback(
                lora, target_modules=TARGET, train_modules=["classifier"], lr_ratio=ratio
            )
        ]

    result = finetune(
        data="fortunes",
        seed=task["seed"],
        steps=STEPS,
        lr=task["lr"],
        batch_size=BATCH,
        max_length=MAX_LENGTH,
        accelerator=task["accelerator"],
        callbacks_for=callbacks,
        eval_every=EVAL_EVERY,
    )
    return {**{k: task[k] for k in ("config", "lr", "seed")}, "lr_ratio": ratio, **result}


STUDY = Study(
    name="loraplus",
    title="LoRA+ vs LoRA",
    tasks=tasks,
    run=run,
    key=("config", "lr", "seed"),
    meta={
        "data": "fortunes",
        "steps": STEPS,
        "batch_size": BATCH,
        "max_length": MAX_LENGTH,
        "eval_every": EVAL_EVERY,
        "lr_ratio": RATIO,
        "learning_rates": {k: list(v) for k, v in GRIDS.items()},
    },
)

if __name__ == "__main__":
    from benchmarks.study_common import main

    main(studies=["loraplus"])
