"""LoRA+ parameter groups and re-grouping of an existing optimizer with its LR schedulers."""

from __future__ import annotations

import pytest
import torch

from lightning_lowrank import LoRA, inject, lora_plus_param_groups, split_optimizer
from lightning_lowrank.optim import parameter_roles


def _model(mlp):
    inject(mlp, LoRA(rank=2), target_modules=["fc1", "fc2", "embed"], train_modules=["classifier"])
    return mlp


def _names(model, params):
    by_id = {id(p): n for n, p in model.named_parameters()}
    return sorted(by_id[id(p)] for p in params)


def test_official_grouping_rules(mlp):
    model = _model(mlp)
    groups = lora_plus_param_groups(
        model, lr=1e-3, lr_ratio=16, weight_decay=0.1, embedding_lr=1e-6
    )
    by_name = {g["name"]: g for g in groups}
    assert _names(model, by_name["lora_plus_A"]["params"]) == [
        "classifier.weight",
        "fc1.lora_A",
        "fc2.lora_A",
    ]
    assert _names(model, by_name["lora_plus_B"]["params"]) == ["fc1.lora_B", "fc2.lora_B"]
    assert _names(model, by_name["lora_plus_B_no_decay"]["params"]) == ["classifier.bias"]
    assert _names(model, by_name["lora_plus_embedding"]["params"]) == [
        "embed.lora_A",
        "embed.lora_B",
    ]
    assert by_name["lora_plus_A"]["lr"] == 1e-3
    assert by_name["lora_plus_B"]["lr"] == pytest.approx(16e-3)
    assert by_name["lora_plus_B_no_decay"]["lr"] == pytest.approx(16e-3)
    assert by_name["lora_plus_B_no_decay"]["weight_decay"] == 0.0
    assert by_name["lora_plus_B"]["weight_decay"] == 0.1
    assert by_name["lora_plus_embedding"]["lr"] == 1e-6
    covered = sum(len(g["params"]) for g in groups)
    assert covered == sum(1 for p in model.parameters() if p.requires_grad)
    torch.optim.AdamW(groups)  # accepted as is


def test_roles_cover_every_trainable_parameter(mlp):
    model = _model(mlp)
    roles = parameter_roles(model)
    assert {id(p) for p in model.parameters() if p.requires_grad} == set(roles)


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step)),
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.01, 0.02], total_steps=10),
        lambda opt: torch.optim.lr_scheduler.SequentialLR(
            opt,
            [
                torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=2),
                torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5),
            ],
            milestones=[2],
        ),
    ],
    ids=["lambda", "step", "onecycle", "sequential"],
)
def test_split_keeps_ratio_through_scheduler_steps(mlp, make_scheduler):
    model = _model(mlp)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=0.01,
    )
    scheduler = make_scheduler(optimizer)
    split_optimizer(optimizer, model, lr_ratio=8, schedulers=[scheduler], embedding_lr=1e-6)
    groups = optimizer.param_groups
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    assert not any(id(p) in frozen for g in groups for p in g["params"])
    roles = parameter_roles(model)
    for _ in range(4):
        model(torch.randint(0, 20, (2, 5))).sum().backward()
        optimizer.step()
        scheduler.step()
        a_lrs = {g["lr"] for g in groups if roles[id(g["params"][0])] == "A"}
        b_lrs = {g["lr"] for g in groups if roles[id(g["params"][0])] == "B"}
        # every B group runs at ratio x the A group of the same source group
        for g in groups:
            role = roles[id(g["params"][0])]
            assert all(roles[id(p)] == role for p in g["params"])
        assert len(a_lrs) >= 1 and len(b_lrs) >= 1
        a_decay = next(
            g for g in groups if roles[id(g["params"][0])] == "A" and g["weight_decay"] == 0.05
        )
        b_decay = next(
            g for g in groups if roles[id(g["params"][0])] == "B" and g["weight_decay"] == 0.05
        )
        assert b_decay["lr"] == pytest.approx(8 * a_decay["lr"], rel=1e-9)


def test_split_preserves_weight_decay_and_rejects_started_optimizer(mlp):
    model = _model(mlp)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.3)
    sources = split_optimizer(optimizer, model, lr_ratio=4)
    assert sources == [0, 0, 0]  # A, B and embedding groups, all from group 0
    assert all(g["weight_decay"] == 0.3 for g in optimizer.param_groups)
    model(torch.randint(0, 20, (2, 5))).sum().backward()
    optimizer.step()
    with pytest.raises(RuntimeError, match="before the optimizer's first step"):
        split_optimizer(optimizer, model, lr_ratio=4)
