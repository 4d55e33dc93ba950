"""Every method over a 4-bit NF4 base: the same outputs and gradients as over a dense base
holding the dequantized weights, unloading to plain layers, merge refused, files exact.

float32 throughout; ``ATOL`` is the float32 agreement of two evaluation orders on logits of
order 1 (the quantized base computes ``x @ dequantize(W0).T`` in its own kernel)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes")

from lightning_lowrank import (  # noqa: E402
    adapter_layers,
    load_adapter,
    lora_plus_param_groups,
    merge,
    save_adapter,
    unload,
)
from lightning_lowrank.io import read_adapter  # noqa: E402
from lightning_lowrank.methods.base import is_quantized  # noqa: E402
from tests.quant.helpers import (  # noqa: E402
    METHODS,
    dense_twin,
    ids,
    llama,
    loss_and_grads,
    quantized,
    randomise,
)

ATOL = RTOL = 1e-5


@pytest.mark.parametrize("name", list(METHODS))
def test_over_nf4_base_equals_dense_base_of_the_dequantized_weights(name):
    model = quantized(name)
    layers = adapter_layers(model)
    assert layers and all(is_quantized(layer.base) for layer in layers.values())
    randomise(model)
    twin = dense_twin(model, name)
    tokens = ids()
    out, grads = loss_and_grads(model, tokens)
    want, want_grads = loss_and_grads(twin, tokens)
    torch.testing.assert_close(out, want, rtol=RTOL, atol=ATOL)
    assert grads.keys() == want_grads.keys() and grads
    for key in grads:
        torch.testing.assert_close(grads[key], want_grads[key], rtol=1e-4, atol=1e-6, msg=key)
    # nothing of the quantized base trains or gets a gradient
    assert not any(".base." in key for key in grads)


@pytest.mark.parametrize("name", list(METHODS))
def test_unload_returns_plain_layers_with_dequantized_base_plus_delta(name):
    model = quantized(name)
    randomise(model)
    tokens = ids()
    with torch.no_grad():
        want = model(input_ids=tokens).logits
    names = list(adapter_layers(model))
    unload(model, dtype=torch.float32)
    assert not adapter_layers(model)
    for n in names:
        layer = model.get_submodule(n)
        assert type(layer) is torch.nn.Linear and layer.weight.dtype == torch.float32
    with torch.no_grad():
        got = model(input_ids=tokens).logits
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


def test_unload_in_another_dtype():
    model = quantized("lora")
    randomise(model)
    ref = quantized("lora")
    randomise(ref)
    unload(ref, dtype=torch.float32)
    unload(model, dtype=torch.bfloat16)
    for n in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        got, want = model.get_submodule(n).weight, ref.get_submodule(n).weight
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, want.to(torch.bfloat16))  # one rounding, from the float32 sum


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_merge_in_place_is_refused_naming_unload(name):
    model = quantized(name)
    randomise(model)
    tokens = ids()
    with torch.no_grad():
        before = model(input_ids=tokens).logits
    with pytest.raises(ValueError, match=r"unload\(model, dtype="):
        merge(model)
    layer = next(iter(adapter_layers(model).values()))
    with pytest.raises(ValueError, match=r"unload\(model, dtype="):
        layer.merge()
    assert not any(la.merged for la in adapter_layers(model).values())
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens).logits, before)


@pytest.mark.parametrize("name", list(METHODS))
def test_file_loads_exactly_onto_a_fresh_model(name, tmp_path):
    model = quantized(name)
    randomise(model)
    path = save_adapter(model, tmp_path / "a.safetensors")
    recorded = read_adapter(path)[1]["quantization"]
    assert set(recorded) == set(adapter_layers(model))
    layers = adapter_layers(model)
    for n, facts in recorded.items():  # blocks of 64, or of 32 where a row holds 32 weights
        assert facts["format"] == "nf4" and facts["double_quant"]
        assert facts["blocksize"] == (64 if layers[n].in_features % 64 == 0 else 32)
    fresh = llama()  # dense: loading quantizes the recorded layers the same way
    load_adapter(fresh, path)
    assert all(is_quantized(la.base) for la in adapter_layers(fresh).values())
    tokens = ids()
    with torch.no_grad():
        want = model(input_ids=tokens).logits
        assert torch.equal(fresh(input_ids=tokens).logits, want)


def test_lora_plus_groups_hold_adapter_parameters_only():
    model = quantized("lora")
    groups = lora_plus_param_groups(model, lr=1e-3, lr_ratio=16.0)
    ids_in = {id(p) for g in groups for p in g["params"]}
    bases = {id(p) for la in adapter_layers(model).values() for p in la.base.parameters()}
    assert ids_in and not ids_in & bases
    assert {g["lr"] for g in groups} == {1e-3, 1.6e-2}


def test_dora_keeps_no_dense_copy_of_the_base():
    model = quantized("dora")
    for layer in adapter_layers(model).values():
        dense = layer.out_features * layer.in_features
        own = [t for n, t in layer.named_parameters() if not n.startswith("base.")]
        own += [t for n, t in layer.named_buffers() if not n.startswith("base.")]
        assert all(t.numel() < dense for t in own)
        torch.testing.assert_close(layer.base_norm_sq.sqrt(), layer.magnitude.detach())


def test_sltrain_pretraining_over_a_quantized_base_is_refused():
    from lightning_lowrank import SLTrain, inject

    model = llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="mode='adapter'"):
        inject(model, SLTrain(rank=4, mode="pretrain"), quantize_base="nf4")
    assert not adapter_layers(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
