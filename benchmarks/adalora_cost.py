"""AdaLoRA allocator cost per optimizer step, as a fraction of a MiniLM training step.

One process, interleaved repetitions: a training step (forward, backward, AdamW step) on a BBC News
batch, then the allocator's per-step work on the gradients that step left (the orthogonality
gradient, the importance EMAs) and, every ``delta_t`` steps, the global masking. Medians are
reported; the amortised cost is ``orth + importance + masking / delta_t``.

Times are the process's CPU time (torch on one thread by default). Writes
``benchmarks/results/adalora_cost.json`` (with the commit, device and library versions) and the
table of ``docs/concepts/adalora.md`` between its ``adalora-cost`` markers.

Run: ``python -m benchmarks.adalora_cost [--reps 20] [--threads 1]``; ``--render`` only rewrites
the table from the JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.page_table import publish, write_between
from benchmarks.provenance import code_since, commit_phrase, provenance

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "adalora_cost.json"
PAGE = ROOT / "docs" / "concepts" / "adalora.md"


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument("--render", action="store_true", help="only rewrite the docs table")
    args = parser.parse_args(argv)
    if args.render:
        result = json.loads(args.out.read_text())
        render(result)
        return result
    torch.set_num_threads(args.threads)

    import torch.nn.functional as F

    from lightning_lowrank import AdaLoRA, RankAllocator, adapter_layers, inject
    from lightning_lowrank.demos import BBCNewsDataModule, load_minilm_classifier
    from lightning_lowrank.schedules.adalora import add_orthogonality_grad

    model, tokenizer = load_minilm_classifier(num_labels=5)
    data = BBCNewsDataModule(
        tokenizer, batch_size=args.batch_size, max_length=args.max_length, limit_train=64
    )
    batch = next(iter(data.train_dataloader()))
    cfg = AdaLoRA(init_rank=12, target_rank=8, t_init=5, t_final=5, delta_t=10, total_steps=1000)
    inject(model, cfg, target_modules="all-linear", train_modules=["classifier"])
    layers = adapter_layers(model)
    alloc = RankAllocator(cfg)
    alloc.setup(model, layers, cfg.total_steps)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def clock(fn) -> float:
        start = time.process_time()
        fn()
        return time.process_time() - start

    def train_step() -> None:
        opt.zero_grad()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        F.cross_entropy(logits, batch["labels"]).backward()
        opt.step()

    times: dict[str, list[float]] = {"train": [], "orth": [], "importance": [], "mask": []}
    for rep in range(args.reps + 2):
        t_train = clock(train_step)
        t_orth = clock(lambda: add_orthogonality_grad(layers, cfg.orth_reg))
        t_ipt = clock(lambda: alloc.update_importance(layers))
        t_mask = clock(lambda: alloc.mask_to_budget(layers, alloc.initial_budget - 8))
        if rep >= 2:  # warm-up
            for key, value in zip(times, (t_train, t_orth, t_ipt, t_mask), strict=True):
                times[key].append(value)
    med = {k: statistics.median(v) for k, v in times.items()}
    per_step = med["orth"] + med["importance"] + med["mask"] / cfg.delta_t
    result = {
        **{f"{k}_ms": 1000 * v for k, v in med.items()},
        "allocator_per_step_ms": 1000 * per_step,
        "fraction_amortised": per_step / med["train"],
        "fraction_masking_step": (med["orth"] + med["importance"] + med["mask"]) / med["train"],
        "layers": len(layers),
        "rank": cfg.init_rank,
        "delta_t": cfg.delta_t,
        "batch": [args.batch_size, args.max_length],
        "threads": args.threads,
        "reps": args.reps,
        "clock": "process CPU time",
        **provenance(f"CPU, torch threads {args.threads}"),
    }
    print(table(result))
    publish(result, args.out, RESULT, render)
    return result


def table(r: dict) -> str:
    """The page's table: the allocator's work per step against a training step."""
    batch, length = r["batch"]
    return "\n".join(
        [
            f"MiniLM, {r['layers']} AdaLoRA layers (r = {r['rank']}), batch {batch} x {length} "
            f"tokens, AdamW, {r['threads']} CPU thread(s), {r['clock']}, median of {r['reps']} "
            f"repetitions ({commit_phrase(r)}, torch {r['versions']['torch']}). "
            + code_since(r.get("commit")),
            "",
            "| | per step |",
            "|---|---|",
            f"| training step | {r['train_ms']:.0f} ms |",
            f"| orthogonality gradient | {r['orth_ms']:.2f} ms |",
            f"| importance EMAs | {r['importance_ms']:.2f} ms |",
            f"| global masking (every {r['delta_t']} steps) | {r['mask_ms']:.2f} ms |",
            f"| allocator, amortised | {r['allocator_per_step_ms']:.2f} ms = "
            f"{r['fraction_amortised']:.1%} of a training step |",
            f"| allocator, on a masking step | {r['fraction_masking_step']:.1%} of a training "
            "step |",
        ]
    )


def render(result: dict) -> None:
    generator = "python -m benchmarks.adalora_cost (benchmarks/results/adalora_cost.json)"
    write_between(PAGE, "adalora-cost", generator, table(result))


if __name__ == "__main__":
    main()
