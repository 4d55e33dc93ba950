"""DoRA in float64: W' = m * (W0 + s B A) / ||W0 + s B A||_row, the norm detached and factored."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_lowrank import (
    DoRA,
    LoRA,
    adapter_layers,
    inject,
    load_adapter,
    merge,
    save_adapter,
    trainable_parameter_count,
    unmerge,
)
from lightning_lowrank.methods.dora import DoRALayer
from lightning_lowrank.methods.lora import LoRALayer
from tests.conftest import tiny_bert, tiny_gpt2


def _perturb(layer: nn.Module) -> None:
    with torch.no_grad():
        for p in layer.parameters():
            if p is not getattr(layer.base, "weight", None) and p is not getattr(
                layer.base, "bias", None
            ):
                p.add_(torch.randn_like(p) * 0.5)


def _dense_dora_weight(w0: torch.Tensor, m: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
    v = w0 + dw
    return m[:, None] * v / v.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("scaling", ["standard", "rslora"])
def test_output_equals_dense_formula(scaling):
    torch.manual_seed(0)
    base = nn.Linear(9, 6).double()
    layer = DoRALayer(base, DoRA(rank=3, alpha=6.0, scaling=scaling))
    x = torch.randn(4, 2, 9, dtype=torch.float64)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-12, atol=1e-12)  # m = ||W0||, B = 0
    torch.testing.assert_close(layer.magnitude, base.weight.norm(dim=1))
    _perturb(layer)
    s = 6.0 / 3 if scaling == "standard" else 6.0 / math.sqrt(3)
    dw = s * layer.lora_B.detach() @ layer.lora_A.detach()
    w = _dense_dora_weight(base.weight.detach(), layer.magnitude.detach(), dw)
    torch.testing.assert_close(layer(x), x @ w.T + base.bias, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.delta_weight(), w - base.weight, rtol=1e-10, atol=1e-10)


def test_factored_norm_equals_dense_norm():
    torch.manual_seed(1)
    base = nn.Linear(40, 24).double()
    layer = DoRALayer(base, DoRA(rank=5, alpha=3.0))
    _perturb(layer)
    dense = (base.weight + layer.scale * layer.lora_B @ layer.lora_A).norm(dim=1)
    torch.testing.assert_close(layer.weight_norm(), dense.detach(), rtol=1e-12, atol=1e-12)
    assert not layer.weight_norm().requires_grad


def test_norm_is_detached_in_backward():
    """Gradients match the dense formula with ||V|| treated as a constant (paper, Sec. 4.3)."""
    torch.manual_seed(2)
    base = nn.Linear(8, 5).double()
    layer = DoRALayer(base, DoRA(rank=2, alpha=2.0))
    _perturb(layer)
    x = torch.randn(6, 8, dtype=torch.float64)
    layer(x).square().sum().backward()
    got = [layer.lora_A.grad.clone(), layer.lora_B.grad.clone(), layer.magnitude.grad.clone()]
    a = layer.lora_A.detach().clone().requires_grad_()
    b = layer.lora_B.detach().clone().requires_grad_()
    m = layer.magnitude.detach().clone().requires_grad_()
    v = base.weight.detach() + layer.scale * b @ a
    w = m[:, None] * v / v.norm(dim=1, keepdim=True).detach()
    (x @ w.T + base.bias.detach()).square().sum().backward()
    for g, ref in zip(got, [a.grad, b.grad, m.grad], strict=True):
        torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-10)


class _NewTensors(TorchDispatchMode):
    """Records the shape of every tensor an aten op allocates (views of its inputs excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = torch.utils._pytree.tree_leaves((args, kwargs))
        inputs = {t.untyped_storage().data_ptr() for t in flat if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.shapes.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_no_out_by_in_temporary_in_forward_or_backward(kind, monkeypatch):
    torch.manual_seed(0)
    if kind == "linear":
        base = nn.Linear(96, 64)
    else:
        base = tiny_gpt2().transformer.h[0].mlp.c_fc  # Conv1D (16 -> 64)
    base.requires_grad_(False)  # frozen, as inject leaves it
    layer = DoRALayer(base, DoRA(rank=4))
    _perturb(layer)
    out_f, in_f = layer.out_features, layer.in_features
    monkeypatch.setattr(DoRALayer, "delta_weight", lambda self: pytest.fail("dense path used"))
    x = torch.randn(2, in_f)  # 2 tokens: any (out, in)-sized tensor would stand out
    with _NewTensors() as mode:
        layer(x).sum().backward()
    big = [(f, s) for f, s in mode.shapes if math.prod(s) >= out_f * in_f]
    assert not big, f"(out, in)-sized temporaries were built: {big}"
    assert layer.lora_A.grad is not None and layer.magnitude.grad is not None


def test_merge_unmerge_exact():
    torch.manual_seed(3)
    model = tiny_bert().double()
    inject(model, DoRA(rank=2, alpha=4.0), target_modules=["query", "value", "dense"])
    for layer in adapter_layers(model).values():
        _perturb(layer)
    ids = torch.randint(0, 64, (2, 7))
    before = model(ids).logits
    originals = {n: la.base.weight.detach().clone() for n, la in adapter_layers(model).items()}
    merge(model)
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-10, atol=1e-10)
    unmerge(model)
    for n, la in adapter_layers(model).items():
        torch.testing.assert_close(la.base.weight, originals[n], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-12, atol=1e-12)


def test_merged_weight_is_magnitude_times_direction():
    torch.manual_seed(4)
    base = nn.Linear(6, 4).double()
    layer = DoRALayer(base, DoRA(rank=2))
    _perturb(layer)
    dw = layer.scale * layer.lora_B.detach() @ layer.lora_A.detach()
    expected = _dense_dora_weight(base.weight.detach().clone(), layer.magnitude.detach(), dw)
    layer.merge()
    torch.testing.assert_close(base.weight.detach(), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(base.weight.norm(dim=1), layer.magnitude.detach())


def test_parameter_count_is_lora_plus_out():
    def count(method):
        model = tiny_bert()
        inject(model, method, target_modules="all-linear")
        return trainable_parameter_count(model), adapter_layers(model)

    n_lora, _ = count(LoRA(rank=4))
    n_dora, layers = count(DoRA(rank=4))
    assert n_dora == n_lora + sum(la.out_features for la in layers.values())
    assert set(next(iter(layers.values())).param_sides()) == {"lora_A", "lora_B", "magnitude"}


def test_only_adapter_parameters_change_in_training():
    torch.manual_seed(5)
    model = tiny_bert()
    inject(model, DoRA(rank=2), target_modules=["query", "value"])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(0, 64, (4, 6))
    for _ in range(3):
        loss = model(ids, labels=torch.tensor([0, 1, 2, 0])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert all(n.endswith(("lora_A", "lora_B", "magnitude")) for n in trainable)
    assert any(not torch.equal(dict(model.named_parameters())[n], v) for n, v in trainable.items())


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(6)
    model = tiny_bert()
    config = DoRA(rank=2, alpha=3.0, scaling="rslora", train_a=False)
    inject(model, config, target_modules=["query", "value"])
    for layer in adapter_layers(model).values():
        _perturb(layer)
    ids = torch.randint(0, 64, (2, 5))
    expected = model(ids).logits
    path = save_adapter(model, tmp_path / "dora.safetensors")
    fresh = tiny_bert()
    load_adapter(fresh, path)
    assert next(iter(adapter_layers(fresh).values())).config == config
    torch.testing.assert_close(fresh(ids).logits, expected, rtol=1e-5, atol=1e-6)


def test_embedding_and_dropout():
    torch.manual_seed(7)
    emb = nn.Embedding(10, 4).double()
    layer = DoRALayer(emb, DoRA(rank=2))
    ids = torch.randint(0, 10, (3, 5))
    torch.testing.assert_close(layer(ids), emb(ids), rtol=1e-12, atol=1e-12)
    _perturb(layer)
    w = _dense_dora_weight(
        emb.weight.detach().t(), layer.magnitude.detach(), layer.scale * layer.lora_B @ layer.lora_A
    )
    torch.testing.assert_close(layer(ids), w.t()[ids].detach(), rtol=1e-10, atol=1e-10)
    drop = DoRALayer(nn.Linear(5, 3), DoRA(rank=2, dropout=0.5)).eval()
    x = torch.randn(2, 5)
    torch.testing.assert_close(drop(x), drop.base(x))  # eval: no dropout, B = 0


def test_invalid_configs_name_the_fix():
    with pytest.raises(ValueError, match="delta must be one of"):
        DoRA(delta="vera")
    with pytest.raises(ValueError, match="dropout=0"):
        DoRA(delta="singlora", dropout=0.1)
    with pytest.raises(ValueError, match="scaling"):
        DoRA(scaling="sqrt")


def test_lora_layer_is_the_delta():
    layer = DoRALayer(nn.Linear(5, 3), DoRA(rank=2))
    assert isinstance(layer, LoRALayer)
