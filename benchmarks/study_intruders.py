"""Reproduction study: intruder dimensions of LoRA r=1, r=8, rsLoRA r=64 (alpha = 2r) and full
fine-tuning (Shuttleworth et al. 2024, arXiv 2410.21228), at small scale.

MiniLM is fine-tuned on BBC News (5 topics) for a short run; then, for each of the 36 encoder linear
layers, the intruder dimensions of the fine-tuned weight against the pre-trained one are counted
(k = 10, epsilon swept), with the validation accuracy. LoRA runs also log the counts during training
(``AdapterMonitor``). Results go to ``benchmarks/results/study_intruders.json``, one record per
(config, seed), written after every run so a partial study is still usable.

    python -m benchmarks.study_intruders --steps 150 --seeds 0 1 2

Not in CI: minutes per run on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.common import TARGET  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "study_intruders.json"
EPSILONS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

#: name -> (method kwargs or None for full fine-tuning, learning rate)
CONFIGS: dict[str, tuple[dict[str, Any] | None, float]] = {
    "LoRA r=1": ({"rank": 1, "alpha": 2.0}, 1e-3),
    "LoRA r=8": ({"rank": 8, "alpha": 16.0}, 1e-3),
    "rsLoRA r=64": ({"rank": 64, "alpha": 128.0, "scaling": "rslora"}, 1e-3),
    "full fine-tuning": (None, 5e-5),
}


def _linear_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The (out, in) weights of the study's 36 layers, by their name in the plain model."""
    import re

    return {
        n: m.weight.detach().clone()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and re.fullmatch(TARGET, n)
    }


def run_one(name: str, seed: int, steps: int, max_length: int, batch_size: int) -> dict[str, Any]:
    import lightning.pytorch as pl

    from lightning_lowrank import AdapterMonitor, LoRA, LowRankCallback
    from lightning_lowrank.analysis import adapted_weights, effective_rank, intruder_dimensions
    from lightning_lowrank.demos import BBCNewsDataModule, TextClassifier, load_minilm_classifier
    from lightning_lowrank.inject import adapter_layers

    method_kwargs, lr = CONFIGS[name]
    pl.seed_everything(seed, verbose=False)
    model, tokenizer = load_minilm_classifier(5, seed=seed)
    w0 = _linear_weights(model)
    data = BBCNewsDataModule(
        tokenizer, batch_size=batch_size, max_length=max_length, seed=seed, limit_eval=200
    )
    module = TextClassifier(model, lr=lr, weight_decay=0.0, warmup_steps=10)
    callbacks: list[pl.Callback] = []
    monitor = None
    if method_kwargs is not None:
        callbacks.append(
            LowRankCallback(
                LoRA(**method_kwargs), target_modules=TARGET, train_modules=["classifier"]
            )
        )
        monitor = AdapterMonitor(every_n_steps=max(steps // 6, 1), k=10, epsilon=0.5)
        callbacks.append(monitor)
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=callbacks,
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
    seconds = time.perf_counter() - started
    val_acc = float(trainer.callback_metrics["val_acc"])

    # fine-tuned W against pre-trained W0, layer by layer
    if method_kwargs is not None:
        pairs = {
            n.removeprefix("model."): adapted_weights(layer)
            for n, layer in adapter_layers(module).items()
        }
        deltas = {
            n.removeprefix("model."): layer.delta_weight().detach()
            for n, layer in adapter_layers(module).items()
        }
    else:
        w = _linear_weights(model)
        pairs = {n: (w0[n], w[n]) for n in w0}
        deltas = {n: w[n] - w0[n] for n in w0}
    per_eps = {str(e): 0 for e in EPSILONS}
    per_layer = {}
    for layer_name, (a, b) in pairs.items():
        res = intruder_dimensions(a, b, k=10, epsilon=1.0)  # similarities once, thresholds below
        per_layer[layer_name] = [round(float(s), 4) for s in res.similarities]
        for e in EPSILONS:
            per_eps[str(e)] += int((res.similarities < e).sum())
    ranks = [effective_rank(d) for d in deltas.values()]
    record = {
        "config": name,
        "seed": seed,
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "max_length": max_length,
        "val_acc": val_acc,
        "train_seconds": round(seconds, 1),
        "layers": len(pairs),
        "intruders_by_epsilon": per_eps,
        "mean_delta_effective_rank": sum(ranks) / len(ranks),
        "similarities": per_layer,
        "during_training": [
            {"step": h["step"], "intruders": sum(h["intruders"].values())} for h in monitor.history
        ]
        if monitor is not None
        else [],
    }
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    records = json.loads(args.out.read_text())["runs"] if args.out.exists() else []
    for seed in args.seeds:  # seed-major: after one seed every config has a result
        for name in args.configs:
            records = [r for r in records if not (r["config"] == name and r["seed"] == seed)]
            rec = run_one(name, seed, args.steps, args.max_length, args.batch_size)
            records.append(rec)
            print(
                f"{name} seed {seed}: val_acc {rec['val_acc']:.3f}, intruders(eps=0.5) "
                f"{rec['intruders_by_epsilon']['0.5']} over {rec['layers']} layers, "
                f"{rec['train_seconds']} s",
                flush=True,
            )
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(
                json.dumps(
                    {
                        "study": "intruder dimensions",
                        "command": "python -m benchmarks.study_intruders "
                        + f"--steps {args.steps} --seeds {' '.join(map(str, args.seeds))}",
                        "epsilons": EPSILONS,
                        "k": 10,
                        "runs": records,
                    },
                    indent=1,
                )
                + "\n"
            )


if __name__ == "__main__":
    main()
