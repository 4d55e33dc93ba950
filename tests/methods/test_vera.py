"""VeRA in float64: dW = diag(b) B[:out] diag(d) A[:, :in] with one shared, seeded random pair."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_lowrank import (
    VeRA,
    adapter_layers,
    inject,
    load_adapter,
    merge,
    save_adapter,
    trainable_parameter_count,
    unmerge,
)
from lightning_lowrank.io import read_adapter
from lightning_lowrank.methods.vera import SharedProjection
from tests.conftest import MLP, tiny_bert, tiny_gpt2


def _perturb(model: nn.Module) -> None:
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.vera_lambda_d.normal_()
            layer.vera_lambda_b.normal_()


def test_output_equals_base_plus_dense_delta():
    torch.manual_seed(0)
    model = MLP().double()  # fc1: 12 -> 16, fc2: 16 -> 12
    base = {n: model.get_submodule(n) for n in ("fc1", "fc2")}
    ids = torch.randint(0, 20, (3, 5))
    expected = model(ids)
    inject(model, VeRA(rank=32, seed=3), target_modules=["fc1", "fc2"])
    torch.testing.assert_close(model(ids), expected, rtol=0, atol=0)  # b = 0 at init
    _perturb(model)
    # the pair regenerated independently from the seed: (r, in_max = 16), (out_max = 16, r)
    ref = SharedProjection(32, in_max=16, out_max=16, seed=3, dtype=torch.float64)
    for name, layer in adapter_layers(model).items():
        out_f, in_f = base[name].weight.shape
        d, b = layer.vera_lambda_d.detach(), layer.vera_lambda_b.detach()
        dw = torch.diag(b) @ ref.B[:out_f] @ torch.diag(d) @ ref.A[:, :in_f]
        torch.testing.assert_close(layer.delta_weight(), dw, rtol=1e-12, atol=1e-12)
        x = torch.randn(4, in_f, dtype=torch.float64)
        expected = x @ (base[name].weight + dw).T + base[name].bias
        torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_pair_is_shared_storage_and_kaiming():
    model = tiny_bert()
    inject(model, VeRA(rank=8), target_modules="all-linear")
    layers = list(adapter_layers(model).values())
    assert len({id(la.shared) for la in layers}) == 1
    assert len({la.shared.A.data_ptr() for la in layers}) == 1
    a = layers[0].shared.A
    assert a.shape == (8, 32)  # in_max = intermediate size
    assert a.abs().max() <= 1 / 32**0.5
    assert not any(p.requires_grad for p in layers[0].shared.parameters())
    assert all(not n.startswith("shared") for n in layers[0].state_dict())
    model.double()  # a dtype move converts the one shared pair, not a copy per layer
    assert len({la.shared.A.data_ptr() for la in layers}) == 1
    assert layers[0].shared.A.dtype == torch.float64


def test_same_seed_same_pair_other_seed_other_pair():
    a = SharedProjection(4, 10, 6, seed=1).A
    assert torch.equal(a, SharedProjection(4, 10, 6, seed=1).A)
    assert not torch.equal(a, SharedProjection(4, 10, 6, seed=2).A)


def test_init_and_parameter_count():
    model = tiny_bert()
    inject(model, VeRA(rank=64, d_init=0.1), target_modules="all-linear")
    layers = adapter_layers(model)
    for la in layers.values():
        assert torch.all(la.vera_lambda_d == 0.1) and torch.all(la.vera_lambda_b == 0)
    # r + out per layer; r may exceed a layer's min(out, in) = 16
    assert trainable_parameter_count(model) == sum(64 + la.out_features for la in layers.values())


def test_conv1d_merge_unmerge_exact():
    torch.manual_seed(1)
    model = tiny_gpt2().double()
    inject(model, VeRA(rank=16), target_modules="all-linear")
    _perturb(model)
    ids = torch.randint(0, 64, (2, 7))
    expected = model(ids).logits
    w0 = {n: la.base.weight.detach().clone() for n, la in adapter_layers(model).items()}
    merge(model)
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-10, atol=1e-10)
    unmerge(model)
    for n, la in adapter_layers(model).items():
        torch.testing.assert_close(la.base.weight, w0[n], rtol=1e-12, atol=1e-12)


def test_file_holds_only_vectors_and_seed(tmp_path):
    torch.manual_seed(2)
    model = tiny_bert()
    inject(model, VeRA(rank=16, seed=7), target_modules=["query", "value"])
    _perturb(model)
    ids = torch.randint(0, 64, (2, 5))
    expected = model(ids).logits
    path = save_adapter(model, tmp_path / "vera.safetensors")
    tensors, meta = read_adapter(path)
    assert all(k.endswith(("vera_lambda_d", "vera_lambda_b")) for k in tensors)
    assert meta["method"] == {"type": "VeRA", "rank": 16, "d_init": 0.1, "seed": 7}
    fresh = tiny_bert()
    load_adapter(fresh, path)
    torch.testing.assert_close(fresh(ids).logits, expected, rtol=1e-5, atol=1e-6)


def test_only_vectors_train():
    torch.manual_seed(3)
    model = tiny_bert()
    inject(model, VeRA(rank=8), target_modules=["query", "value"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pair = adapter_layers(model)["bert.encoder.layer.0.attention.self.query"].shared.A.clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        loss = model(torch.randint(0, 64, (4, 6)), labels=torch.tensor([0, 1, 2, 0])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.endswith(("vera_lambda_d", "vera_lambda_b")) for n in changed)
    assert torch.equal(
        adapter_layers(model)["bert.encoder.layer.0.attention.self.query"].shared.A, pair
    )


def test_embedding_is_refused_with_a_fix():
    with pytest.raises(ValueError, match="exclude_modules"):
        inject(MLP(), VeRA(rank=4), target_modules=["embed", "fc1"])
