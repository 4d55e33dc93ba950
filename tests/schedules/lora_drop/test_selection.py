"""LoRA-drop's measurement and selection (``schedules/lora_drop/selection.py``)."""

from __future__ import annotations

import pytest
import torch

from lightning_lowrank import LoRA, LoRADrop, inject
from lightning_lowrank.schedules.lora_drop import select_layers, shape_groups
from tests.schedules.lora_drop.helpers import TARGETS, Stack, randomise_adapters


def test_importance_equals_float64_sum_of_squared_adapter_outputs():
    model = Stack(dtype=torch.float64)
    layers = {n: model.get_submodule(n) for n in inject(model, LoRA(rank=2, alpha=3.0), TARGETS)}
    randomise_adapters(model)
    schedule = LoRADrop(sample_steps=10)
    schedule.setup(model, layers, None)
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    for name, layer in layers.items():
        layer.register_forward_pre_hook(lambda m, args, n=name: inputs[n].append(args[0].detach()))
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(3):
        model(torch.randn(5, 8, generator=g, dtype=torch.float64)).sum().backward()
    expected = {
        n: sum((x @ layers[n].delta_weight().T).square().sum().item() for x in xs)
        for n, xs in inputs.items()
    }
    # validation-style forwards (eval mode, or without grad) are not part of g
    model.eval()
    model(torch.randn(5, 8, dtype=torch.float64))
    model.train()
    with torch.no_grad():
        model(torch.randn(5, 8, dtype=torch.float64))
    schedule.after_optimizer_step(model, layers, 1)
    for name in layers:
        assert schedule.importance[name] == pytest.approx(expected[name], rel=1e-12)
        assert schedule.calls[name] == 1
    assert len({round(v, 6) for v in expected.values()}) == len(expected)  # a real ranking


def test_the_measurement_keeps_nothing_on_the_layers():
    model = Stack()
    layers = {n: model.get_submodule(n) for n in inject(model, LoRA(rank=2), TARGETS)}
    randomise_adapters(model)
    schedule = LoRADrop(sample_steps=10)
    before = {n: set(la.__dict__) for n, la in layers.items()}
    before_base = {n: set(la.base.__dict__) for n, la in layers.items()}
    schedule.setup(model, layers, None)
    model.train()
    model(torch.randn(5, 8)).sum().backward()
    for name, layer in layers.items():
        assert set(layer.__dict__) == before[name]
        assert set(layer.base.__dict__) == before_base[name]
    assert set(schedule._meter.pending) == set(layers)  # the partial sums live in the schedule
    assert not schedule._meter.base_out  # and no base output outlives its forward


def test_cumulative_threshold_picks_expected_layers():
    importance = {"a": 0.05, "b": 0.5, "c": 0.15, "d": 0.3}
    assert select_layers(importance, 0.9) == ["b", "c", "d"]  # 0.5 + 0.3 + 0.15 crosses 0.9
    assert select_layers(importance, 0.8) == ["b", "d"]  # reaching the threshold is enough
    assert select_layers(importance, 0.81) == ["b", "c", "d"]
    assert select_layers(importance, 0.5) == ["b"]
    assert select_layers(importance, 1.0) == ["a", "b", "c", "d"]
    # unnormalised values select the same layers
    assert select_layers({k: 7 * v for k, v in importance.items()}, 0.9) == ["b", "c", "d"]
    with pytest.raises(ValueError, match="learning rate"):
        select_layers({"a": 0.0, "b": 0.0}, 0.9)


def test_shape_groups_keep_model_order():
    model = Stack()
    layers = {n: model.get_submodule(n) for n in inject(model, LoRA(rank=2), TARGETS)}
    assert shape_groups(layers, ["blocks.3", "head", "blocks.1"]) == [
        ["blocks.3", "blocks.1"],
        ["head"],
    ]
