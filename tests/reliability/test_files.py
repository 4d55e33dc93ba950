"""Class E (and B's file cases): files are written with the umask's permissions, on disk before
the rename, read once, replaced as a whole; malformed metadata gets a clear message."""

from __future__ import annotations

import io
import json
import os
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lightning_lowrank.files as files
from lightning_lowrank import LoRA, adapter_layers, export_peft, inject, load_adapter, save_adapter
from lightning_lowrank.io import read_adapter
from tests.conftest import MLP, tiny_bert


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def _adapted():
    model = MLP()
    inject(model, LoRA(rank=2), target_modules=["fc1", "fc2"])
    with torch.no_grad():
        model.fc1.lora_B.normal_()
    return model


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_adapter_files_get_the_umask_permissions(tmp_path, umask, mask):
    umask(mask)
    path = save_adapter(_adapted(), tmp_path / "a.safetensors")
    assert _mode(path) == 0o666 & ~mask


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_peft_directories_get_the_umask_permissions(tmp_path, umask, mask):
    umask(mask)
    model = tiny_bert()
    inject(model, LoRA(rank=2), target_modules=["query", "value"])
    directory = export_peft(model, tmp_path / "peft")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert _mode(directory / name) == 0o666 & ~mask
    assert _mode(directory) == 0o777 & ~mask


def test_adapter_file_is_on_disk_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "a.safetensors"
    save_adapter(_adapted(), target)
    renames = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(target)]
    assert len(renames) == 1
    tmp = events[renames[0]][1]
    assert ("fsync", tmp) in events[: renames[0]]


def test_read_adapter_opens_the_file_once(tmp_path, monkeypatch):
    path = save_adapter(_adapted(), tmp_path / "a.safetensors")
    opened = []
    real_open = io.open

    def counting_open(file, *args, **kwargs):
        if os.fspath(file) == os.fspath(path):
            opened.append(file)
        return real_open(file, *args, **kwargs)

    def no_second_reader(*args, **kwargs):
        raise AssertionError("the file must be read once, not reopened by safetensors")

    monkeypatch.setattr(io, "open", counting_open)
    monkeypatch.setattr("builtins.open", counting_open)
    monkeypatch.setattr("lightning_lowrank.io.safe_open", no_second_reader, raising=False)
    monkeypatch.setattr("safetensors.safe_open", no_second_reader)
    tensors, meta = read_adapter(path)
    assert len(opened) == 1
    assert set(tensors) == {"fc1.lora_A", "fc1.lora_B", "fc2.lora_A", "fc2.lora_B"}
    assert meta["method"]["type"] == "LoRA"


def test_export_peft_replaces_both_files_or_neither(tmp_path, monkeypatch):
    model = tiny_bert()
    inject(model, LoRA(rank=2, alpha=4), target_modules=["query", "value"])
    directory = export_peft(model, tmp_path / "peft")
    (directory / "README.md").write_text("kept\n")
    old = {p.name: p.read_bytes() for p in directory.iterdir()}
    other = tiny_bert()
    inject(other, LoRA(rank=4, alpha=8), target_modules=["query", "value"])
    with torch.no_grad():
        for layer in adapter_layers(other).values():
            layer.lora_B.normal_()

    def crash(self, *args, **kwargs):
        raise OSError("disk full")

    from pathlib import Path

    monkeypatch.setattr(Path, "write_text", crash)  # the config is written after the weights
    with pytest.raises(OSError, match="disk full"):
        export_peft(other, directory)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == old
    assert not [p for p in tmp_path.iterdir() if p.name != "peft"]  # no staging left behind
    export_peft(other, directory)
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["r"] == 4
    assert (directory / "README.md").read_text() == "kept\n"


# --- malformed metadata ---------------------------------------------------------------------------
def _with_metadata(tmp_path, change):
    path = save_adapter(_adapted(), tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    change(metadata)
    out = tmp_path / "bad.safetensors"
    save_file(load_file(path), out, metadata=metadata)
    return out


def _set(key, value):
    return lambda m: m.__setitem__(key, value)


def _method(**fields):
    def change(m):
        method = json.loads(m["method"])
        method.update(fields)
        m["method"] = json.dumps(method)

    return change


@pytest.mark.parametrize(
    "change",
    [
        _set("method", json.dumps(["LoRA"])),
        _set("method", json.dumps({"rank": 2})),
        _set("layers", json.dumps({"fc1": "rank=2"})),
        _set("layers", json.dumps(["fc1", "fc2"])),
        _set("layers", json.dumps({"fc1": {"rank": [2]}, "fc2": {}})),
        _set("shared", json.dumps({"fc2": 1})),
        _set("extensions", json.dumps({"fc1": {"scale": 2}})),
        _set("extra", "[" * 100_000 + "]" * 100_000),
        _set("layers", "{" * 50_000),
        _set("method", "not json"),
        _method(rank="2"),
        _method(alpha=None),
        _method(new_field_of_a_later_version=1),
        _method(type="LoRA9"),
        _set("layers", json.dumps({"fc1": {"future_fact": 1}, "fc2": {}})),
    ],
    ids=[
        "method-list",
        "method-no-type",
        "layer-facts-string",
        "layers-list",
        "layer-fact-list",
        "shared-int",
        "extension-no-name",
        "deep-extra",
        "deep-unclosed",
        "method-not-json",
        "rank-string",
        "alpha-null",
        "unknown-field",
        "unknown-method",
        "unknown-layer-fact",
    ],
)
def test_malformed_metadata_gets_a_clear_message_and_changes_nothing(tmp_path, change):
    bad = _with_metadata(tmp_path, change)
    fresh = MLP()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match="newer version"):
        load_adapter(fresh, bad)
    assert not adapter_layers(fresh)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())


def test_staging_helpers_clean_up_after_a_failed_write(tmp_path):
    def fail(path):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        files.atomic_write(tmp_path / "x.bin", fail)
    assert list(tmp_path.iterdir()) == []
