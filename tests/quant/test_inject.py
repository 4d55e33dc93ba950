"""``inject(..., quantize_base="nf4")``: which layers are quantized and how small they get, models
already quantized by bitsandbytes adapted as they come, and no backend import until used."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from lightning_lowrank import DoRA, LoRA, adapter_layers, inject  # noqa: E402
from lightning_lowrank.methods.base import is_quantized  # noqa: E402
from lightning_lowrank.quant import NF4, dequantize, quant_format  # noqa: E402
from lightning_lowrank.quant.model import quantize_named  # noqa: E402
from tests.conftest import tiny_gpt2, tiny_llama  # noqa: E402
from tests.quant.helpers import TARGETS, ids, llama  # noqa: E402


def _storage_bytes(module: nn.Module) -> int:
    """Bytes of a layer's weight storage, the 4-bit payload and its quantisation state."""
    weight = module.weight
    total = weight.numel() * weight.element_size()
    state = getattr(weight, "quant_state", None)
    if state is not None:
        total += state.absmax.numel() * state.absmax.element_size() + state.code.numel() * 4
        if state.nested:
            total += state.state2.absmax.numel() * 4 + state.state2.code.numel() * 4
    return total


def test_adapted_layers_are_stored_in_nf4_and_others_untouched():
    model = llama()
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight")}
    names = inject(model, LoRA(rank=4), quantize_base="nf4")
    assert names
    for name, layer in adapter_layers(model).items():
        assert isinstance(layer.base, bnb.nn.Linear4bit) and quant_format(layer.base) == "nf4"
        w0 = dense[name]
        err = (dequantize(layer.base, torch.float32) - w0).abs().amax(dim=1)
        # blocks lie inside rows; NF4's widest gap between levels is 0.277 of a block's absmax,
        # so half of it plus the 8-bit absmax rounding (~0.015) bounds the error: 0.16 (a block
        # straddling two rows on the CPU decodes with errors up to 0.87)
        assert (err > 0).all() and (err <= 0.16 * w0.abs().amax(dim=1)).all()
    assert type(model.lm_head) is nn.Linear and torch.equal(model.lm_head.weight, dense["lm_head"])
    assert type(model.model.embed_tokens) is nn.Embedding


def test_base_weight_bytes_are_under_a_third_of_float32():
    # in_features 256: blocks of 64 and double quantisation as in QLoRA
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256))
    inject(model, LoRA(rank=4), target_modules=["0", "2"], quantize_base="nf4")
    for layer in adapter_layers(model).values():
        ratio = _storage_bytes(layer.base) / (layer.out_features * layer.in_features * 4)
        assert ratio <= 0.3, ratio
        # 4 bits (12.5 % of float32), an 8-bit absmax per 64 weights (0.4 %), code tables (0.2 %)
        assert ratio < 0.135


def test_outputs_at_init_equal_the_quantized_model():
    plain = llama()
    quantize_named(
        plain, {n: NF4() for n, m in plain.named_modules() if n.endswith(tuple(TARGETS))}
    )
    model = llama()
    inject(model, LoRA(rank=4), target_modules=TARGETS, quantize_base="nf4")
    tokens = ids()
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens).logits, plain(input_ids=tokens).logits)


def test_frozen_linear_option_quantizes_the_rest_but_not_the_head():
    model = llama()
    inject(model, LoRA(rank=4), target_modules=["q_proj"], quantize_base=NF4(frozen_linear=True))
    others = [n for n, m in model.named_modules() if n.endswith(("k_proj", "o_proj", "gate_proj"))]
    assert others and all(quant_format(model.get_submodule(n)) == "nf4" for n in others)
    assert type(model.lm_head) is nn.Linear
    model = llama()
    inject(
        model,
        LoRA(rank=4),
        target_modules=["q_proj"],
        quantize_base=NF4(frozen_linear=True, head=True),
    )
    assert quant_format(model.lm_head) == "nf4"


def test_trainable_modules_are_not_quantized():
    model = llama()
    inject(
        model,
        LoRA(rank=4),
        target_modules=["q_proj"],
        train_modules=["lm_head", "o_proj"],
        quantize_base=NF4(frozen_linear=True, head=True),
    )
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.requires_grad
    assert type(model.model.layers[0].self_attn.o_proj) is nn.Linear


def test_layers_the_backend_cannot_take_stay_dense_with_a_warning():
    model = tiny_gpt2()  # GPT-2's Conv1D
    with pytest.warns(UserWarning, match="Conv1D is not a plain nn.Linear"):
        inject(model, LoRA(rank=2), target_modules=["c_attn"], quantize_base="nf4")
    assert not any(is_quantized(la.base) for la in adapter_layers(model).values())
    model = tiny_llama()  # hidden size 16: no absmax block of >= 32 weights fits in a row
    with pytest.warns(UserWarning, match="in_features=16 is not a multiple of 32"):
        inject(model, LoRA(rank=2), target_modules=["q_proj", "down_proj"], quantize_base="nf4")
    layers = adapter_layers(model)
    assert not is_quantized(layers["model.layers.0.self_attn.q_proj"].base)
    assert is_quantized(layers["model.layers.0.mlp.down_proj"].base)  # 32 inputs: blocks of 32
    assert layers["model.layers.0.mlp.down_proj"].base.weight.quant_state.blocksize == 32


def test_bad_quantize_base_is_refused_before_anything_changes():
    model = llama()
    with pytest.raises(ValueError, match="'nf4'"):
        inject(model, LoRA(rank=4), quantize_base="int3")
    assert not adapter_layers(model)
    with pytest.raises(ValueError, match="blocksize"):
        NF4(blocksize=48)


def _from_transformers(tmp_path, **config):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    llama().save_pretrained(tmp_path / "tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(
            tmp_path / "tiny",
            quantization_config=BitsAndBytesConfig(**config),
            device_map="cpu",
            dtype=torch.float32,
        )


@pytest.mark.parametrize(
    "config",
    [
        {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
        {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
        {"load_in_8bit": True},
    ],
    ids=["nf4", "fp4", "int8"],
)
@pytest.mark.parametrize("method", [LoRA(rank=4), DoRA(rank=4)], ids=["lora", "dora"])
def test_models_quantized_by_transformers_are_adapted_as_they_come(config, method, tmp_path):
    model = _from_transformers(tmp_path, **config)
    tokens = ids()
    with torch.no_grad():
        want = model(input_ids=tokens).logits
    targets = {n: type(m) for n, m in model.named_modules() if n.endswith(tuple(TARGETS))}
    assert set(targets.values()) == {
        bnb.nn.Linear8bitLt if "load_in_8bit" in config else bnb.nn.Linear4bit
    }
    inject(model, method, target_modules=TARGETS)
    layers = adapter_layers(model)
    assert {n: type(la.base) for n, la in layers.items()} == targets  # the very same layers
    assert all(is_quantized(la.base) for la in layers.values())
    got = model(input_ids=tokens).logits
    if isinstance(method, LoRA):
        assert torch.equal(got.detach(), want)  # B = 0: exactly the quantized model's outputs
    else:  # DoRA's m / ||W0|| is 1 to rounding
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.pow(2).mean().backward()
    assert all(la.lora_B.grad is not None for la in layers.values())


def test_importing_the_library_loads_no_backend_and_prints_nothing():
    code = (
        "import sys, lightning_lowrank, lightning_lowrank.quant;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('bitsandbytes', 'torchao')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    assert done.stderr == ""
