"""Class D: arguments are validated at construction, with a message that names the fix."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_lowrank import (
    AdaLoRA,
    DeltaLoRA,
    DoRA,
    LoRA,
    LoRADrop,
    LowRankCallback,
    SingLoRA,
    SLTrain,
    VeRA,
    adapter_layers,
    inject,
    set_step,
)
from tests.conftest import MLP

NAN, INF = math.nan, math.inf


@pytest.mark.parametrize("config", [LoRA, DoRA, SingLoRA, SLTrain, AdaLoRA])
@pytest.mark.parametrize("alpha", [NAN, INF, -INF, 0, 0.0])
def test_alpha_must_be_finite_and_nonzero(config, alpha):
    with pytest.raises(ValueError, match="alpha"):
        config(alpha=alpha)


@pytest.mark.parametrize("config", [LoRA, DoRA, SingLoRA, SLTrain, VeRA])
@pytest.mark.parametrize("rank", [2.5, "8", True, NAN, 0, -1])
def test_rank_must_be_a_positive_integer(config, rank):
    with pytest.raises(ValueError, match="rank"):
        config(rank=rank)


@pytest.mark.parametrize("field", ["init_rank", "target_rank", "t_init", "t_final", "delta_t"])
def test_adalora_sizes_must_be_integers(field):
    with pytest.raises(ValueError, match=field):
        AdaLoRA(**{field: 1.5})


def test_whole_float_rank_becomes_an_int():
    assert LoRA(rank=4.0).rank == 4 and isinstance(LoRA(rank=4.0).rank, int)


@pytest.mark.parametrize("config", [VeRA, SLTrain])
@pytest.mark.parametrize("seed", [1.5, "0", True, -1, NAN])
def test_seed_must_be_a_non_negative_integer(config, seed):
    with pytest.raises(ValueError, match="seed"):
        config(seed=seed)


@pytest.mark.parametrize("d_init", [NAN, INF, 0.0])
def test_vera_d_init_must_be_finite_and_nonzero(d_init):
    with pytest.raises(ValueError, match="d_init"):
        VeRA(d_init=d_init)


@pytest.mark.parametrize("dropout", [NAN, 1.0, -0.1])
def test_dropout_is_a_probability(dropout):
    with pytest.raises(ValueError, match="dropout"):
        LoRA(dropout=dropout)


def test_train_a_must_be_a_bool():
    with pytest.raises(ValueError, match="train_a"):
        LoRA(train_a="false")  # type: ignore[arg-type]


@pytest.mark.parametrize("lr_ratio", [NAN, INF, -1.0, 0.0, "16"])
def test_callback_lr_ratio_must_be_finite_and_positive(lr_ratio):
    with pytest.raises(ValueError, match="lr_ratio"):
        LowRankCallback(LoRA(), lr_ratio=lr_ratio)


@pytest.mark.parametrize("embedding_lr", [NAN, INF, -1e-6, None, "1e-6"])
def test_callback_embedding_lr_must_be_a_finite_non_negative_number(embedding_lr):
    with pytest.raises(ValueError, match="embedding_lr"):
        LowRankCallback(LoRA(), embedding_lr=embedding_lr)


@pytest.mark.parametrize("targets", [5, {"fc1": 1}, ["fc1", 3], None, {"fc1"}])
def test_callback_target_modules_type(targets):
    with pytest.raises(ValueError, match="target_modules"):
        LowRankCallback(LoRA(), target_modules=targets)


def test_callback_train_and_exclude_modules_types():
    with pytest.raises(ValueError, match="exclude_modules"):
        LowRankCallback(LoRA(), exclude_modules=7)
    with pytest.raises(ValueError, match="train_modules"):
        LowRankCallback(LoRA(), train_modules="classifier")


def test_inject_target_modules_type_is_checked_before_anything_changes():
    model = MLP()
    with pytest.raises(ValueError, match="target_modules"):
        inject(model, LoRA(rank=2), target_modules=3)
    assert not adapter_layers(model)


@pytest.mark.parametrize(
    "kwargs", [{"scale": NAN}, {"scale": "2"}, {"start_step": 1.5}, {"start_step": -1}]
)
def test_delta_lora_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        DeltaLoRA(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"threshold": NAN},
        {"threshold": "0.9"},
        {"sample_steps": 2.5},
        {"sample_steps": True},
        {"sample_fraction": NAN},
        {"seed": 1.5},
    ],
)
def test_lora_drop_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        LoRADrop(**kwargs)


def test_singlora_negative_step_is_refused_and_changes_nothing():
    model = MLP()
    inject(model, SingLoRA(rank=2, ramp_steps=10), target_modules=["fc1", "fc2"])
    set_step(model, 3)
    with pytest.raises(ValueError, match="step"):
        set_step(model, -1)
    with pytest.raises(ValueError, match="step"):
        model.fc1.set_step(-5)
    assert all(int(layer.step) == 3 for layer in adapter_layers(model).values())


def test_adapter_file_with_a_negative_singlora_step_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from lightning_lowrank import load_adapter, save_adapter
    from lightning_lowrank.io import read_adapter

    model = MLP()
    inject(model, SingLoRA(rank=2, ramp_steps=10), target_modules=["fc1"])
    path = save_adapter(model, tmp_path / "a.safetensors")
    _, raw_meta = read_adapter(path)
    tensors = load_file(path)
    tensors["fc1.step"] = torch.tensor(-4, dtype=torch.int64)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file(tensors, tmp_path / "neg.safetensors", metadata=metadata)
    fresh = MLP()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match="negative step"):
        load_adapter(fresh, tmp_path / "neg.safetensors")
    assert not adapter_layers(fresh)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_adapter_file_with_integer_or_bool_weights_is_refused(tmp_path, dtype):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from lightning_lowrank import load_adapter, save_adapter

    model = MLP()
    inject(model, LoRA(rank=2), target_modules=["fc1"])
    path = save_adapter(model, tmp_path / "a.safetensors")
    tensors = load_file(path)
    tensors["fc1.lora_B"] = torch.ones_like(tensors["fc1.lora_B"], dtype=dtype)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file(tensors, tmp_path / "int.safetensors", metadata=metadata)
    fresh = MLP()
    with pytest.raises(ValueError, match="fc1.lora_B"):
        load_adapter(fresh, tmp_path / "int.safetensors")
    assert not adapter_layers(fresh)


@pytest.mark.parametrize(
    "change",
    [
        {"lora_alpha": float("nan")},
        {"lora_alpha": float("inf")},
        {"alpha_pattern": {"query": float("nan")}},
        {"rank_pattern": {"query": 2.5}},
        {"r": True},
    ],
    ids=["alpha-nan", "alpha-inf", "alpha-pattern-nan", "rank-pattern-float", "r-bool"],
)
def test_peft_config_numbers_must_be_finite_and_positive(tmp_path, change):
    import json

    from peft import LoraConfig, get_peft_model

    from lightning_lowrank import import_peft
    from tests.conftest import tiny_bert

    get_peft_model(
        tiny_bert(), LoraConfig(r=2, lora_alpha=4, target_modules=["query"])
    ).save_pretrained(tmp_path / "p")
    config_path = tmp_path / "p" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(change)
    config_path.write_text(json.dumps(config))  # json writes NaN as NaN, as Python reads it
    model = tiny_bert()
    with pytest.raises(ValueError, match=next(iter(change))):
        import_peft(model, tmp_path / "p")
    assert not adapter_layers(model)
