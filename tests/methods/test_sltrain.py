"""SLTrain in float64: W0 + s * B @ A + S (adapter) and s * B @ A + S (pre-training)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_lowrank import (
    SLTrain,
    adapter_layers,
    inject,
    load_adapter,
    merge,
    save_adapter,
    sltrain_pretrain,
    trainable_parameter_count,
    unload,
    unmerge,
)
from lightning_lowrank.io import read_adapter
from lightning_lowrank.methods.sltrain import SLTrainLayer, SparseLinearFunction, sparse_support
from tests.conftest import MLP, tiny_bert, tiny_gpt2, tiny_llama


def _perturb(layer: SLTrainLayer) -> None:
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
        layer.sparse_values.normal_()


def _dense_sparse(layer: SLTrainLayer) -> torch.Tensor:
    s = torch.zeros(layer.out_features * layer.in_features, dtype=layer.sparse_values.dtype)
    s[layer.sparse_index] = layer.sparse_values.detach()
    return s.view(layer.out_features, layer.in_features)


@pytest.mark.parametrize("scaling", ["standard", "rslora"])
def test_adapter_output_equals_base_plus_dense_delta(scaling):
    torch.manual_seed(0)
    base = nn.Linear(12, 10).double()
    layer = SLTrainLayer(base, SLTrain(rank=3, alpha=6.0, density=0.2, scaling=scaling), name="l")
    x = torch.randn(4, 2, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)  # B = 0, S = 0
    assert layer.nnz == round(0.2 * 120)
    _perturb(layer)
    s = 6.0 / 3 if scaling == "standard" else 6.0 / math.sqrt(3)
    dw = s * layer.lora_B.detach() @ layer.lora_A.detach() + _dense_sparse(layer)
    torch.testing.assert_close(
        layer(x), x @ (base.weight + dw).T + base.bias, rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(layer.delta_weight(), dw, rtol=1e-12, atol=1e-12)


def test_sparse_gradient_is_gathered_dense_gradient():
    torch.manual_seed(1)
    out_f, in_f = 7, 9
    idx = sparse_support(out_f, in_f, 0.3, seed=0, name="x")
    values = torch.randn(idx.numel(), dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 3, in_f, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda v, x: SparseLinearFunction.apply(x, v, idx, out_f), (values, x))
    # the same as autograd through a dense weight, gathered at the support
    dense = torch.zeros(out_f * in_f, dtype=torch.float64)
    dense[idx] = values.detach()
    dense = dense.view(out_f, in_f).requires_grad_()
    g = torch.randn(5, 3, out_f, dtype=torch.float64)
    (x.detach() @ dense.T).backward(g)
    SparseLinearFunction.apply(x.detach(), values, idx, out_f).backward(g)
    torch.testing.assert_close(values.grad, dense.grad.view(-1)[idx])


def test_backward_saves_no_dense_weight():
    """S is rebuilt in backward: autograd keeps x, the values and the indices, nothing (out, in)."""
    out_f, in_f = 64, 48
    idx = sparse_support(out_f, in_f, 0.05, seed=0, name="x")
    values = torch.randn(idx.numel(), requires_grad=True)
    saved: list[tuple[int, ...]] = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(tuple(t.shape)) or t, lambda t: t
    ):
        y = SparseLinearFunction.apply(torch.randn(2, in_f), values, idx, out_f)
    y.sum().backward()
    assert (out_f, in_f) not in saved and all(math.prod(s) < out_f * in_f for s in saved)


def test_support_is_fixed_per_layer_and_seed():
    a = sparse_support(20, 30, 0.05, seed=0, name="layer.0")
    assert torch.equal(a, sparse_support(20, 30, 0.05, seed=0, name="layer.0"))
    assert not torch.equal(a, sparse_support(20, 30, 0.05, seed=0, name="layer.1"))
    assert not torch.equal(a, sparse_support(20, 30, 0.05, seed=1, name="layer.0"))
    assert a.numel() == 30 and a.unique().numel() == 30


def test_parameter_count_and_merge_unmerge():
    torch.manual_seed(2)
    model = tiny_gpt2().double()  # Conv1D layers
    inject(model, SLTrain(rank=2, density=0.05), target_modules="all-linear")
    layers = adapter_layers(model)
    expected = sum(
        2 * (la.in_features + la.out_features) + round(0.05 * la.in_features * la.out_features)
        for la in layers.values()
    )
    assert trainable_parameter_count(model) == expected
    for la in layers.values():
        _perturb(la)
    ids = torch.randint(0, 64, (2, 6))
    before = model(ids).logits
    w0 = {n: la.base.weight.detach().clone() for n, la in layers.items()}
    merge(model)
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-10, atol=1e-10)
    unmerge(model)
    for n, la in layers.items():
        torch.testing.assert_close(la.base.weight, w0[n], rtol=1e-12, atol=1e-12)


def test_save_load_round_trip_and_support_check(tmp_path):
    torch.manual_seed(3)
    model = tiny_bert()
    config = SLTrain(rank=2, density=0.1, seed=5, train_a=False)
    inject(model, config, target_modules=["query", "value"])
    for la in adapter_layers(model).values():
        _perturb(la)
    ids = torch.randint(0, 64, (2, 5))
    expected = model(ids).logits
    path = save_adapter(model, tmp_path / "sl.safetensors")
    tensors, meta = read_adapter(path)
    assert all(k.endswith(("lora_A", "lora_B", "sparse_values")) for k in tensors)
    assert all("support_hash" in m for m in meta["layers"].values())
    fresh = tiny_bert()
    load_adapter(fresh, path)
    torch.testing.assert_close(fresh(ids).logits, expected, rtol=1e-5, atol=1e-6)
    base = tiny_bert().bert.encoder.layer[0].attention.self.query
    with pytest.raises(ValueError, match="sparse support"):
        SLTrainLayer(base, config, name="other", support_hash=123)


def test_only_adapter_parameters_change():
    torch.manual_seed(4)
    model = tiny_bert()
    inject(model, SLTrain(rank=2, density=0.1), target_modules=["query", "value"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        loss = model(torch.randint(0, 64, (4, 6)), labels=torch.tensor([0, 1, 2, 0])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {n.rsplit(".", 1)[-1] for n in changed} == {"lora_A", "lora_B", "sparse_values"}


# --- pre-training mode -----------------------------------------------------------------------
def test_pretrain_mode_removes_the_dense_weight():
    torch.manual_seed(5)
    model = tiny_llama()
    names = sltrain_pretrain(model, rank=4, alpha=8.0, density=0.1)
    layer = adapter_layers(model)[names[0]]
    assert "weight" not in dict(layer.base.named_parameters())
    assert not any(n.endswith(f"{names[0]}.base.weight") for n in model.state_dict())
    bound = 1 / math.sqrt(layer.in_features)
    assert 0 < layer.sparse_values.abs().max() <= bound
    # everything else trains: embeddings, norms, the output head
    assert all(p.requires_grad for p in model.parameters())
    per_layer = sum(
        4 * (la.in_features + la.out_features) + la.nnz for la in adapter_layers(model).values()
    )
    others = sum(
        p.numel()
        for n, p in model.named_parameters()
        if not any(n.startswith(k + ".") for k in names)
    )
    assert trainable_parameter_count(model) == per_layer + others
    x = torch.randn(3, layer.in_features)
    w = layer.scale * layer.lora_B @ layer.lora_A + _dense_sparse(layer)
    torch.testing.assert_close(layer(x), x @ w.T)


def test_pretrain_trains_and_unloads_to_plain_layers():
    torch.manual_seed(6)
    model = MLP()
    sltrain_pretrain(model, rank=2, alpha=4.0, density=0.2, target_modules=["fc1", "fc2"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 20, (8, 5))
    target = torch.randint(0, 3, (8,))
    losses = []
    for _ in range(20):
        loss = nn.functional.cross_entropy(model(ids), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert adapter_layers(model)["fc1"].base.bias.grad is not None  # biases train too
    expected = model(ids)
    unload(model)
    assert isinstance(model.fc1, nn.Linear) and model.fc1.weight.shape == (16, 12)
    torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-6)


def test_pretrain_on_conv1d_merge_unmerge():
    torch.manual_seed(7)
    model = tiny_gpt2()
    sltrain_pretrain(model, rank=2, density=0.1)
    ids = torch.randint(0, 64, (2, 5))
    expected = model(ids).logits
    merge(model)
    conv = model.transformer.h[0].attn.c_attn.base
    assert conv.weight.shape == (16, 48)  # Conv1D stores (in, out)
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    unmerge(model)
    assert "weight" not in dict(conv.named_parameters())
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-6, atol=1e-6)


def test_invalid_configs():
    with pytest.raises(ValueError, match="density"):
        SLTrain(density=1.5)
    with pytest.raises(ValueError, match="mode"):
        SLTrain(mode="finetune")
    with pytest.raises(ValueError, match="exclude_modules"):
        inject(MLP(), SLTrain(rank=2), target_modules=["embed"])


def test_zero_density_is_pure_low_rank():
    torch.manual_seed(8)
    base = nn.Linear(6, 4).double()
    layer = SLTrainLayer(base, SLTrain(rank=2, density=0.0), name="l")
    _perturb(layer)
    assert layer.nnz == 0
    x = torch.randn(3, 6, dtype=torch.float64)
    dw = layer.scale * layer.lora_B.detach() @ layer.lora_A.detach()
    torch.testing.assert_close(layer(x), x @ (base.weight + dw).T + base.bias)


def test_pure_low_rank_pretraining_is_not_stuck_at_zero():
    """Density 0 in pre-training: B = 0 would make every weight 0, and two stacked zero layers
    pass each other no gradient, so nothing would ever train. B starts random instead, with
    s * B @ A at nn.Linear's entry variance 1/(3 in)."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64)).double()
    sltrain_pretrain(model, rank=32, alpha=8.0, density=0.0)
    layers = list(adapter_layers(model).values())
    x = torch.randn(16, 64, dtype=torch.float64)
    model(x).pow(2).sum().backward()
    for layer in layers:
        assert layer.nnz == 0
        assert layer.lora_A.grad.abs().max() > 0 and layer.lora_B.grad.abs().max() > 0
    first = layers[0]
    w = (first.scale * first.lora_B @ first.lora_A).detach()
    # the entries' variance is 1/(3 * 64); 16,384 samples put the estimate within about 2 %
    # (the entries are not independent, hence the looser 15 %)
    assert abs(w.var().item() * 3 * 64 - 1.0) < 0.15
    # with a sparse part, B starts at zero as the paper says
    sparse = nn.Sequential(nn.Linear(8, 8))
    sltrain_pretrain(sparse, rank=2, density=0.1)
    assert torch.equal(sparse[0].lora_B, torch.zeros(8, 2))
