"""Reproduction study: SLTrain (Han et al. 2024) vs low-rank-only vs full-rank pre-training.

The paper claims that pre-training with sparse plus low-rank weights ``W = s BA + S`` reaches a
perplexity close to full-rank training while using much less memory, and clearly better than the
low-rank part alone. Here a byte-level Llama (vocabulary of 256 bytes) is pre-trained from scratch
on the text of the BBC News articles (90 % of the articles for training, 10 % held out), with the
same batches for every variant, and the held-out perplexity per byte is reported. Each variant
runs over its own learning-rate grid (``VARIANTS``; the paper's rates, 1e-3 for full rank and
3e-3 for the re-parametrised models, in the middle), and the page compares the variants each at
its best rate.

Memory is measured apart (``kind: "memory"`` tasks, one per variant): on a weight-dominated
configuration (``MEMORY_MODEL``: wide layers, short sequences, a small batch, where weights,
gradients and optimizer state are most of the memory, as in the paper's large models), the
static memory counted from the tensors (weights, gradients, AdamW state; see
``benchmarks.tensor_bytes``), the bytes saved for backward, and the measured peak (the GPU
allocator's peak, or the peak RSS increase on a CPU).

    python -m benchmarks.study --studies sltrain
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable
from typing import Any

import torch

from benchmarks.study_common import Study, quick

WIDTH, LAYERS, HEADS, SEQ = (32, 1, 4, 32) if quick() else (256, 6, 4, 256)
RANK, DENSITY, ALPHA = (4 if quick() else 64), 0.03, 32.0
STEPS, BATCH, WARMUP, EVAL_WINDOWS = (10, 4, 2, 8) if quick() else (2000, 32, 100, 256)
#: variant -> its learning-rate grid
VARIANTS = {
    "full rank": (3e-4, 1e-3, 3e-3),
    "low-rank": (1e-3, 3e-3, 1e-2),
    "SLTrain": (1e-3, 3e-3, 1e-2),
}
#: "SLTrain comes close to full rank": the 95 % interval of (SLTrain - full rank) held-out loss,
#: each at its best rate, must lie inside +/- this margin (nats per byte), stated before the runs
CLOSE_MARGIN = 0.05
#: the weight-dominated configuration of the memory tasks
MEMORY_MODEL = (
    {"width": 64, "layers": 1, "heads": 4, "seq": 8, "batch": 1, "rank": 4}
    if quick()
    else {"width": 1024, "layers": 4, "heads": 8, "seq": 32, "batch": 2, "rank": 256}
)
MEMORY_STEPS = 3


def corpus() -> tuple[torch.Tensor, torch.Tensor]:
    """(train bytes, held-out bytes) of the BBC News articles, split by article."""
    from lightning_lowrank.demos import load_bbc_news

    texts, _, _ = load_bbc_news()
    order = list(range(len(texts)))
    random.Random(0).shuffle(order)  # the same split for every seed and variant
    cut = int(0.9 * len(order))

    def encode(ids: list[int]) -> torch.Tensor:
        joined = "\n\n".join(texts[i] for i in ids).encode("utf-8")
        return torch.frombuffer(bytearray(joined), dtype=torch.uint8).long()

    return encode(order[:cut]), encode(order[cut:])


def make_model(
    variant: str,
    seed: int,
    width: int = WIDTH,
    layers: int = LAYERS,
    heads: int = HEADS,
    seq: int = SEQ,
    rank: int = RANK,
) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_lowrank import sltrain_pretrain

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=width,
        intermediate_size=int(width * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=seq,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    if variant == "low-rank":
        sltrain_pretrain(model, rank=rank, alpha=ALPHA, density=0.0, seed=seed)
    elif variant == "SLTrain":
        sltrain_pretrain(model, rank=rank, alpha=ALPHA, density=DENSITY, seed=seed)
    return model


def tasks(seeds: Iterable[int]) -> list[dict[str, Any]]:
    seeds = list(seeds)
    out = [
        {"config": v, "lr": lr, "seed": seed, "kind": "train"}
        for seed in seeds
        for v, lrs in VARIANTS.items()
        for lr in lrs
    ]
    # memory does not depend on the seed: one task per variant, with the first seed
    return out + [{"config": v, "lr": None, "seed": seeds[0], "kind": "memory"} for v in VARIANTS]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1])


def run_memory(task: dict[str, Any]) -> dict[str, Any]:
    """Static memory from the tensors, bytes saved for backward, and the measured peak, on
    ``MEMORY_MODEL`` (weights, gradients and AdamW state dominate there)."""
    from benchmarks.tensor_bytes import saved_tensor_bytes, static_bytes

    variant, seed = task["config"], task["seed"]
    m = MEMORY_MODEL
    use_gpu = task["accelerator"] in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    device = torch.device("cuda" if use_gpu else "cpu")
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (m["batch"], m["seq"]), generator=g).to(device)
    # one throwaway step first: imports, autograd and kernel set-up are not the variant's memory
    tiny = make_model(variant, seed, width=16, layers=1, heads=2, seq=8, rank=2).to(device)
    tiny(input_ids=x[:, :8], labels=x[:, :8]).loss.backward()
    del tiny
    from benchmarks.memory import _settle

    _settle()
    if use_gpu:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak RSS counter restarts here: weights are part of the peak
        before = _rss_kib("VmRSS") * 1024
    model = make_model(variant, seed, m["width"], m["layers"], m["heads"], m["seq"], m["rank"]).to(
        device
    )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    for _ in range(MEMORY_STEPS):
        opt.zero_grad(set_to_none=False)  # keep the gradients: they are counted below
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
    static = static_bytes(model, opt)
    saved = saved_tensor_bytes(lambda: model(input_ids=x, labels=x).loss)
    if use_gpu:
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = _rss_kib("VmHWM") * 1024 - before
    mib = 2**20
    return {
        "config": variant,
        "lr": None,
        "seed": seed,
        "kind": "memory",
        "memory_model": m,
        "weights_mib": round(static["weights"] / mib, 3),
        "gradients_mib": round(static["gradients"] / mib, 3),
        "optimizer_state_mib": round(static["optimizer_state"] / mib, 3),
        "static_mib": round(sum(static.values()) / mib, 3),
        "saved_for_backward_mib": round(saved / mib, 3),
        "peak_mib": round(peak / mib, 3),
        "peak_source": "GPU allocator" if use_gpu else "CPU peak RSS increase",
        "trainable": sum(p.numel() for p in params),
    }


def run(task: dict[str, Any]) -> dict[str, Any]:
    if task.get("kind") == "memory":
        return run_memory(task)
    variant, seed = task["config"], task["seed"]
    use_gpu = task["accelerator"] in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    device = torch.device("cuda" if use_gpu else "cpu")
    train, held_out = corpus()
    train, held_out = train.to(device), held_out.to(device)
    if use_gpu:
        torch.cuda.reset_peak_memory_stats()
    model = make_model(variant, seed).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    lr = task["lr"]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def schedule(t: int) -> float:  # linear warm-up, then cosine down to 10 %
        if t < WARMUP:
            return (t + 1) / WARMUP
        progress = (t - WARMUP) / max(1, STEPS - WARMUP)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    g = torch.Generator(device="cpu").manual_seed(1000 + seed)  # batches depend on the seed only
    eval_starts = torch.arange(EVAL_WINDOWS) * ((len(held_out) - SEQ - 1) // EVAL_WINDOWS)
    eval_x = torch.stack([held_out[s : s + SEQ] for s in eval_starts.tolist()])

    @torch.no_grad()
    def held_out_loss() -> float:
        model.eval()
        losses = [model(input_ids=x, labels=x).loss.item() for x in eval_x.split(64)]
        model.train()
        return sum(losses) / len(losses)

    curve = []
    started = time.perf_counter()
    for step in range(1, STEPS + 1):
        starts = torch.randint(0, len(train) - SEQ - 1, (BATCH,), generator=g).tolist()
        x = torch.stack([train[s : s + SEQ] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % (STEPS // 10) == 0:
            curve.append({"step": step, "val_loss": round(held_out_loss(), 5)})
    seconds = time.perf_counter() - started
    final = curve[-1]["val_loss"]
    record = {
        "config": variant,
        "seed": seed,
        "lr": lr,
        "kind": "train",
        "val_loss": final,
        "val_ppl": round(math.exp(final), 4),
        "bits_per_byte": round(final / math.log(2), 4),
        "curve": curve,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in params),
        "train_seconds": round(seconds, 1),
    }
    if use_gpu:
        record["peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return record


STUDY = Study(
    name="sltrain",
    title="SLTrain pre-training",
    tasks=tasks,
    run=run,
    key=("config", "lr", "seed", "kind"),
    meta={
        "data": "BBC News text, bytes",
        "model": {"width": WIDTH, "layers": LAYERS, "heads": HEADS, "seq": SEQ},
        "rank": RANK,
        "density": DENSITY,
        "alpha": ALPHA,
        "steps": STEPS,
        "batch_size": BATCH,
        "warmup": WARMUP,
        "learning_rates": {k: list(v) for k, v in VARIANTS.items()},
        "memory_model": MEMORY_MODEL,
        "close_margin": CLOSE_MARGIN,
    },
)

if __name__ == "__main__":
    from benchmarks.study_common import main

    main(studies=["sltrain"])
