"""Reproduction study: SingLoRA vs LoRA (Bensaid et al. 2025) on Debian fortunes topics.

Claims checked: accuracy at equal rank and at equal trainable parameters, and the spread of accuracy
across 5 learning rates (the paper reports about 1 % for SingLoRA against about 5 % for LoRA).
MiniLM is fine-tuned on the fortunes topic-classification task (harder than BBC News, so methods
separate) for every (config, learning rate, seed); the validation accuracy of each run goes to
``benchmarks/results/study_singlora.json``, written after every run.

    python -m benchmarks.study_singlora --steps 300 --seeds 0 1 2

Configs: LoRA r=8, SingLoRA r=8 (equal rank: half of LoRA's parameters on square layers) and
SingLoRA r=16 (about LoRA r=8's parameters). Not in CI: hours on a CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import TARGET

RESULTS = Path(__file__).parent / "results" / "study_singlora.json"
LEARNING_RATES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)

#: name -> (config class name, kwargs)
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "LoRA r=8": ("LoRA", {"rank": 8, "alpha": 16.0}),
    "SingLoRA r=8": ("SingLoRA", {"rank": 8, "alpha": 16.0, "ramp_steps": 100}),
    "SingLoRA r=16": ("SingLoRA", {"rank": 16, "alpha": 32.0, "ramp_steps": 100}),
}


def run_one(name: str, lr: float, seed: int, steps: int, batch_size: int) -> dict[str, Any]:
    import lightning.pytorch as pl

    import lightning_lowrank
    from lightning_lowrank import LowRankCallback
    from lightning_lowrank.demos import (
        FortunesDataModule,
        TextClassifier,
        count_parameters,
        load_minilm_classifier,
    )

    cls_name, kwargs = CONFIGS[name]
    method = getattr(lightning_lowrank, cls_name)(**kwargs)
    pl.seed_everything(seed, verbose=False)
    data = FortunesDataModule(batch_size=batch_size, seed=seed, limit_eval=400)
    model, _ = load_minilm_classifier(data.num_classes, seed=seed)
    module = TextClassifier(model, lr=lr, weight_decay=0.0, warmup_steps=20)
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=[LowRankCallback(method, target_modules=TARGET, train_modules=["classifier"])],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        val_check_interval=steps,
        check_val_every_n_epoch=None,
        accelerator="cpu",
    )
    started = time.perf_counter()
    trainer.fit(module, data)
    return {
        "config": name,
        "lr": lr,
        "seed": seed,
        "steps": steps,
        "val_acc": float(trainer.callback_metrics["val_acc"]),
        "trainable": count_parameters(module).trainable,
        "train_seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--lrs", type=float, nargs="+", default=list(LEARNING_RATES))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = json.loads(args.out.read_text())["runs"] if args.out.exists() else []
    for seed in args.seeds:
        for lr in args.lrs:
            for name in args.configs:
                runs = [r for r in runs if (r["config"], r["lr"], r["seed"]) != (name, lr, seed)]
                rec = run_one(name, lr, seed, args.steps, args.batch_size)
                runs.append(rec)
                print(f"{name} lr {lr:g} seed {seed}: val_acc {rec['val_acc']:.3f}", flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(
                    json.dumps(
                        {
                            "study": "SingLoRA vs LoRA",
                            "command": f"python -m benchmarks.study_singlora --steps {args.steps} "
                            f"--seeds {' '.join(map(str, args.seeds))}",
                            "runs": runs,
                        },
                        indent=1,
                    )
                    + "\n"
                )


if __name__ == "__main__":
    main()
