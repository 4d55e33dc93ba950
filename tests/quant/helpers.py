"""Shared pieces of the quantized-base tests: method configs, a dense twin of a quantized model
(the same adapters over the dequantized weights), random adapters and loss gradients."""

from __future__ import annotations

import torch
from torch import nn

from lightning_lowrank import (
    AdaLoRA,
    DoRA,
    LoRA,
    SingLoRA,
    SLTrain,
    VeRA,
    adapter_layers,
    inject,
    set_step,
)
from lightning_lowrank.quant import dequantize
from tests.conftest import tiny_llama

METHODS = {
    "lora": lambda: LoRA(rank=4, alpha=8.0),
    "rslora": lambda: LoRA(rank=4, alpha=8.0, scaling="rslora"),
    "lora-fa": lambda: LoRA(rank=4, train_a=False),
    "dora": lambda: DoRA(rank=4),
    "dora-singlora": lambda: DoRA(rank=2, delta="singlora", ramp_steps=4),
    "vera": lambda: VeRA(rank=8),
    "singlora": lambda: SingLoRA(rank=4, ramp_steps=10),
    "adalora": lambda: AdaLoRA(init_rank=6, target_rank=4, total_steps=100),
    "sltrain": lambda: SLTrain(rank=4, density=0.1),
}
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def llama() -> nn.Module:
    """The tests' tiny Llama, wide enough to quantize: bitsandbytes takes layers whose
    in_features is a multiple of 32 (q/v/up: 32 inputs, blocks of 32; down: 64, blocks of 64)."""
    return tiny_llama(hidden_size=32, intermediate_size=64)


def ids(batch: int = 2, length: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomise(model: nn.Module, seed: int = 1) -> None:
    """Random values for every trainable adapter parameter (B = 0 at init hides mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for name, p in layer.named_parameters():
                if p.requires_grad and not name.startswith("base."):
                    p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device))
    set_step(model, 5)  # SingLoRA's ramp: u(5) > 0


def quantized(name: str, **kwargs) -> nn.Module:
    model = llama()
    torch.manual_seed(0)
    inject(model, METHODS[name](), target_modules=TARGETS, quantize_base="nf4", **kwargs)
    return model


def dense_twin(model: nn.Module, name: str) -> nn.Module:
    """A dense tiny Llama whose adapted weights are ``model``'s dequantized bases, with the same
    method injected and ``model``'s adapter state copied in."""
    twin = llama()
    layers = adapter_layers(model)
    with torch.no_grad():
        for n, layer in layers.items():
            twin.get_submodule(n).weight.copy_(dequantize(layer.base, torch.float32))
    torch.manual_seed(0)
    inject(twin, METHODS[name](), target_modules=TARGETS)
    with torch.no_grad():
        for n, layer in adapter_layers(twin).items():
            state = layer.adapter_state_dict()
            for key, value in layers[n].adapter_state_dict().items():
                state[key].copy_(value)
    set_step(twin, 5)
    return twin


def loss_and_grads(model: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    logits = model(input_ids=tokens).logits
    logits.pow(2).mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads
