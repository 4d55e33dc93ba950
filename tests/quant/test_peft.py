"""``export_peft`` over a quantized base: PEFT loads the adapter onto the same 4-bit base and
computes what this library computes (LoRA, and DoRA against PEFT's QDoRA); the file notes the
base's quantisation in its safetensors metadata, which PEFT ignores."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

from safetensors import safe_open  # noqa: E402

from lightning_lowrank import adapter_layers, export_peft  # noqa: E402
from lightning_lowrank.quant import NF4  # noqa: E402
from lightning_lowrank.quant.model import quantize_named  # noqa: E402
from tests.quant.helpers import TARGETS, ids, llama, quantized, randomise  # noqa: E402


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_peft_over_the_same_4bit_base_computes_the_same(name, tmp_path):
    model = quantized(name)
    randomise(model)
    export_peft(model, tmp_path / "peft")
    with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), framework="pt") as f:
        note = json.loads(f.metadata()["base_quantization"])
    assert set(note) == set(adapter_layers(model))
    assert {f["format"] for f in note.values()} == {"nf4"}

    base = llama()
    quantize_named(base, {n: NF4() for n in adapter_layers(model)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    tokens = ids()
    with torch.no_grad():
        want = model(input_ids=tokens).logits
        got = theirs(input_ids=tokens).logits
    # PEFT's QDoRA dequantizes the whole weight for its norm each forward; ours keeps ||W0||^2
    # and computes W0 A^T through the 4-bit matmul: the same to float32 rounding
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_dense_base_writes_no_note(tmp_path):
    from lightning_lowrank import LoRA, inject

    model = llama()
    inject(model, LoRA(rank=4), target_modules=TARGETS)
    export_peft(model, tmp_path / "peft")
    with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), framework="pt") as f:
        assert "base_quantization" not in f.metadata()
