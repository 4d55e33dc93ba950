"""LoRA's fused forward (one addmm into the base output) equals the generic adapter path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_lowrank.methods.lora import LoRA, LoRALayer


def _layer(bias: bool, train_a: bool = True, dtype=torch.float64) -> LoRALayer:
    torch.manual_seed(0)
    base = nn.Linear(6, 10, bias=bias).to(dtype)
    base.requires_grad_(False)
    layer = LoRALayer(base, LoRA(rank=3, alpha=5.0, train_a=train_a))
    with torch.no_grad():
        layer.lora_B.normal_()  # B = 0 at init would hide a wrong B path
    return layer


def _run(layer: LoRALayer, x: torch.Tensor, generic: bool):
    layer.zero_grad()
    x = x.clone().requires_grad_(True)
    if generic:
        out = layer.base(x) + layer.adapter_forward(x)
    else:
        out = layer(x)
    (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum().backward()
    grads = [p.grad.clone() for p in (layer.lora_A, layer.lora_B) if p.grad is not None]
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("train_a", [True, False])
@pytest.mark.parametrize("shape", [(4, 6), (2, 5, 6), (6,)])
def test_fused_forward_and_gradients_equal_the_generic_path(bias, train_a, shape):
    layer = _layer(bias, train_a)
    zero = torch.zeros(6, dtype=torch.float64)
    assert layer._fusable(zero, zero)
    x = torch.randn(*shape, dtype=torch.float64)
    out_f, gx_f, g_f = _run(layer, x, generic=False)
    out_g, gx_g, g_g = _run(layer, x, generic=True)
    assert out_f.shape == out_g.shape == (*shape[:-1], 10)
    torch.testing.assert_close(out_f, out_g, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx_f, gx_g, rtol=1e-12, atol=1e-12)
    assert len(g_f) == len(g_g) == (2 if train_a else 1)
    for a, b in zip(g_f, g_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # and both are the formula: base(x) + s * x A^T B^T
    expected = layer.base(x) + layer.scale * x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(out_f, expected.detach(), rtol=1e-12, atol=1e-12)


def test_generic_path_when_merged_or_mixed_dtype():
    layer = _layer(True)
    x = torch.randn(3, 6, dtype=torch.float64)
    before = layer(x).detach()
    layer.merge()
    torch.testing.assert_close(layer(x), before, rtol=1e-10, atol=1e-10)
    layer.unmerge()
    assert not layer._fusable(x.float(), before)  # a float32 input to a float64 layer
    assert not layer._fusable(x, before.float())  # a float32 base output (autocast)


def test_base_forward_hooks_still_fire():
    # LoRA-drop reads the base output through a hook on the base layer
    layer = _layer(True)
    seen = []
    layer.base.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    x = torch.randn(2, 6, dtype=torch.float64)
    out = layer(x)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], layer.base(x))
    assert not torch.allclose(out, seen[0])  # the hook saw the base output, not the sum
