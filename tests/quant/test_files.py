"""Adapter files over a quantized base across wrappings, and refusals that change nothing.

The quantisation record is named like the file's layers (relative to the model's root), so a
file written from a wrapper (a LightningModule holding the transformers model as ``self.model``)
quantizes the same layers of the bare model, and the other way round. float32; outputs compared
exactly where both sides run the same kernels on the same stored bits.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes")

from lightning_lowrank import LoRA, adapter_layers, inject, load_adapter, save_adapter, unload  # noqa: E402
from lightning_lowrank.io import read_adapter  # noqa: E402
from lightning_lowrank.methods.base import is_quantized  # noqa: E402
from lightning_lowrank.quant import NF4  # noqa: E402
from tests.conftest import assert_unchanged, snapshot  # noqa: E402
from tests.quant.helpers import TARGETS, ids, llama, quantized, randomise  # noqa: E402

FROZEN = "model.layers.0.mlp.gate_proj"  # no adapter: quantized by frozen_linear=True


class Wrapper(nn.Module):
    """What a LightningModule looks like to the library: the transformers model one level down."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor):
        return self.model(input_ids=input_ids)


def _adapted(wrapped: bool) -> nn.Module:
    model: nn.Module = llama()
    if wrapped:
        model = Wrapper(model)
    torch.manual_seed(0)
    inject(
        model,
        LoRA(rank=4, alpha=8.0),
        target_modules=TARGETS,
        quantize_base=NF4(frozen_linear=True),
    )
    randomise(model)
    return model


def _quantized_names(model: nn.Module) -> set[str]:
    root = model.model if isinstance(model, Wrapper) else model
    found = {n.removesuffix(".base") for n, m in root.named_modules() if is_quantized(m)}
    return {n for n in found if not any(n.startswith(o + ".") for o in found)}


@pytest.mark.parametrize(("saved_wrapped", "loaded_wrapped"), [(True, False), (False, True)])
def test_record_is_named_from_the_root_and_quantizes_the_same_layers_elsewhere(
    saved_wrapped, loaded_wrapped, tmp_path
):
    model = _adapted(saved_wrapped)
    path = save_adapter(model, tmp_path / "a.safetensors")
    meta = read_adapter(path)[1]
    # one naming for layers and record: relative to the transformers model in both wrappings
    assert set(meta["layers"]) <= set(meta["quantization"])
    assert FROZEN in meta["quantization"] and FROZEN not in meta["layers"]
    assert all(not n.startswith("model.model.") for n in meta["quantization"])

    fresh: nn.Module = llama()
    if loaded_wrapped:
        fresh = Wrapper(fresh)
    load_adapter(fresh, path)
    assert _quantized_names(fresh) == _quantized_names(model) == set(meta["quantization"])
    tokens = ids()
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=tokens).logits, model(input_ids=tokens).logits)


def test_file_over_a_quantized_base_into_adapters_on_a_dense_base_is_refused(tmp_path):
    path = save_adapter(quantized("lora"), tmp_path / "q.safetensors")
    dense = llama()
    torch.manual_seed(0)
    inject(dense, LoRA(rank=4, alpha=8.0), target_modules=TARGETS)
    before = snapshot(dense)
    with pytest.raises(ValueError, match=r"dense base: load it into a fresh model"):
        load_adapter(dense, path)
    assert_unchanged(dense, before)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("delete", r"records quantized base layers this model lacks"),
        ("replace", r"cannot be stored so \(Identity is not a plain nn.Linear\)"),
        ("narrow", r"cannot be stored so \(in_features=48 is not a multiple of 32\)"),
        ("blocks", r"cannot be stored so \(in_features=96 is not a multiple of 64\)"),
    ],
)
def test_file_recording_a_layer_the_model_cannot_quantize_so_is_refused(change, message, tmp_path):
    path = save_adapter(_adapted(False), tmp_path / "a.safetensors")
    fresh = llama()
    mlp = fresh.model.layers[0].mlp
    if change == "delete":
        del mlp.gate_proj
    elif change == "replace":
        mlp.gate_proj = nn.Identity()
    elif change == "narrow":  # bitsandbytes takes no block under 32
        mlp.gate_proj = nn.Linear(48, 64, bias=False)
    else:  # blocks of 64 were recorded; 96 inputs would be quantized in blocks of 32
        mlp.down_proj = nn.Linear(96, 32, bias=False)
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=message):
        load_adapter(fresh, path)
    assert_unchanged(fresh, before)
    assert not adapter_layers(fresh)


@pytest.mark.parametrize(
    ("poison", "dtype"),
    [(float("inf"), torch.float32), (1e6, torch.float16)],
    ids=["inf", "overflow"],
)
def test_unload_refused_on_any_layer_changes_no_layer(poison, dtype):
    model = quantized("lora")
    randomise(model)
    names = list(adapter_layers(model))
    last = adapter_layers(model)[names[-1]]  # every other layer would be unloaded before it
    with torch.no_grad():
        last.lora_B.fill_(poison)
        last.lora_A.fill_(1.0)
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"{names[-1]}.*non-finite.*model is unchanged"):
        unload(model, dtype=dtype)
    assert list(adapter_layers(model)) == names
    assert all(is_quantized(layer.base) for layer in adapter_layers(model).values())
    assert_unchanged(model, before, equal_nan=True)  # the poisoned values equal themselves
