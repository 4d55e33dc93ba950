"""Shared pieces of the benchmarks: the model, the batch, the adapted layers and the step functions.

The setting is fixed by the issue: all-MiniLM-L6-v2 as a 5-way sequence classifier, a batch of 16
sequences of 64 tokens, AdamW, CPU. The batch holds random token ids with a full attention mask:
the cost of a step does not depend on the words. Every adapter (this library's and PEFT's) goes on
the same 36 layers: query, key, value and the three dense layers of each of the 6 encoder blocks
(the pooler and the classifier head stay frozen, as does everything else).
"""

from __future__ import annotations

import copy
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

#: the adapted layers, as one regular expression understood by both libraries (full match)
TARGET = r".*encoder\.layer\.\d+\..*(query|key|value|dense)"
BATCH, SEQ, NUM_LABELS = 16, 64, 5
LR = 1e-4


def load_base() -> nn.Module:
    """MiniLM as a 5-way classifier, everything frozen (adapters unfreeze their own parameters)."""
    from lightning_lowrank.demos import load_minilm_classifier

    model, _ = load_minilm_classifier(NUM_LABELS, seed=0)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def make_batch(seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(1000, 30000, (BATCH, SEQ), generator=g),
        "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long),
        "labels": torch.randint(0, NUM_LABELS, (BATCH,), generator=g),
    }


def loss_of(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    # labels go through the model so that PEFT adds what it adds to `.loss` (AdaLoRA's
    # orthogonality term); for this library the loss is the same cross entropy
    return model(**batch).loss


@dataclass
class Runner:
    """One benchmarked variant: a model and a function doing one training step on it."""

    name: str
    model: nn.Module
    step: Callable[[], None]
    info: dict[str, Any] = field(default_factory=dict)


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    # foreach is torch's default on CPU too; fixed here so both libraries get the same kernel
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.01, foreach=True)


def training_step_fn(
    model: nn.Module,
    batch: dict[str, Tensor],
    before_step: Callable[[int], None] | None = None,
    after_step: Callable[[int], None] | None = None,
) -> Callable[[], None]:
    """A closure doing forward, backward, (hooks,) AdamW step and zero_grad on ``batch``."""
    opt = adamw(model)
    counter = [0]

    def step() -> None:
        loss = loss_of(model, batch)
        loss.backward()
        if before_step is not None:
            before_step(counter[0])
        opt.step()
        counter[0] += 1
        if after_step is not None:
            after_step(counter[0])
        opt.zero_grad(set_to_none=True)

    return step


def floor_step_fn(model: nn.Module, batch: dict[str, Tensor]) -> Callable[[], None]:
    """The floor: the frozen model, forward and backward with the gradient flowing to the output
    of the embedding layer (so through every encoder block, as it must for any adapter), no
    parameter gradients and no optimizer. No adapter can be cheaper than this."""
    emb = model.bert.embeddings

    def _needs_grad(_module: nn.Module, _inputs: Any, out: Tensor) -> Tensor:
        return out.detach().requires_grad_(True)

    emb.register_forward_hook(_needs_grad)

    def step() -> None:
        loss_of(model, batch).backward()

    return step


def fresh_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


#: untimed steps of every runner before the first round (allocator, caches, AdamW state)
WARMUP_STEPS = 3


def round_order(names: list[str], rep: int, seed: int = 0) -> list[str]:
    """The order of round ``rep``: a permutation of ``names`` drawn from ``(seed, rep)``, so a
    variant is not always timed right after the same other one, and a run is repeatable."""
    order = list(names)
    random.Random(f"{seed}:{rep}").shuffle(order)
    return order


def time_interleaved(
    runners: list[Runner],
    reps: int,
    steps: int,
    warmup: int = WARMUP_STEPS,
    log: Callable[[str], None] = print,
    clock: Callable[[], float] = time.perf_counter,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Seconds per step of every runner, ``reps`` rounds of ``steps`` steps each.

    Each round runs every runner once, in an order shuffled anew each round
    (:func:`round_order`), so slow phases of a shared machine and the cache state left by the
    previous variant hit all runners alike. Returns the per-step times of each round. ``clock`` is
    wall time by default; ``time.process_time`` (CPU time of this process) is far less sensitive
    to other processes competing for the cores when torch runs on one thread.
    """
    for r in runners:
        for _ in range(warmup):
            r.step()
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    by_name = {r.name: r for r in runners}
    for rep in range(reps):
        order = [by_name[n] for n in round_order(list(by_name), rep, seed)]
        for r in order:
            t0 = clock()
            for _ in range(steps):
                r.step()
            times[r.name].append((clock() - t0) / steps)
        log(
            f"  round {rep + 1}/{reps}: " + ", ".join(f"{n} {t[-1]:.3f}s" for n, t in times.items())
        )
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)
