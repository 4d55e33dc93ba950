"""Adapter files: round trips, metadata, atomic writes, and bad files that leave the model untouched."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lightning_lowrank import (
    LoRA,
    adapter_layers,
    adapter_state_dict,
    inject,
    load_adapter,
    read_adapter,
    save_adapter,
)
from tests.conftest import assert_unchanged, snapshot, tiny_bert, tiny_gpt2


def _trained(model, method=None, targets=("query", "value")):
    inject(model, method or LoRA(rank=2, alpha=4, scaling="rslora"), target_modules=list(targets))
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_A.normal_()
            layer.lora_B.normal_()
    return model


@pytest.mark.parametrize("factory", [tiny_bert, tiny_gpt2])
def test_round_trip_into_fresh_model(tmp_path, factory):
    model = _trained(factory(), targets=("query", "value") if factory is tiny_bert else ("c_attn",))
    path = save_adapter(model, tmp_path / "adapter.safetensors")
    ids = torch.randint(0, 64, (2, 7))
    expected = model(ids).logits
    fresh = factory()
    names = load_adapter(fresh, path)
    assert sorted(names) == sorted(adapter_layers(model))
    torch.testing.assert_close(fresh(ids).logits, expected, rtol=0, atol=0)
    layer = next(iter(adapter_layers(fresh).values()))
    assert layer.config == LoRA(rank=2, alpha=4, scaling="rslora")
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }


def test_load_into_model_with_adapters(tmp_path):
    model = _trained(tiny_bert())
    path = save_adapter(model, tmp_path / "a.safetensors")
    other = tiny_bert()
    inject(other, LoRA(rank=2, alpha=4, scaling="rslora"), target_modules=["query", "value"])
    load_adapter(other, path)
    for k, v in adapter_state_dict(model).items():
        assert torch.equal(adapter_state_dict(other)[k], v)


def test_file_holds_only_the_adapter_with_metadata(tmp_path):
    model = _trained(tiny_bert())
    path = save_adapter(model, tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert keys == set(adapter_state_dict(model))
    assert all(k.endswith(("lora_A", "lora_B")) for k in keys)
    assert json.loads(meta["method"]) == {
        "type": "LoRA",
        "rank": 2,
        "alpha": 4,
        "dropout": 0.0,
        "scaling": "rslora",
        "train_a": True,
    }
    tensors, decoded = read_adapter(path)
    assert sorted(decoded["layers"]) == sorted(adapter_layers(model))


def test_save_is_atomic(tmp_path, monkeypatch):
    model = _trained(tiny_bert())
    path = save_adapter(model, tmp_path / "a.safetensors")
    before = path.read_bytes()

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("lightning_lowrank.io.save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, path)
    assert path.read_bytes() == before  # the old file is intact
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]  # no temporary left behind


def _bad_files(tmp_path, model):
    good = save_adapter(model, tmp_path / "good.safetensors")
    tensors, _ = read_adapter(good)
    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
    cases = {}
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(good.read_bytes()[:100])
    cases["corrupt"] = (corrupt, "not a valid safetensors")
    shape = dict(tensors)
    key = sorted(shape)[0]
    shape[key] = torch.zeros(3, 3)
    save_file(shape, tmp_path / "shape.safetensors", metadata=meta)
    cases["shape"] = (tmp_path / "shape.safetensors", "has shape")
    missing = dict(tensors)
    del missing[key]
    save_file(missing, tmp_path / "missing.safetensors", metadata=meta)
    cases["missing"] = (tmp_path / "missing.safetensors", "missing 1 keys")
    nan = {k: v.clone() for k, v in tensors.items()}
    nan[key][0, 0] = float("nan")
    save_file(nan, tmp_path / "nan.safetensors", metadata=meta)
    cases["nan"] = (tmp_path / "nan.safetensors", "non-finite")
    save_file(tensors, tmp_path / "foreign.safetensors", metadata={"format": "pt"})
    cases["foreign"] = (tmp_path / "foreign.safetensors", "not written by lightning_lowrank")
    gpt = _trained(tiny_gpt2(), targets=("c_attn",))
    cases["other_model"] = (save_adapter(gpt, tmp_path / "gpt.safetensors"), "lacks")
    return cases


@pytest.mark.parametrize("case", ["corrupt", "shape", "missing", "nan", "foreign", "other_model"])
@pytest.mark.parametrize("injected", [False, True])
def test_bad_files_raise_and_leave_model_untouched(tmp_path, case, injected):
    cases = _bad_files(tmp_path, _trained(tiny_bert()))
    path, message = cases[case]
    target = tiny_bert()
    if injected:
        inject(target, LoRA(rank=2, alpha=4, scaling="rslora"), target_modules=["query", "value"])
        if case == "other_model":
            message = "different ones"
    before = snapshot(target)
    n_layers = len(adapter_layers(target))
    with pytest.raises(ValueError, match=message):
        load_adapter(target, path)
    assert_unchanged(target, before)
    assert len(adapter_layers(target)) == n_layers


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_adapter(tiny_bert(), tmp_path / "nope.safetensors")
