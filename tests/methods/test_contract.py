"""The adapter contract, checked for every registered method config.

Each config class provides small example configs (``AdapterConfig.examples()``); every example is
injected into a small float64 model with layers of the three orientations (out > in, out < in,
square) and must satisfy the protocol that the rest of the library relies on:

- the paper's identity at initialisation, where it holds (``config.identity_at_init``);
- exactly the parameters named by ``param_sides()`` train, and they are the adapter parameters
  the layer itself creates trainable (so a ``param_sides()`` that forgets one is caught);
- ``merged_delta()`` (``delta_weight()`` plus any extension) is what the forward adds;
- ``low_rank_factors()``, where given, is the same update: ``c * B @ A == delta_weight()``;
- merge then unmerge is a float64 round trip;
- an adapter file loads onto a fresh model exactly;
- PEFT export is exact (checked by importing it back) or a refusal that gives its reason;
- adapter state-dict keys are stable: the same for every build, unchanged by training, merging
  and a file round trip.

A config registered by subclassing ``AdapterConfig`` (a user's own module included) gets these
tests once its module is imported before collection.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lowrank import (
    AdapterConfig,
    adapter_layers,
    adapter_state_dict,
    export_peft,
    import_peft,
    inject,
    load_adapter,
    merge,
    save_adapter,
    set_step,
    unmerge,
)
from lightning_lowrank.methods.base import weight_oi
from lightning_lowrank.peft import PeftExportError

TARGETS = ["up", "down", "square"]


def registered_configs() -> list[type[AdapterConfig]]:
    """Every concrete config class reachable from ``AdapterConfig``, in a stable order."""
    found: dict[str, type[AdapterConfig]] = {}
    stack = list(AdapterConfig.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if getattr(cls, "layer_cls", None) is not None:
            found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return [found[k] for k in sorted(found)]


EXAMPLES = [
    pytest.param(config, id=f"{type(config).__name__}-{i}")
    for cls in registered_configs()
    for i, config in enumerate(cls.examples())
]


class Net(nn.Module):
    """Three adaptable linear layers (out > in, out < in, square) between a fixed input and head."""

    def __init__(self, width: int = 6, wide: int = 10) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(width, wide)
        self.down = nn.Linear(wide, width)
        self.square = nn.Linear(width, width)
        self.head = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.up(x))
        h = torch.tanh(self.down(h)) + x
        return self.head(torch.tanh(self.square(h)))


def fresh() -> Net:
    return Net().double()


def inputs() -> torch.Tensor:
    return torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def adapted(config: AdapterConfig) -> Net:
    model = fresh()
    inject(model, copy.deepcopy(config), TARGETS)
    return model


def perturbed(config: AdapterConfig, seed: int = 2) -> Net:
    """An adapted model whose adapter tensors moved off their init, as after training, with any
    ramp half-way (SingLoRA), so that every term of every method is nonzero."""
    return perturb_adapters(adapted(config), seed)


def perturb_adapters(model: nn.Module, seed: int = 2) -> nn.Module:
    """Move every floating adapter tensor of ``model`` off its init and set the ramp half-way."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_state_dict(model).values():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    set_step(model, 5)
    return model


def effective_weight(layer) -> torch.Tensor:
    """``W0 + merged delta``, with ``W0 = 0`` where the method keeps no dense base weight."""
    w0 = weight_oi(layer.base) if getattr(layer.base, "weight", None) is not None else 0.0
    return w0 + layer.merged_delta()


@pytest.mark.parametrize("config", EXAMPLES)
def test_identity_at_init(config):
    if not config.identity_at_init:
        pytest.skip(f"{config} does not start from the base model (by design)")
    x = inputs()
    torch.testing.assert_close(adapted(config)(x), fresh()(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("config", EXAMPLES)
def test_exactly_param_sides_train(config):
    model = adapted(config)
    expected = {
        f"{name}.{pname}"
        for name, layer in adapter_layers(model).items()
        for pname in layer.param_sides()
    }
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected
    model(inputs()).square().sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in expected)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in expected)


@pytest.mark.parametrize("config", EXAMPLES)
def test_param_sides_name_the_parameters_the_layer_creates_trainable(config):
    """``inject`` trusts ``param_sides()``; a layer's own flags at construction are the method's
    intent (LoRA-FA's frozen A), so a side that is forgotten or added shows up here."""
    model = fresh()
    bases = {name: getattr(model, name).requires_grad_(False) for name in TARGETS}
    for name, layer in copy.deepcopy(config).build(bases).items():
        created = {
            n for n, p in layer.named_parameters() if p.requires_grad and not n.startswith("base.")
        }
        sides = {n for n in layer.param_sides() if not n.startswith("base.")}
        assert sides == created, name


@pytest.mark.parametrize("config", EXAMPLES)
def test_low_rank_factors_are_the_delta(config):
    """Delta-LoRA and analysis use ``(B, A, c)`` in place of ``delta_weight()``."""
    for name, layer in adapter_layers(perturbed(config)).items():
        factors = layer.low_rank_factors()
        if factors is None:
            continue
        b, a, c = factors
        assert b.shape == (layer.out_features, a.shape[0]), name
        assert a.shape == (b.shape[1], layer.in_features), name
        torch.testing.assert_close(c * b @ a, layer.delta_weight(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("config", EXAMPLES)
def test_merged_delta_is_what_the_forward_adds(config):
    model = perturbed(config)
    x = torch.randn(4, 3, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for layer in adapter_layers(model).values():
        xi = x[..., : layer.in_features]
        expected = F.linear(xi, effective_weight(layer), layer.base.bias)
        torch.testing.assert_close(layer(xi), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("config", EXAMPLES)
def test_merge_unmerge_round_trip(config):
    model = perturbed(config)
    x = inputs()
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    out = model(x).detach()
    merge(model)
    torch.testing.assert_close(model(x), out, rtol=1e-10, atol=1e-12)
    unmerge(model)
    torch.testing.assert_close(model(x), out, rtol=1e-10, atol=1e-12)
    after = model.state_dict()
    assert set(after) == set(before)
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("config", EXAMPLES)
def test_save_load_on_a_fresh_model_is_exact(config, tmp_path):
    model = perturbed(config)
    path = save_adapter(model, tmp_path / "adapter.safetensors")
    other = fresh()
    assert sorted(load_adapter(other, path)) == sorted(adapter_layers(model))
    set_step(other, 5)
    x = inputs()
    torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("config", EXAMPLES)
def test_peft_export_is_exact_or_refused_with_a_reason(config, tmp_path):
    model = perturbed(config)
    try:
        export_peft(model, tmp_path / "peft")
    except PeftExportError as err:
        assert len(str(err)) > 20, "a refusal must say why"
        return
    other = fresh()
    import_peft(other, tmp_path / "peft")
    x = inputs()
    torch.testing.assert_close(other(x), model(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("config", EXAMPLES)
def test_state_dict_keys_are_stable(config, tmp_path):
    model = perturbed(config)
    keys = sorted(adapter_state_dict(model))
    assert keys == sorted(adapter_state_dict(adapted(config)))  # another build
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(inputs()).sum().backward()
    opt.step()
    set_step(model, 6)
    assert sorted(adapter_state_dict(model)) == keys  # training
    merge(model)
    assert sorted(adapter_state_dict(model)) == keys  # merging
    unmerge(model)
    other = fresh()
    load_adapter(other, save_adapter(model, tmp_path / "a.safetensors"))
    assert sorted(adapter_state_dict(other)) == keys  # a file round trip
    assert all(k.split(".", 1)[0] in TARGETS for k in keys)


def _materialise(model: nn.Module) -> None:
    """What Lightning does to a meta-device model: ``to_empty``, then ``reset_parameters`` on
    every module that holds tensors (parents before children), then the callback's
    ``init_from_base`` once the bases have their values."""
    model.to_empty(device="cpu")
    for module in model.modules():
        has_tensors = any(True for _ in module.parameters(recurse=False)) or any(
            True for _ in module.buffers(recurse=False)
        )
        if has_tensors and callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()
    for layer in adapter_layers(model).values():
        layer.init_from_base()


@pytest.mark.parametrize("config", EXAMPLES)
def test_meta_device_build_materialises_with_the_init(config):
    if getattr(config, "mode", None) == "pretrain":
        pytest.skip("SLTrain's pre-training mode deletes the base weight that nn.Linear resets")
    with torch.device("meta"):
        model = Net().double()
    inject(model, copy.deepcopy(config), TARGETS)
    _materialise(model)
    reference = adapted(config)
    got, want = adapter_state_dict(model), adapter_state_dict(reference)
    assert set(got) == set(want)
    for key, value in got.items():
        assert value.shape == want[key].shape and value.dtype == want[key].dtype, key
        assert torch.isfinite(value).all() if value.is_floating_point() else True, key
    # deterministic parts (zeros, constants, seeded supports) equal a regular build's; random
    # ones (Kaiming, Gaussian) are redrawn, so only their scale is compared
    for key, value in want.items():
        if key.endswith("magnitude"):  # DoRA: the row norms of the materialised base
            layer = adapter_layers(model)[key.rsplit(".", 1)[0]]
            norm = torch.linalg.vector_norm(weight_oi(layer.base), dim=1)
            torch.testing.assert_close(got[key], norm, rtol=1e-12, atol=1e-12)
        elif not value.is_floating_point() or value.std() == 0 or value.numel() == 1:
            assert torch.equal(got[key], value), key
        else:
            assert 0.5 < float(got[key].std() / value.std()) < 2.0, key
    if config.identity_at_init:
        x = inputs()
        plain = fresh()
        with torch.no_grad():  # the materialised model's own base weights
            for name in ("up", "down", "square", "head"):
                base = getattr(model, name)
                base = getattr(base, "base", base)
                getattr(plain, name).load_state_dict(base.state_dict())
        torch.testing.assert_close(model(x), plain(x), rtol=1e-12, atol=1e-12)
