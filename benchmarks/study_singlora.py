"""Reproduction study: SingLoRA vs LoRA (Bensaid et al. 2025) on Debian fortunes topics.

Claims checked: accuracy at equal rank and at about equal trainable parameters, and a flatter
response to the learning rate (the paper reports a spread of about 1 % for SingLoRA against about
5 % for LoRA). MiniLM is fine-tuned on the fortunes topic-classification task (39 topics: harder
than BBC News, so methods separate) for every (config, learning rate, seed).

The rates cover the region between a good rate and collapse, in steps of about sqrt(2), so that
2x any of the three lower rates is on the grid; the classifier head trains at the fixed
``HEAD_LR`` whatever the adapter's rate, so the sweep measures the adapter alone. Metrics (see
``benchmarks.render_study.singlora``): the accuracy drop from the best rate to 2x the best rate,
and the width of the band of rates within ``BAND`` of the best accuracy (in factors of 2).

    python -m benchmarks.study --studies singlora

Configs: LoRA r=8, SingLoRA r=8 (equal rank: half of LoRA's parameters on square layers) and
SingLoRA r=16 (about LoRA r=8's parameters).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from benchmarks.common import TARGET
from benchmarks.study_common import Study, finetune, quick

LEARNING_RATES = (5e-4, 1e-3, 1.4e-3, 2e-3, 2.8e-3)
#: the classifier head's learning rate in every run
HEAD_LR = 1e-3
#: the accuracy band (absolute) around the best rate whose width in rates is the second metric
BAND = 0.02
STEPS, BATCH, MAX_LENGTH = (4, 4, 32) if quick() else (1000, 32, 64)

#: name -> (config class name, kwargs)
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "LoRA r=8": ("LoRA", {"rank": 8, "alpha": 16.0}),
    "SingLoRA r=8": ("SingLoRA", {"rank": 8, "alpha": 16.0, "ramp_steps": 100}),
    "SingLoRA r=16": ("SingLoRA", {"rank": 16, "alpha": 32.0, "ramp_steps": 100}),
}


def tasks(seeds: Iterable[int]) -> list[dict[str, Any]]:
    return [
        {"config": name, "lr": lr, "seed": seed}
        for seed in seeds
        for lr in LEARNING_RATES
        for name in CONFIGS
    ]


def run(task: dict[str, Any]) -> dict[str, Any]:
    import lightning_lowrank
    from lightning_lowrank import LowRankCallback

    cls_name, kwargs = CONFIGS[task["config"]]

    def callbacks() -> list[Any]:
        method = getattr(lightning_lowrank, cls_name)(**kwargs)
        return [LowRankCallback(method, target_modules=TARGET, train_modules=["classifier"])]

    result = finetune(
        data="fortunes",
        seed=task["seed"],
        steps=STEPS,
        lr=task["lr"],
        batch_size=BATCH,
        max_length=MAX_LENGTH,
        accelerator=task["accelerator"],
        callbacks_for=callbacks,
        head_lr=HEAD_LR,
    )
    return {
        "config": task["config"],
        "lr": task["lr"],
        "seed": task["seed"],
        "head_lr": HEAD_LR,
        **result,
    }


STUDY = Study(
    name="singlora",
    title="SingLoRA vs LoRA",
    tasks=tasks,
    run=run,
    key=("config", "lr", "seed"),
    meta={
        "data": "fortunes",
        "steps": STEPS,
        "batch_size": BATCH,
        "max_length": MAX_LENGTH,
        "learning_rates": LEARNING_RATES,
        "head_lr": HEAD_LR,
        "band": BAND,
    },
)

if __name__ == "__main__":
    from benchmarks.study_common import main

    main(studies=["singlora"])
