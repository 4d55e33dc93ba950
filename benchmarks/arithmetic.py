"""How far below the floor's cost an adapter's own arithmetic lets a training step go.

Two numbers, combined into a lower bound on ``step / floor`` for each method:

- the adapter's multiply-adds per training step (forward, input gradient and its parameters'
  gradients), as a fraction of the adapted layers' own base matmuls (forward and input gradient),
  counted from the layers' shapes and the order of evaluation this library uses;
- the share of the floor's time spent in those base matmuls, MEASURED: the adapted layers alone,
  on inputs of the batch's size, against the whole floor step, interleaved.

If the adapter ran at the base matmuls' speed and everything else were free, a step would cost
``1 + share * fraction`` floors. A target below that bound cannot be met by a faster
implementation of the same arithmetic, only by doing less of it.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import Runner, floor_step_fn, fresh_copy, median, time_interleaved
from lightning_lowrank.inject import adapter_layers
from lightning_lowrank.methods.vera import VeRALayer, vera_prefers_dense


def adapter_multiply_adds(layer: nn.Module, tokens: int) -> int:
    """Multiply-adds one training step of ``tokens`` rows spends in ``layer``'s adapter, beyond
    its base matmuls, in the order this library evaluates it."""
    out, inp = layer.out_features, layer.in_features
    if isinstance(layer, VeRALayer):
        r = layer.vera_lambda_d.numel()
        factored = 2 * tokens * r * (inp + out)
        dense = out * r * inp + tokens * r * (inp + out) + 2 * out * r  # + d's and b's gradients
        return dense if vera_prefers_dense(tokens, out, inp) else factored
    if hasattr(layer, "direction_factors"):  # DoRA: the delta under the magnitude
        r = layer.direction_factors()[1].shape[0]
    elif layer.low_rank_factors() is not None:  # LoRA, SingLoRA
        r = layer.low_rank_factors()[1].shape[0]
    else:  # AdaLoRA: Q is (r, in)
        r = layer.lora_A.shape[0]
    # forward x A^T and (.) B^T; backward g B, (.) A, and the gradients of A and B
    count = 3 * tokens * r * (inp + out)
    if hasattr(layer, "magnitude"):  # DoRA's row norm: W0 A^T and B (A A^T)
        count += out * inp * r + inp * r * r + out * r * r
    return count


def base_multiply_adds(model: nn.Module, tokens: int) -> int:
    """The adapted layers' base matmuls per step: forward and input gradient."""
    return sum(
        2 * tokens * la.out_features * la.in_features for la in adapter_layers(model).values()
    )


def linear_share(
    base: nn.Module, adapted: nn.Module, batch: dict, reps: int, clock=time.process_time
) -> dict[str, Any]:
    """Measured share of the floor step spent in the adapted layers' base matmuls."""
    tokens = batch["input_ids"].numel()
    weights = [(la.base.weight, la.base.bias) for la in adapter_layers(adapted).values()]
    inputs = [torch.randn(tokens, w.shape[1], requires_grad=True) for w, _ in weights]
    grads = [torch.randn(tokens, w.shape[0]) for w, _ in weights]

    def linears() -> None:
        for (w, b), x, g in zip(weights, inputs, grads, strict=True):
            torch.autograd.grad(F.linear(x, w, b), x, g)

    floor_model = fresh_copy(base)
    runners = [
        Runner("floor", floor_model, floor_step_fn(floor_model, batch)),
        Runner("linears", adapted, linears),
    ]
    times = time_interleaved(runners, reps=reps, steps=1, log=lambda _: None, clock=clock)
    shares = [lin / flo for lin, flo in zip(times["linears"], times["floor"], strict=True)]
    return {"share": median(shares), "share_min": min(shares), "share_max": max(shares)}


def arithmetic_block(base: nn.Module, models: dict[str, nn.Module], batch: dict, reps: int) -> dict:
    """The ``arithmetic`` entry of ``speed.json``: per method, the adapter's multiply-adds as a
    fraction of the base matmuls, and the lower bound ``1 + share * fraction``."""
    tokens = batch["input_ids"].numel()
    any_model = next(iter(models.values()))
    block: dict[str, Any] = linear_share(base, any_model, batch, reps)
    block["how"] = (
        "adapter multiply-adds per step (forward, input and parameter gradients) over the adapted "
        "layers' base multiply-adds (forward and input gradient), counted from shapes; share: "
        "measured time of those base matmuls alone over the floor step"
    )
    block["methods"] = {}
    for name, model in models.items():
        extra = sum(adapter_multiply_adds(la, tokens) for la in adapter_layers(model).values())
        fraction = extra / base_multiply_adds(model, tokens)
        block["methods"][name] = {
            "fraction": fraction,
            "bound": 1 + block["share"] * fraction,
        }
    return block
