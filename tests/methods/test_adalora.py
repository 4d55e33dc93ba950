"""AdaLoRA's layer and config: the SVD-form update, its scale, sides, metadata and adapter files."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_lowrank import AdaLoRA, adapter_layers, inject, load_adapter, save_adapter
from lightning_lowrank.methods.adalora import AdaLoRALayer


def _net(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4)
    ).to(dtype)


def _layer(dtype: torch.dtype = torch.float64, **kw) -> AdaLoRALayer:
    torch.manual_seed(0)
    return AdaLoRALayer(nn.Linear(5, 4).to(dtype), AdaLoRA(init_rank=3, target_rank=1, **kw))


# --- the layer ------------------------------------------------------------------------------
def test_layer_output_equals_base_plus_svd_delta():
    layer = _layer(alpha=6.0)
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer.base(x), rtol=0, atol=0)  # lambda = 0 at init
    assert layer.lora_A.std().item() == pytest.approx(0.02, rel=0.5)
    with torch.no_grad():
        layer.lora_E.copy_(torch.tensor([1.5, -2.0, 0.5]))
    p, lam, q = layer.lora_B.detach(), layer.lora_E.detach(), layer.lora_A.detach()
    dw = (6.0 / 3) * p @ torch.diag(lam) @ q
    torch.testing.assert_close(layer.delta_weight(), dw, rtol=1e-12, atol=1e-12)
    expected = x @ (layer.base.weight + dw).T + layer.base.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    w0 = layer.base.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, w0, rtol=1e-12, atol=1e-12)


def test_scale_is_alpha_over_init_rank_even_when_truncated():
    layer = AdaLoRALayer(nn.Linear(5, 4), AdaLoRA(init_rank=4, target_rank=2, alpha=8.0), rank=2)
    assert layer.scale == 2.0 and layer.lora_A.shape == (2, 5) and layer.lora_B.shape == (4, 2)


def test_param_sides_and_metadata():
    layer = _layer()
    assert layer.param_sides() == {"lora_A": "A", "lora_E": "B", "lora_B": "B"}
    assert layer.layer_metadata() == {"rank": 3}
    assert set(layer.adapter_state_dict()) == {"lora_A", "lora_E", "lora_B", "rank_mask"}


def test_config_errors():
    with pytest.raises(ValueError, match="target_rank .* must be between 0 and init_rank"):
        AdaLoRA(init_rank=4, target_rank=6)
    with pytest.raises(ValueError, match="init_rank 12 is too large for layer '0'"):
        inject(_net(), AdaLoRA(), target_modules=["0"])


# --- adapter files ---------------------------------------------------------------------------
def test_truncated_layer_with_no_slot_left(tmp_path):
    model = _net()
    inject(model, AdaLoRA(init_rank=3, target_rank=1), target_modules=["0", "2"])
    layers = adapter_layers(model)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_E.normal_()
        layers["0"].rank_mask.zero_()
        layers["0"].lora_E.zero_()
    x = torch.randn(4, 6)
    expected = model(x).detach()
    path = save_adapter(model, tmp_path / "a.safetensors", truncate=True)
    fresh = _net()
    load_adapter(fresh, path)
    assert adapter_layers(fresh)["0"].rank == 0
    torch.testing.assert_close(fresh(x).detach(), expected, rtol=1e-5, atol=1e-5)
