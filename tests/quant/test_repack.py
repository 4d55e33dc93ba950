"""bitsandbytes' eval-mode repack on AVX512-BF16 CPUs: an eval forward without gradients
rewrites a ``Linear4bit``'s weight in place into a kernel layout (absmax in bfloat16), after which
``dequantize_4bit`` reads garbage. Every path here that dequantizes (unload, DoRA's norm,
analysis, adapter files) must stay right after train -> eval -> merge.

The repack only happens on such CPUs; elsewhere it is applied by hand with bitsandbytes' own
conversion, exactly as its forward does."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes")

from bitsandbytes import functional as bf  # noqa: E402

from lightning_lowrank import adapter_layers, load_adapter, save_adapter, unload  # noqa: E402
from lightning_lowrank.analysis import adapted_weights  # noqa: E402
from lightning_lowrank.quant import dequantize  # noqa: E402
from tests.quant.helpers import ids, llama, loss_and_grads, quantized, randomise  # noqa: E402


def _repack(model) -> None:
    """What an eval-mode forward does to every 4-bit base on an AVX512-BF16 CPU."""
    for layer in adapter_layers(model).values():
        weight = layer.base.weight
        weight.data, weight.quant_state = bf._convert_weight_packed_for_cpu(
            weight.data, weight.quant_state
        )


def test_dequantize_reads_a_repacked_weight():
    model = quantized("lora")
    before = {n: dequantize(la.base, torch.float32) for n, la in adapter_layers(model).items()}
    blocks = {n: la.base.weight.quant_state.blocksize for n, la in adapter_layers(model).items()}
    _repack(model)
    for name, layer in adapter_layers(model).items():
        state = layer.base.weight.quant_state
        assert state.packing_format_for_cpu
        # bitsandbytes' own decoder is wrong now: the failure this guards against
        raw = bf.dequantize_4bit(layer.base.weight.data, state)
        assert (raw.shape != before[name].shape) or (raw - before[name]).abs().max() > 1e-3
        got = dequantize(layer.base, torch.float32)
        # the same codes times the absmax in bfloat16: |w| <= absmax, relative rounding 2^-8
        absmax = (
            before[name].abs().reshape(-1, blocks[name]).amax(dim=1).repeat_interleave(blocks[name])
        )
        err = (got - before[name]).abs().reshape(-1)
        assert (err <= absmax * 2**-8 + 1e-12).all(), name
        # and it is exactly what a fresh decode of the packed absmax gives
        want = before[name].reshape(-1, blocks[name])
        scale = state.absmax.t().reshape(-1).float() / want.abs().amax(dim=1).clamp_min(1e-30)
        torch.testing.assert_close(
            got.reshape(-1, blocks[name]), want * scale[:, None], rtol=1e-6, atol=1e-9
        )
        assert layer.base.weight.quant_state.packing_format_for_cpu  # the layer is left as is


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_train_eval_then_unload_analysis_and_files_are_right(name, tmp_path):
    model = quantized(name)
    randomise(model)
    tokens = ids()
    model.train()
    out, _ = loss_and_grads(model, tokens)  # a training-mode forward and backward
    model.eval()
    with torch.no_grad():
        want = model(input_ids=tokens).logits  # the eval forward (repacks on AVX512-BF16)
    path = save_adapter(model, tmp_path / "a.safetensors")
    _repack(model)  # here: as that CPU would have
    for layer in adapter_layers(model).values():
        w0, w = adapted_weights(layer)
        assert torch.isfinite(w).all() and (w0 - dequantize(layer.base)).abs().max() == 0
    fresh = llama()
    load_adapter(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(input_ids=tokens).logits, want)
    unload(model, dtype=torch.float32)
    with torch.no_grad():
        got = model(input_ids=tokens).logits
    # the packed absmax is bfloat16: the unloaded weights differ from the float32 decode by at
    # most 2^-8 relative, which moves these logits (of order 1) by well under 1e-2
    torch.testing.assert_close(got, want, rtol=0, atol=1e-2)
