"""LoRA math in float64: the layer computes base + x @ dW.T with dW = s * B @ A."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_lowrank import LoRA, adapter_layers, inject
from lightning_lowrank.methods.lora import LoRALayer
from tests.conftest import tiny_gpt2


def _perturb(layer: LoRALayer) -> None:
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()


@pytest.mark.parametrize("scaling", ["standard", "rslora"])
def test_linear_output_equals_base_plus_dense_delta(scaling):
    torch.manual_seed(0)
    base = nn.Linear(7, 5).double()
    layer = LoRALayer(base, LoRA(rank=3, alpha=6.0, scaling=scaling))
    x = torch.randn(4, 2, 7, dtype=torch.float64)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)  # B = 0 at init
    _perturb(layer)
    s = 6.0 / 3 if scaling == "standard" else 6.0 / math.sqrt(3)
    dw = s * layer.lora_B.detach() @ layer.lora_A.detach()  # built independently of the layer
    expected = x @ (base.weight + dw).T + base.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.delta_weight(), dw, rtol=1e-12, atol=1e-12)


def test_init_a_is_kaiming_uniform_and_b_zero():
    torch.manual_seed(0)
    layer = LoRALayer(nn.Linear(400, 300), LoRA(rank=64))
    bound = 1 / math.sqrt(
        400
    )  # kaiming_uniform with a=sqrt(5): gain*sqrt(3/fan_in) = 1/sqrt(fan_in)
    assert layer.lora_A.abs().max() <= bound
    assert layer.lora_A.abs().max() > 0.95 * bound
    assert torch.count_nonzero(layer.lora_B) == 0


def test_conv1d_transposed_weight():
    model = tiny_gpt2().double()
    conv = model.transformer.h[0].attn.c_attn  # Conv1D: weight is (in, out)
    layer = LoRALayer(conv, LoRA(rank=2, alpha=4.0))
    assert (layer.in_features, layer.out_features) == (16, 48)
    _perturb(layer)
    x = torch.randn(3, 16, dtype=torch.float64)
    dw = 2.0 * layer.lora_B.detach() @ layer.lora_A.detach()  # (out, in)
    expected = x @ (conv.weight.T + dw).T + conv.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_embedding():
    torch.manual_seed(0)
    base = nn.Embedding(11, 6, padding_idx=0).double()
    layer = LoRALayer(base, LoRA(rank=2, alpha=2.0))
    ids = torch.tensor([[0, 3, 10], [5, 5, 1]])
    torch.testing.assert_close(layer(ids), base(ids), rtol=0, atol=0)  # A = 0 at init
    _perturb(layer)
    dw = layer.lora_B.detach() @ layer.lora_A.detach()  # (dim, num): column j is token j's delta
    expected = (base.weight + dw.T)[ids]
    torch.testing.assert_close(layer(ids), expected, rtol=1e-12, atol=1e-12)


def test_dropout_applies_to_adapter_input_only():
    torch.manual_seed(0)
    base = nn.Linear(8, 8).double()
    layer = LoRALayer(base, LoRA(rank=2, dropout=0.5))
    _perturb(layer)
    x = torch.randn(64, 8, dtype=torch.float64)
    layer.train()
    torch.manual_seed(1)
    out = layer(x)
    torch.manual_seed(1)
    mask_x = nn.functional.dropout(x, 0.5, training=True)
    expected = base(x) + mask_x @ layer.delta_weight().T.detach()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    layer.eval()
    torch.testing.assert_close(
        layer(x), base(x) + x @ layer.delta_weight().T, rtol=1e-12, atol=1e-12
    )


def test_lora_fa_freezes_a(mlp):
    inject(mlp, LoRA(rank=2, train_a=False), target_modules=["fc1", "fc2"])
    for layer in adapter_layers(mlp).values():
        assert not layer.lora_A.requires_grad
        assert layer.lora_B.requires_grad
        assert layer.param_sides() == {"lora_B": "B"}
    trainable = sum(p.numel() for p in mlp.parameters() if p.requires_grad)
    assert trainable == 16 * 2 + 12 * 2  # only B: (out, r) per layer


def test_forward_never_builds_the_dense_delta(monkeypatch):
    layer = LoRALayer(nn.Linear(8, 8), LoRA(rank=2))

    def boom(self):
        raise AssertionError("forward built the dense delta")

    monkeypatch.setattr(LoRALayer, "delta_weight", boom)
    layer(torch.randn(3, 8)).sum().backward()


def test_config_validation():
    with pytest.raises(ValueError, match="scaling"):
        LoRA(scaling="sqrt")
    with pytest.raises(ValueError, match="dropout"):
        LoRA(dropout=1.0)
