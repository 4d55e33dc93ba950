"""Compositions: DoRA over SingLoRA, rsLoRA everywhere, LoRA-FA where it fits, LoRA+ groups for
DoRA, and every config through adapter-file metadata and LightningCLI YAML."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_lowrank import (
    DoRA,
    LoRA,
    LowRankCallback,
    SingLoRA,
    SLTrain,
    VeRA,
    adapter_layers,
    inject,
    load_adapter,
    lora_plus_param_groups,
    save_adapter,
    trainable_parameter_count,
)
from lightning_lowrank.io import read_adapter
from lightning_lowrank.methods import config_from_dict
from lightning_lowrank.methods.dora import DoRASingLoRALayer
from tests.conftest import tiny_bert

CONFIGS = [
    DoRA(rank=3, alpha=5.0, dropout=0.1, scaling="rslora", train_a=False),
    DoRA(rank=2, delta="singlora", ramp_steps=7),
    VeRA(rank=32, d_init=0.2, seed=4),
    SingLoRA(rank=3, alpha=4.0, scaling="rslora", ramp_steps=12),
    SLTrain(rank=2, alpha=8.0, density=0.05, seed=3, scaling="rslora", train_a=False),
]


# --- DoRA's magnitude over a SingLoRA delta ---------------------------------------------------
@pytest.mark.parametrize(("out_f", "in_f"), [(5, 8), (8, 5)])
def test_dora_over_singlora_matches_dense_formula(out_f, in_f):
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f).double()
    layer = DoRASingLoRALayer(base, DoRA(rank=2, alpha=4.0, delta="singlora", ramp_steps=4))
    x = torch.randn(3, in_f, dtype=torch.float64)
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.magnitude.mul_(1.5)
    w0 = base.weight.detach()
    m = layer.magnitude.detach()
    torch.testing.assert_close(layer(x), 1.5 * base(x) - 0.5 * base.bias)  # u(0) = 0: V = W0
    layer.set_step(2)
    a = layer.lora_A.detach()
    v = w0 + 2.0 * 0.5 * a[:out_f] @ a[:in_f].T  # s = alpha / r = 2, u = 2 / 4
    w = m[:, None] * v / v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(layer(x), x @ w.T + base.bias, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.weight_norm(), v.norm(dim=1), rtol=1e-12, atol=1e-12)
    layer.merge()
    torch.testing.assert_close(base.weight.detach(), w, rtol=1e-12, atol=1e-12)
    layer.unmerge()
    torch.testing.assert_close(base.weight.detach(), w0, rtol=1e-12, atol=1e-12)


def test_dora_over_singlora_parameter_count_and_sides():
    model = tiny_bert()
    inject(model, DoRA(rank=4, delta="singlora"), target_modules="all-linear")
    layers = adapter_layers(model)
    expected = sum(
        4 * max(la.in_features, la.out_features) + la.out_features for la in layers.values()
    )
    assert trainable_parameter_count(model) == expected
    assert next(iter(layers.values())).param_sides() == {"lora_A": "A", "magnitude": "B"}


# --- rsLoRA scaling on every method with alpha and rank ---------------------------------------
@pytest.mark.parametrize(
    "make",
    [
        lambda sc: LoRA(rank=4, alpha=8.0, scaling=sc),
        lambda sc: DoRA(rank=4, alpha=8.0, scaling=sc),
        lambda sc: DoRA(rank=4, alpha=8.0, scaling=sc, delta="singlora", ramp_steps=0),
        lambda sc: SingLoRA(rank=4, alpha=8.0, scaling=sc, ramp_steps=0),
        lambda sc: SLTrain(rank=4, alpha=8.0, scaling=sc, density=0.0),
    ],
    ids=["lora", "dora", "dora-singlora", "singlora", "sltrain"],
)
def test_rslora_scale_is_alpha_over_sqrt_rank(make):
    x = torch.randn(3, 6, dtype=torch.float64)
    outputs = {}
    for scaling in ("standard", "rslora"):
        torch.manual_seed(0)
        layer = make(scaling).build({"l": nn.Linear(6, 6).double()})["l"]
        with torch.no_grad():
            for name, p in layer.named_parameters():
                if name.startswith("lora_"):
                    p.copy_(torch.linspace(-1, 1, p.numel(), dtype=p.dtype).view_as(p))
        assert layer.scale == pytest.approx(8.0 / (4 if scaling == "standard" else math.sqrt(4)))
        outputs[scaling] = layer.adapter_forward(x) if not hasattr(layer, "magnitude") else None
    if outputs["standard"] is not None:  # the additive delta doubles: (8 / 2) / (8 / 4)
        torch.testing.assert_close(outputs["rslora"], 2 * outputs["standard"])


# --- LoRA-FA style frozen A -------------------------------------------------------------------
@pytest.mark.parametrize("config", [DoRA(rank=2, train_a=False), SLTrain(rank=2, train_a=False)])
def test_frozen_a_does_not_train(config):
    torch.manual_seed(1)
    model = tiny_bert()
    inject(model, config, target_modules=["query", "value"])
    layers = adapter_layers(model)
    a_before = {n: la.lora_A.detach().clone() for n, la in layers.items()}
    assert all(
        not la.lora_A.requires_grad and "lora_A" not in la.param_sides() for la in layers.values()
    )
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        loss = model(torch.randint(0, 64, (4, 6)), labels=torch.tensor([0, 1, 2, 0])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, la in layers.items():
        assert torch.equal(la.lora_A, a_before[n])
        assert not torch.equal(la.lora_B, torch.zeros_like(la.lora_B))
    full = tiny_bert()
    inject(full, type(config)(rank=2), target_modules=["query", "value"])
    a_count = sum(la.lora_A.numel() for la in layers.values())
    assert trainable_parameter_count(model) == trainable_parameter_count(full) - a_count


def test_singlora_frozen_a_is_meaningless_and_refused_for_dora():
    with pytest.raises(ValueError, match="train_a=True"):
        DoRA(delta="singlora", train_a=False)


# --- LoRA+ groups: DoRA's magnitude goes with the B side --------------------------------------
def test_lora_plus_groups_put_dora_magnitude_on_b_side():
    model = tiny_bert()
    inject(model, DoRA(rank=2), target_modules=["query", "value"])
    groups = lora_plus_param_groups(model, lr=1e-3, lr_ratio=16.0, weight_decay=0.01)
    by_id = {id(p): g for g in groups for p in g["params"]}
    for layer in adapter_layers(model).values():
        assert by_id[id(layer.magnitude)]["lr"] == pytest.approx(16e-3)
        assert by_id[id(layer.magnitude)]["weight_decay"] == 0.0  # 1-D: no decay
        assert by_id[id(layer.lora_B)]["lr"] == pytest.approx(16e-3)
        assert by_id[id(layer.lora_A)]["lr"] == pytest.approx(1e-3)


def test_lora_plus_sides_of_the_other_methods():
    model = tiny_bert()
    inject(model, SLTrain(rank=2, density=0.1), target_modules=["query"])
    layer = next(iter(adapter_layers(model).values()))
    assert layer.param_sides() == {"lora_A": "A", "lora_B": "B", "sparse_values": "B"}
    model = tiny_bert()
    inject(model, VeRA(rank=8), target_modules=["query"])
    layer = next(iter(adapter_layers(model).values()))
    assert layer.param_sides() == {"vera_lambda_d": "B", "vera_lambda_b": "B"}


# --- configs through adapter files and YAML ---------------------------------------------------
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_config_round_trips_through_adapter_metadata(config, tmp_path):
    assert config_from_dict(config.to_dict()) == config
    torch.manual_seed(2)
    model = tiny_bert()
    inject(model, config, target_modules=["query", "value"])
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for p in layer.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)
            layer.set_step(5)
    model.eval()
    ids = torch.randint(0, 64, (2, 6))
    expected = model(ids).logits
    path = save_adapter(model, tmp_path / "a.safetensors")
    assert config_from_dict(read_adapter(path)[1]["method"]) == config
    fresh = tiny_bert()
    load_adapter(fresh, path)
    assert next(iter(adapter_layers(fresh).values())).config == config
    torch.testing.assert_close(fresh.eval()(ids).logits, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_config_from_lightning_cli_yaml(config, tmp_path, monkeypatch):
    yaml = pytest.importorskip("yaml")
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

    fields = {k: v for k, v in config.to_dict().items() if k != "type"}
    spec = {
        "trainer": {
            "logger": False,
            "callbacks": [
                {
                    "class_path": "lightning_lowrank.LowRankCallback",
                    "init_args": {
                        "method": {
                            "class_path": f"lightning_lowrank.{type(config).__name__}",
                            "init_args": fields,
                        },
                        "target_modules": ["layer"],
                    },
                }
            ],
        }
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(spec))
    monkeypatch.setattr("sys.argv", ["train.py"])  # pytest's own arguments are not the CLI's
    cli = LightningCLI(
        BoringModel,
        BoringDataModule,
        run=False,
        args=["--config", str(path)],
        save_config_callback=None,
    )
    callbacks = [c for c in cli.trainer.callbacks if isinstance(c, LowRankCallback)]
    assert len(callbacks) == 1
    assert callbacks[0].method == config


def test_low_rank_factors_only_where_the_whole_update_is_low_rank():
    """Callers (Delta-LoRA, PEFT export) read ``c * B @ A`` as the layer's whole update."""
    torch.manual_seed(3)
    base = nn.Linear(5, 7).double()
    sing = SingLoRA(rank=2, ramp_steps=4).build({"l": base})["l"]
    sing.set_step(3)
    with torch.no_grad():
        sing.lora_A.normal_()
    b, a, c = sing.low_rank_factors()
    torch.testing.assert_close(c * b @ a, sing.delta_weight())
    assert DoRA(rank=2).build({"l": nn.Linear(5, 7)})["l"].low_rank_factors() is None
    assert SLTrain(rank=2).build({"l": nn.Linear(5, 7)})["l"].low_rank_factors() is None
