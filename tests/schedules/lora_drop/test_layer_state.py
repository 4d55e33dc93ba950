"""The two layer states LoRA-drop sets through the adapter protocol (``methods/state.py``): a
disabled layer is its base (also on the fused paths), a tied layer computes with its host's
parameters. All math checks in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_lowrank import AdaLoRA, DoRA, LoRA, SingLoRA, SLTrain, VeRA
from lightning_lowrank.methods.base import weight_oi
from lightning_lowrank.methods.fused import LowRankLinear
from lightning_lowrank.methods.vera import VeRALinear

D = torch.float64
TOL = {"rtol": 1e-12, "atol": 1e-12}
CONFIGS = {
    "lora": LoRA(rank=3, alpha=5.0),
    "dora": DoRA(rank=3, alpha=5.0),
    "singlora": SingLoRA(rank=3, alpha=5.0, ramp_steps=10),
    "adalora": AdaLoRA(init_rank=3, target_rank=2, alpha=5.0),
    "vera": VeRA(rank=8, seed=0),
    "sltrain": SLTrain(rank=3, density=0.3, seed=0),
}


def _layers(kind: str, n: int = 1):
    torch.manual_seed(0)
    bases = {f"l{i}": nn.Linear(6, 10).to(D).requires_grad_(False) for i in range(n)}
    layers = list(CONFIGS[kind].build(bases).values())
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in layers:
            for p in layer.parameters():
                if p.requires_grad:  # B = 0 or b = 0 at init would hide a wrong path
                    p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.ndim == 1 else 0.0))
            if hasattr(layer, "step"):
                layer.set_step(3)  # SingLoRA mid-ramp
    return layers


def _count_fused(monkeypatch) -> list[int]:
    calls: list[int] = []
    for cls in (LowRankLinear, VeRALinear):
        original = cls.apply

        def counting(*args, original=original):
            calls.append(1)
            return original(*args)

        monkeypatch.setattr(cls, "apply", counting)
    return calls


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_a_disabled_layer_is_its_base_and_takes_no_fused_pass(monkeypatch, kind):
    (layer,) = _layers(kind)
    x = torch.randn(40, 6, dtype=D, requires_grad=True)  # 40 rows: VeRA prefers its fused order
    calls = _count_fused(monkeypatch)
    enabled = layer(x)
    assert not torch.allclose(enabled, layer.base(x))  # the adapter adds something
    fused_when_enabled = bool(calls)
    calls.clear()
    layer.disabled = True
    out = layer(x)
    torch.testing.assert_close(out, layer.base(x), rtol=0, atol=0)
    assert not calls, "a disabled layer took a fused pass"
    assert fused_when_enabled or kind == "sltrain"  # the fused path was live, and skipped
    # every trainable adapter parameter still gets a gradient (an exact zero): DDP's reducer
    trainable = [p for n, p in layer.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.sum(), trainable)
    assert all(torch.count_nonzero(g) == 0 for g in grads)
    # delta zero, merge adds nothing, unmerge takes nothing away
    assert torch.count_nonzero(layer.delta_weight()) == 0
    assert torch.count_nonzero(layer.merged_delta()) == 0
    factors = layer.low_rank_factors()
    if factors is not None:
        b, a, c = factors
        assert c == 0.0
        torch.testing.assert_close(c * b @ a, layer.delta_weight(), **TOL)
    w = weight_oi(layer.base).detach().clone()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(weight_oi(layer.base), w, rtol=0, atol=0)
    torch.testing.assert_close(layer(x), layer.base(x), rtol=0, atol=0)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(weight_oi(layer.base), w, rtol=0, atol=0)
    # and enabled again: the adapter is back, unchanged
    layer.disabled = False
    torch.testing.assert_close(layer(x), enabled, **TOL)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_a_tied_layer_computes_with_its_hosts_parameters(monkeypatch, kind):
    host, member = _layers(kind, 2)
    x = torch.randn(40, 6, dtype=D)
    # the reference: the member's own base with the host's adapter values, untied
    ref = _layers(kind, 2)[1]
    ref.load_state_dict({**member.state_dict(), **host.adapter_state_dict()})
    calls = _count_fused(monkeypatch)
    member.share_adapter(host)
    out = member(x)
    assert bool(calls) == (kind != "sltrain")  # the fused paths read the host's tensors too
    torch.testing.assert_close(out, ref(x), **TOL)
    torch.testing.assert_close(member.delta_weight(), ref.delta_weight(), **TOL)
    # the gradient goes to the host; the member's own parameters get an exact zero
    out.square().sum().backward()
    for name, p in member.named_parameters():
        if p.requires_grad:
            assert torch.count_nonzero(p.grad) == 0, name
            assert getattr(host, name).grad is not None and getattr(host, name).grad.abs().sum() > 0


def test_disabled_and_tied_layers_trace_under_torch_compile():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Linear(6, 6)).to(D)
    model.requires_grad_(False)
    layers = LoRA(rank=2).build({"0": model[0], "2": model[2], "3": model[3]})
    for name, layer in layers.items():
        with torch.no_grad():
            layer.lora_B.normal_()
        model[int(name)] = layer
    model[2].share_adapter(model[0])
    model[3].disabled = True
    x = torch.randn(5, 6, dtype=D)
    eager = model(x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, **TOL)


def test_a_copied_or_pickled_model_keeps_its_ties_inside_the_copy():
    import copy
    import pickle

    host, member = _layers("lora", 2)
    model = nn.ModuleList([host, member])
    member.share_adapter(host)
    x = torch.randn(4, 6, dtype=D)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone[1].adapter_host is clone[0]  # the copy's host, not the original
        assert clone[1].lora_B is clone[0].lora_B and clone[0].lora_B is not host.lora_B
        torch.testing.assert_close(clone[1](x), member(x), rtol=0, atol=0)
