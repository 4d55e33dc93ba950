"""The adapter contract over a quantized base, for every registered method config.

The examples of ``tests/methods/test_contract.py`` (``AdapterConfig.examples()`` of every
registered config) are injected with ``quantize_base="nf4"`` into a float32 model whose three
layers (out > in, out < in, square) have ``in_features`` a multiple of 32, and must satisfy:

- identity at initialisation with the quantized model, where the method has it;
- exactly the parameters named by ``param_sides()`` train, nothing of the base;
- the forward adds ``merged_delta()`` to ``dequantize(W0) x`` (float32, tolerance ``1e-5``);
- ``unload(model, dtype=torch.float32)`` gives the same outputs; ``merge`` is refused;
- an adapter file loads onto a fresh dense model exactly (the base quantized the same way);
- PEFT export is exact over the same 4-bit base, or a refusal that gives its reason.

Configs that cannot run over a quantized base (SLTrain's pre-training mode) must be refused with
the reason, leaving the model unchanged.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("bitsandbytes")

from lightning_lowrank import (  # noqa: E402
    AdapterConfig,
    adapter_layers,
    export_peft,
    import_peft,
    inject,
    load_adapter,
    merge,
    save_adapter,
    set_step,
    unload,
)
from lightning_lowrank.methods.layers import is_quantized  # noqa: E402
from lightning_lowrank.peft import PeftExportError  # noqa: E402
from lightning_lowrank.quant import NF4, dequantize  # noqa: E402
from lightning_lowrank.quant.model import quantize_named  # noqa: E402
from tests.methods.test_contract import EXAMPLES, perturb_adapters  # noqa: E402
from tests.methods.test_contract import Net as ContractNet  # noqa: E402

TARGETS = ["up", "down", "square"]
ATOL = RTOL = 1e-5


def Net() -> nn.Module:  # noqa: N802 - the contract suite's model, with widths NF4 can store
    return ContractNet(width=32, wide=64)


def inputs() -> torch.Tensor:
    return torch.randn(5, 32, generator=torch.Generator().manual_seed(1))


def quantized_base() -> nn.Module:
    model = Net()
    quantize_named(model, {n: NF4() for n in TARGETS})
    return model


def pretrains(config: AdapterConfig) -> bool:
    return getattr(config, "mode", None) == "pretrain"


def adapted(config: AdapterConfig) -> nn.Module:
    model = Net()
    inject(model, copy.deepcopy(config), TARGETS, quantize_base="nf4")
    return model


def perturbed(config: AdapterConfig, seed: int = 2) -> nn.Module:
    return perturb_adapters(adapted(config), seed)


@pytest.fixture
def runnable(request):
    config = request.param
    if pretrains(config):
        pytest.skip("pre-training replaces the base: refused (test_refusals)")
    return config


@pytest.mark.parametrize("config", EXAMPLES)
def test_refusals_or_quantized_bases(config):
    model = Net()
    if pretrains(config):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match="mode='adapter'"):
            inject(model, copy.deepcopy(config), TARGETS, quantize_base="nf4")
        assert not adapter_layers(model)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        return
    inject(model, copy.deepcopy(config), TARGETS, quantize_base="nf4")
    assert all(is_quantized(layer.base) for layer in adapter_layers(model).values())


@pytest.mark.parametrize("runnable", EXAMPLES, indirect=True)
def test_identity_at_init_with_the_quantized_model(runnable):
    if not runnable.identity_at_init:
        pytest.skip(f"{runnable} does not start from the base model (by design)")
    x = inputs()
    with torch.no_grad():
        got, want = adapted(runnable)(x), quantized_base()(x)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("runnable", EXAMPLES, indirect=True)
def test_exactly_param_sides_train(runnable):
    model = adapted(runnable)
    expected = {
        f"{name}.{pname}"
        for name, layer in adapter_layers(model).items()
        for pname in layer.param_sides()
    }
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    model(inputs()).square().sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in expected)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in expected)


@pytest.mark.parametrize("runnable", EXAMPLES, indirect=True)
def test_forward_adds_merged_delta_to_the_dequantized_base(runnable):
    model = perturbed(runnable)
    x = torch.randn(4, 3, 64, generator=torch.Generator().manual_seed(3))
    for layer in adapter_layers(model).values():
        xi = x[..., : layer.in_features]
        weight = dequantize(layer.base, torch.float32) + layer.merged_delta()
        with torch.no_grad():
            torch.testing.assert_close(
                layer(xi), F.linear(xi, weight, layer.base.bias), rtol=RTOL, atol=ATOL
            )


@pytest.mark.parametrize("runnable", EXAMPLES, indirect=True)
def test_unload_gives_the_same_outputs_and_merge_is_refused(runnable):
    model = perturbed(runnable)
    x = inputs()
    with torch.no_grad():
        out = model(x)
    with pytest.raises(ValueError, match=r"unload\(model, dtype="):
        merge(model)
    unload(model, dtype=torch.float32)
    assert all(type(model.get_submodule(n)) is nn.Linear for n in TARGETS)
    with torch.no_grad():
        torch.testing.assert_close(model(x), out, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("runnable", EXAMPLES, indirect=True)
def test_file_loads_onto_a_fresh_dense_model_exactly(runnable, tmp_path):
    model = perturbed(runnable)
    path = save_adapter(model, tmp_path / "adapter.safetensors")
    other = Net()
    assert sorted(load_adapter(other, path)) == sorted(adapter_layers(model))
    set_step(other, 5)
    x = inputs()
    with torch.no_grad():
        assert torch.equal(other(x), model(x))


@pytest.mark.parametrize("runnable", EXAMPLES, indirect=True)
def test_peft_export_is_exact_over_the_same_base_or_refused(runnable, tmp_path):
    model = perturbed(runnable)
    try:
        export_peft(model, tmp_path / "peft")
    except PeftExportError as err:
        assert len(str(err)) > 20, "a refusal must say why"
        return
    other = quantized_base()
    import_peft(other, tmp_path / "peft")
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), rtol=RTOL, atol=ATOL)
