"""Class A: a refusal leaves the model exactly as it was (validate everything, then change)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lightning_lowrank import (
    LoRA,
    adapter_layers,
    inject,
    load_adapter,
    merge,
    save_adapter,
    sltrain_pretrain,
    unload,
    unmerge,
)
from tests.conftest import MLP, assert_unchanged, snapshot


def _rewrite(path, out, change):
    tensors = load_file(path)
    change(tensors)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file(tensors, out, metadata=metadata)
    return out


def test_refused_sltrain_pretraining_file_keeps_the_dense_weights(tmp_path):
    torch.manual_seed(0)
    trained = MLP()
    sltrain_pretrain(trained, rank=2, density=0.1, target_modules=["fc1", "fc2"])
    path = save_adapter(trained, tmp_path / "pre.safetensors")

    def poison(t):
        t["fc2.sparse_values"][0] = float("nan")

    bad = _rewrite(path, tmp_path / "bad.safetensors", poison)
    fresh = MLP()
    ids = torch.randint(0, 20, (2, 5))
    out_before = fresh(ids)
    before = snapshot(fresh)
    with pytest.raises(ValueError, match="non-finite"):
        load_adapter(fresh, bad)
    assert_unchanged(fresh, before)
    assert isinstance(fresh.fc1.weight, torch.nn.Parameter)
    torch.testing.assert_close(fresh(ids), out_before, rtol=0, atol=0)


def test_train_modules_typo_changes_nothing_and_a_corrected_retry_works():
    model = MLP()
    before = snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="train_modules"):
        inject(model, LoRA(rank=2), target_modules=["fc1"], train_modules=["clasifier"])
    assert not adapter_layers(model)
    assert_unchanged(model, before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    inject(model, LoRA(rank=2), target_modules=["fc1"], train_modules=["classifier"])
    assert model.classifier.weight.requires_grad and not model.fc2.weight.requires_grad


def _adapted_with_one_bad_layer():
    model = MLP()
    inject(model, LoRA(rank=2), target_modules=["fc1", "fc2"])
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.normal_()
        model.fc2.lora_B[0, 0] = float("inf")  # the LAST layer in model order
    return model


def test_merge_with_one_non_finite_layer_merges_none():
    model = _adapted_with_one_bad_layer()
    before = snapshot(model)
    with pytest.raises(ValueError, match="non-finite"):
        merge(model)
    assert not any(layer.merged for layer in adapter_layers(model).values())
    assert_unchanged(model, before)
    unmerge(model)  # nothing was merged, so nothing is subtracted
    assert_unchanged(model, before)


def test_unload_with_one_non_finite_layer_unloads_none():
    model = _adapted_with_one_bad_layer()
    before = snapshot(model)
    with pytest.raises(ValueError, match="non-finite"):
        unload(model)
    assert set(adapter_layers(model)) == {"fc1", "fc2"}
    assert not any(layer.merged for layer in adapter_layers(model).values())
    assert_unchanged(model, before)


def test_merge_into_float16_checks_after_the_cast():
    model = MLP().half()
    inject(model, LoRA(rank=1, alpha=1), target_modules=["fc1"])
    layer = model.fc1
    with torch.no_grad():
        layer.base.weight.fill_(60000.0)  # near float16's largest value, 65504
        layer.lora_A.fill_(1.0)
        layer.lora_B.fill_(10000.0)  # delta 1e4: finite, but 7e4 overflows float16
    assert torch.isfinite(layer.delta_weight().float()).all()
    before = snapshot(model)
    with pytest.raises(ValueError, match="non-finite"):
        merge(model)
    assert_unchanged(model, before)
    assert torch.isfinite(layer.base.weight).all()


# --- import_peft: every tensor is accounted for before anything changes -------------------------
def _peft_dir(tmp_path, extra_tensors):
    from peft import LoraConfig, get_peft_model

    from tests.conftest import tiny_bert

    peft_model = get_peft_model(
        tiny_bert(), LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"])
    )
    peft_model.save_pretrained(tmp_path / "peft")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors.update(extra_tensors)
    save_file(tensors, weights, metadata={"format": "pt"})
    return tmp_path / "peft"


@pytest.mark.parametrize(
    "key",
    [
        "base_model.model.bert.encoder.layer.0.attention.self.query.weight",  # an adapted base
        "base_model.model.bert.encoder.layer.0.output.dense.weight",  # outside modules_to_save
    ],
    ids=["adapted-base-weight", "stray-base-weight"],
)
def test_import_peft_refuses_base_weights_and_changes_nothing(tmp_path, key):
    from lightning_lowrank import import_peft
    from tests.conftest import tiny_bert

    directory = _peft_dir(tmp_path, {key: torch.full((16, 16), 7.0)})
    model = tiny_bert()
    before = snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="base weight|modules_to_save"):
        import_peft(model, directory)
    assert not adapter_layers(model)
    assert_unchanged(model, before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


# --- sizes claimed by metadata are checked before anything is allocated ------------------------
HUGE = 10**12  # a real allocation of this many rows fails inside torch, not with our message


def _rewrite_meta(path, out, change):
    import json

    tensors = load_file(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    change(metadata, json)
    save_file(tensors, out, metadata=metadata)
    return out


def test_a_per_layer_rank_larger_than_the_model_is_refused_before_allocation(tmp_path):
    model = MLP()
    inject(model, LoRA(rank=2), target_modules=["fc1", "fc2"])
    path = save_adapter(model, tmp_path / "a.safetensors")

    def claim(meta, json):
        meta["layers"] = json.dumps({"fc1": {"rank": HUGE}, "fc2": {}})

    bad = _rewrite_meta(path, tmp_path / "bad.safetensors", claim)
    fresh = MLP()
    with pytest.raises(ValueError, match="rank"):
        load_adapter(fresh, bad)
    assert not adapter_layers(fresh)


def test_a_vera_rank_the_tensors_do_not_show_is_refused_before_allocation(tmp_path):
    from lightning_lowrank import VeRA

    model = MLP()
    inject(model, VeRA(rank=4), target_modules=["fc1", "fc2"])
    path = save_adapter(model, tmp_path / "a.safetensors")

    def claim(meta, json):
        method = json.loads(meta["method"])
        method["rank"] = HUGE
        meta["method"] = json.dumps(method)

    bad = _rewrite_meta(path, tmp_path / "bad.safetensors", claim)
    fresh = MLP()
    with pytest.raises(ValueError, match="vera_lambda_d"):
        load_adapter(fresh, bad)
    assert not adapter_layers(fresh)


def test_a_delta_lora_extension_rank_is_refused_before_allocation(tmp_path):
    from lightning_lowrank.schedules.delta_lora import DeltaLoRABase

    model = MLP()
    inject(model, LoRA(rank=2), target_modules=["fc1"])
    model.fc1.extension = DeltaLoRABase(model.fc1, 2.0, 2, implicit=True, active=True)
    path = save_adapter(model, tmp_path / "a.safetensors")

    def claim(meta, json):
        ext = json.loads(meta["extensions"])
        ext["fc1"]["rank"] = HUGE
        meta["extensions"] = json.dumps(ext)

    bad = _rewrite_meta(path, tmp_path / "bad.safetensors", claim)
    fresh = MLP()
    with pytest.raises(ValueError, match="ref_"):
        load_adapter(fresh, bad)
    assert not adapter_layers(fresh)
