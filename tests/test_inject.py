"""Target selection, freezing, merge / unmerge / unload, and the errors that name the fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_lowrank import (
    LoRA,
    adapter_layers,
    find_targets,
    inject,
    merge,
    trainable_parameter_count,
    unload,
    unmerge,
)
from lightning_lowrank.methods.base import layer_kind


def test_list_targets_match_whole_name_or_suffix(bert):
    names = inject(bert, LoRA(rank=2), target_modules=["query", "value"])
    assert len(names) == 4  # 2 layers x (query, value)
    assert all(n.endswith((".query", ".value")) for n in names)
    # "query" must not match a module merely containing the word
    assert not any(n.endswith("query_proj") for n in names)


def test_regex_targets_are_full_matched(bert):
    names = inject(bert, LoRA(rank=2), target_modules=r".*layer\.0\..*(query|key)")
    assert sorted(names) == [
        "bert.encoder.layer.0.attention.self.key",
        "bert.encoder.layer.0.attention.self.query",
    ]


def test_all_linear_skips_the_output_head(bert, gpt2):
    names = find_targets(bert, "all-linear")
    assert "classifier" not in names
    assert "bert.pooler.dense" in names
    assert len(names) == 2 * 6 + 1  # q, k, v, attn out, intermediate, output per layer + pooler
    gpt_names = find_targets(gpt2, "all-linear")
    assert "lm_head" not in gpt_names
    assert all(layer_kind(m) == "conv1d" for m in gpt_names.values())


def test_exclude_modules(bert):
    names = inject(bert, LoRA(rank=2), target_modules=["query", "value"], exclude_modules=["value"])
    assert all(n.endswith(".query") for n in names) and len(names) == 2


def test_only_adapters_and_train_modules_are_trainable(bert):
    inject(bert, LoRA(rank=2), target_modules=["query"], train_modules=["classifier"])
    trainable = {n for n, p in bert.named_parameters() if p.requires_grad}
    assert trainable == {
        "bert.encoder.layer.0.attention.self.query.lora_A",
        "bert.encoder.layer.0.attention.self.query.lora_B",
        "bert.encoder.layer.1.attention.self.query.lora_A",
        "bert.encoder.layer.1.attention.self.query.lora_B",
        "classifier.weight",
        "classifier.bias",
    }
    assert trainable_parameter_count(bert) == 2 * (2 * 16 + 16 * 2) + 16 * 3 + 3


def test_no_match_lists_candidates(bert):
    with pytest.raises(ValueError, match=r"no module matched.*include: .*query"):
        inject(bert, LoRA(), target_modules=["q_proj"])
    assert not adapter_layers(bert)


def test_unsupported_layer_type(bert):
    with pytest.raises(ValueError, match="cannot be adapted.*LayerNorm"):
        inject(bert, LoRA(rank=2), target_modules=["LayerNorm"])
    assert not adapter_layers(bert)


def test_rank_too_large_names_the_layer(mlp):
    with pytest.raises(ValueError, match=r"rank 13 is too large for layer 'fc1'.*rank <= 12"):
        inject(mlp, LoRA(rank=13), target_modules=["fc1"])
    assert not adapter_layers(mlp)  # nothing was changed


def test_inject_twice_fails(mlp):
    inject(mlp, LoRA(rank=2), target_modules=["fc1"])
    with pytest.raises(ValueError, match="already injected"):
        inject(mlp, LoRA(rank=2), target_modules=["fc2"])


def test_bad_regex_is_reported(mlp):
    with pytest.raises(ValueError, match="not a valid regex"):
        inject(mlp, LoRA(rank=2), target_modules="fc(")


def _randomise(model):
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.normal_()


def test_merge_unmerge_and_unload(bert):
    bert = bert.double()
    original = {n: p.detach().clone() for n, p in bert.named_parameters()}
    inject(bert, LoRA(rank=2, alpha=4), target_modules="all-linear")
    _randomise(bert)
    ids = torch.randint(0, 64, (2, 9))
    before = bert(ids).logits
    merge(bert)
    torch.testing.assert_close(bert(ids).logits, before, rtol=1e-10, atol=1e-10)
    unmerge(bert)
    for layer_name, layer in adapter_layers(bert).items():
        w = original[f"{layer_name}.weight"]
        torch.testing.assert_close(layer.base.weight, w, rtol=0, atol=1e-12)
    torch.testing.assert_close(bert(ids).logits, before, rtol=1e-10, atol=1e-10)
    unload(bert)
    assert not adapter_layers(bert)
    assert type(bert.bert.encoder.layer[0].attention.self.query) is nn.Linear
    torch.testing.assert_close(bert(ids).logits, before, rtol=1e-10, atol=1e-10)


def test_merge_float32_round_trip_tolerance(mlp):
    original = mlp.fc1.weight.detach().clone()
    inject(mlp, LoRA(rank=4), target_modules=["fc1"])
    _randomise(mlp)
    merge(mlp)
    unmerge(mlp)
    # float32: one add and one subtract of O(1) values, so the error is a few ulps
    torch.testing.assert_close(mlp.fc1.base.weight, original, rtol=0, atol=1e-6)


def test_merge_refuses_non_finite(mlp):
    inject(mlp, LoRA(rank=2), target_modules=["fc1"])
    with torch.no_grad():
        mlp.fc1.lora_B.fill_(float("nan"))
    weight = mlp.fc1.base.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        merge(mlp)
    torch.testing.assert_close(mlp.fc1.base.weight, weight, rtol=0, atol=0)


def test_merge_without_adapters_fails(mlp):
    with pytest.raises(ValueError, match="no adapters"):
        merge(mlp)
