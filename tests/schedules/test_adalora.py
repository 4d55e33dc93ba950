"""AdaLoRA's rank allocator without a Trainer: the budget b(t) (the paper's cubic schedule and
custom ones), masks, importance and triplet scores, the orthogonality regulariser, its state,
truncated adapter files and the rank history."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_lowrank import (
    AdaLoRA,
    RankAllocator,
    adapter_layers,
    inject,
    load_adapter,
    merge,
    read_adapter,
    save_adapter,
    unmerge,
)
from lightning_lowrank.methods.adalora import AdaLoRALayer
from lightning_lowrank.schedules.adalora import (
    add_orthogonality_grad,
    cubic_budget,
    orthogonality_loss,
)


def _net(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4)
    ).to(dtype)


def _layer(dtype: torch.dtype = torch.float64, **kw) -> AdaLoRALayer:
    torch.manual_seed(0)
    return AdaLoRALayer(nn.Linear(5, 4).to(dtype), AdaLoRA(init_rank=3, target_rank=1, **kw))


# --- budget schedule ------------------------------------------------------------------------
def _allocator(total: int = 100, budget=None, **kw) -> tuple[nn.Module, dict, RankAllocator]:
    model = _net()
    cfg = AdaLoRA(init_rank=4, target_rank=2, t_init=10, t_final=20, delta_t=5, **kw)
    inject(model, cfg, target_modules=["0", "2", "4"])
    layers = adapter_layers(model)
    alloc = RankAllocator(cfg, budget=budget)
    alloc.setup(model, layers, total)
    return model, layers, alloc


def test_budget_against_formula():
    _, _, alloc = _allocator()
    b0, bt = 12, 6
    assert (alloc.initial_budget, alloc.target_budget) == (b0, bt)

    def formula(t: int) -> int:
        return int(bt + (b0 - bt) * (1 - (t - 10) / (100 - 20 - 10)) ** 3)

    assert alloc.budget(0) == (b0, False)
    assert alloc.budget(10) == (b0, False)
    assert alloc.budget(11) == (formula(11), False)
    assert alloc.budget(15) == (formula(15), True)
    assert alloc.budget(43) == (formula(43), False)
    assert alloc.budget(45) == (formula(45), True)
    assert formula(45) == 6  # int(6 + 6 * (1 - 35/70)^3) = int(6.75)
    assert formula(20) == 9  # int(6 + 6 * (6/7)^3) = int(9.78)
    assert alloc.budget(80) == (bt, True)
    assert alloc.budget(81) == (bt, True)  # final phase: every step, the pattern fixed
    assert alloc.budget(100) == (bt, True)


def test_schedule_that_does_not_fit_fails_at_setup():
    with pytest.raises(
        ValueError, match=r"t_init \(10\) \+ t_final \(20\) must be < total steps \(30\)"
    ):
        _allocator(total=30)
    # the config's own total_steps overrides the run's
    with pytest.raises(ValueError, match="total steps \\(25\\)"):
        _allocator(total=1000, total_steps=25)


def _train_loop(model: nn.Module, alloc: RankAllocator, steps: int, record=None) -> None:
    layers = adapter_layers(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 6, generator=gen)
    y = torch.randn(16, 4, generator=gen)
    for t in range(1, steps + 1):
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        alloc.before_optimizer_step(model, layers, t - 1)
        opt.step()
        alloc.after_optimizer_step(model, layers, t)
        if record is not None:
            record(t, layers)
        opt.zero_grad()


def test_masks_change_only_every_delta_t_and_end_at_target():
    model, layers, alloc = _allocator()
    masks: dict[int, torch.Tensor] = {}
    final_lambdas = []

    def record(t, layers):
        masks[t] = torch.cat([layer.rank_mask.clone() for layer in layers.values()])
        if t > 80:
            final_lambdas.append(
                torch.cat([layer.lora_E.detach().clone() for layer in layers.values()])
            )

    _train_loop(model, alloc, 100, record)
    allowed = set(range(15, 81, 5)) | {81}
    assert alloc.history_steps == [0, *sorted(allowed)]
    for t in range(1, 101):
        before = masks.get(t - 1, torch.ones(12))
        if t not in allowed:
            assert torch.equal(masks[t], before), f"mask changed at step {t}"
    for t, ranks in zip(alloc.history_steps, alloc.history_ranks, strict=True):
        assert sum(ranks) == alloc.budget(t)[0], t  # exactly the budget at every masking
    assert masks[20].sum() < 12  # masking happened
    # final phase: exactly the target budget, the pattern fixed, masked lambdas zero after each step
    assert int(masks[100].sum()) == 6
    for t in range(81, 101):
        assert torch.equal(masks[t], masks[81])
    for lam in final_lambdas:
        assert torch.count_nonzero(lam[masks[81] == 0]) == 0
    assert sum(alloc.rank_pattern().values()) == 6


def test_soft_masking_lets_slots_come_back():
    # between two maskings the optimizer moves masked lambdas away from 0 (they still get gradients)
    model, layers, alloc = _allocator()
    seen = []

    def record(t, layers):
        if t == 16:
            mask = torch.cat([layer.rank_mask for layer in layers.values()])
            lam = torch.cat([layer.lora_E.detach() for layer in layers.values()])
            seen.append(lam[mask == 0].abs().max().item())

    _train_loop(model, alloc, 16, record)
    assert seen and seen[0] > 0


# --- custom budgets -----------------------------------------------------------------------------
def _masks_per_step(budget=None) -> tuple[RankAllocator, dict[int, torch.Tensor]]:
    model, _, alloc = _allocator(budget=budget)
    masks: dict[int, torch.Tensor] = {}

    def record(t, layers):
        masks[t] = torch.cat([layer.rank_mask.clone() for layer in layers.values()])

    _train_loop(model, alloc, 100, record)
    return alloc, masks


def test_cubic_budget_passed_as_a_callable_gives_the_default_masks():
    # the default is exactly the paper's schedule, b0 = 12, bT = 6, T = 100, t_init 10, t_final 20
    default, default_masks = _masks_per_step()
    cubic, cubic_masks = _masks_per_step(lambda t: cubic_budget(t, 12, 6, 100, 10, 20))
    assert cubic.history_steps == default.history_steps
    assert cubic.history_ranks == default.history_ranks
    for t in range(1, 101):
        assert torch.equal(cubic_masks[t], default_masks[t]), t
    assert [cubic_budget(t, 12, 6, 100, 10, 20) for t in (10, 11, 20, 45, 80, 81)] == [
        12,
        int(6 + 6 * (1 - 1 / 70) ** 3),
        9,
        6,
        6,
        6,
    ]


def test_custom_linear_budget_sets_the_kept_slots_at_every_masking():
    def linear(t: int) -> int:  # 12 slots at t_init = 10, falling linearly to 6 at T - t_final = 80
        return int(12 - 6 * min(1.0, max(0.0, (t - 10) / 70)))

    alloc, masks = _masks_per_step(linear)
    assert alloc.budget(20) == (linear(20), True) == (11, True)  # the cubic one is 9 here
    assert alloc.budget(23) == (linear(23), False)  # masking still only every delta_t steps
    assert alloc.budget(5) == (12, False)
    # the masking steps come from the config, the kept slots from the budget
    allowed = set(range(15, 81, 5)) | {81}
    assert alloc.history_steps == [0, *sorted(allowed)]
    for t, ranks in zip(alloc.history_steps[1:], alloc.history_ranks[1:], strict=True):
        assert sum(ranks) == linear(t), t
        assert int(masks[t].sum()) == linear(t), t
    for t in range(1, 101):
        if t not in allowed:
            assert torch.equal(masks[t], masks.get(t - 1, torch.ones(12))), t
    assert int(masks[20].sum()) == 11 and int(masks[50].sum()) == 8
    for t in range(81, 101):  # the final pattern is chosen once, at step 81, and then fixed
        assert torch.equal(masks[t], masks[81])
    assert sum(alloc.rank_pattern().values()) == 6


def test_budget_as_a_fraction_or_a_constant():
    # a fraction of b0 = 12, rounded down: 0.7 -> 8 slots, then 0.5 -> 6
    alloc, masks = _masks_per_step(lambda t: 0.7 if t <= 50 else 0.5)
    assert {t: sum(r) for t, r in zip(alloc.history_steps, alloc.history_ranks, strict=True)} == {
        0: 12,
        **{t: 8 for t in range(15, 51, 5)},
        **{t: 6 for t in range(55, 81, 5)},
        81: 6,
    }
    alloc, masks = _masks_per_step(9)  # a constant: 9 kept slots at every masking
    assert all(sum(r) == 9 for r in alloc.history_ranks[1:]) and int(masks[100].sum()) == 9


def test_bad_budgets_are_refused_before_anything_changes():
    cfg = AdaLoRA(init_rank=4, target_rank=2)
    with pytest.raises(TypeError, match="budget must be None .* got str"):
        RankAllocator(cfg, budget="cubic")
    with pytest.raises(TypeError, match="got bool"):
        RankAllocator(cfg, budget=True)
    with pytest.raises(ValueError, match=r"the fraction 1.5, outside \[0, 1\]"):
        RankAllocator(cfg, budget=1.5)
    with pytest.raises(ValueError, match="at least 0 kept rank slots, got -1"):
        RankAllocator(cfg, budget=-1)
    with pytest.raises(ValueError, match=r"is 13 slots, outside \[0, 12\]"):
        _allocator(budget=13)  # above b0: known once the layers are
    # a callable's bad value is refused at the step it is asked for; that step changes nothing
    model, layers, alloc = _allocator(budget=lambda t: 12 if t < 15 else 13)
    _train_loop(model, alloc, 14)
    before = (alloc.num_updates, alloc.step, [t.clone() for t in alloc.ipt])
    masks = {n: layer.rank_mask.clone() for n, layer in layers.items()}
    with pytest.raises(ValueError, match=r"budget at step 15 is 13 slots, outside \[0, 12\]"):
        alloc.after_optimizer_step(model, layers, 15)
    assert (alloc.num_updates, alloc.step) == before[:2]
    for x, y in zip(alloc.ipt, before[2], strict=True):
        assert torch.equal(x, y)
    assert all(torch.equal(layers[n].rank_mask, m) for n, m in masks.items())
    model, layers, alloc = _allocator(budget=lambda t: "half")
    with pytest.raises(TypeError, match="budget at step 15 is 'half'"):
        alloc.budget(15)


def test_allocator_without_a_config_follows_the_layers():
    model = _net()
    cfg = AdaLoRA(init_rank=4, target_rank=2, t_init=10, t_final=20, delta_t=5)
    inject(model, cfg, target_modules=["0", "2", "4"])
    alloc = RankAllocator(budget=0.5)
    alloc.setup(model, adapter_layers(model), 100)
    assert alloc.config == cfg and alloc.budget(15) == (6, True)
    mixed = {
        "a": AdaLoRALayer(nn.Linear(6, 5), cfg),
        "b": AdaLoRALayer(nn.Linear(6, 5), AdaLoRA(init_rank=4, target_rank=1)),
    }
    with pytest.raises(ValueError, match="built with different configs"):
        RankAllocator().setup(nn.ModuleDict(mixed), mixed, 100)


# --- importance and triplet scores ---------------------------------------------------------
def test_importance_and_triplet_scores_hand_computed():
    layer = _layer(beta1=0.85, beta2=0.7)
    layers = {"layer": layer}
    alloc = RankAllocator(layer.config)
    alloc.setup(layer, layers, 3000)
    torch.manual_seed(3)
    with torch.no_grad():
        layer.lora_E.copy_(torch.tensor([0.3, -1.2, 0.0]))
    params = [layer.lora_A, layer.lora_E, layer.lora_B]
    grad_steps = [[torch.randn_like(p) for p in params] for _ in range(3)]
    for grads in grad_steps:
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        alloc.update_importance(layers)

    # the same by hand, element by element, on Python floats
    def ema(values_per_step):
        i_bar = u_bar = 0.0
        for i in values_per_step:
            i_bar = 0.85 * i_bar + 0.15 * i
            u_bar = 0.7 * u_bar + 0.3 * abs(i - i_bar)
        return i_bar * u_bar

    def element_scores(k):
        flat_p = params[k].detach().reshape(-1).tolist()
        flat_g = [g[k].reshape(-1).tolist() for g in grad_steps]
        return [ema([abs(w * g[j]) for g in flat_g]) for j, w in enumerate(flat_p)]

    s_q = torch.tensor(element_scores(0), dtype=torch.float64).reshape(3, 5)
    s_lam = torch.tensor(element_scores(1), dtype=torch.float64)
    s_p = torch.tensor(element_scores(2), dtype=torch.float64).reshape(4, 3)
    expected = [s_lam[i] + sum(s_q[i].tolist()) / 5 + sum(s_p[:, i].tolist()) / 4 for i in range(3)]
    (got,) = alloc.slot_scores()
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(alloc.ipt[1] * alloc.unc[1], s_lam, rtol=1e-12, atol=1e-15)


def test_global_threshold_keeps_the_best_slots_over_all_layers():
    model, layers, alloc = _allocator()
    _train_loop(model, alloc, 3)  # some EMAs
    scores = alloc.slot_scores()
    alloc.mask_to_budget(layers, 5)
    flat = torch.cat(scores)
    kept = torch.cat([layer.rank_mask for layer in layers.values()]).bool()
    assert int(kept.sum()) == 5
    assert flat[kept].min() >= flat[~kept].max()  # one threshold over all layers
    for layer in layers.values():
        assert torch.count_nonzero(layer.lora_E[layer.rank_mask == 0]) == 0


# --- orthogonality regulariser ------------------------------------------------------------
def test_orthogonality_grad_matches_autograd():
    model = _net(torch.float64)
    inject(model, AdaLoRA(init_rank=4, target_rank=2), target_modules=["0", "2", "4"])
    layers = adapter_layers(model)
    loss = orthogonality_loss(layers, 0.3)
    # the formula, written out independently
    terms = []
    for layer in layers.values():
        q, p = layer.lora_A, layer.lora_B
        terms += [
            torch.norm(q @ q.T - torch.eye(4, dtype=q.dtype)),
            torch.norm(p.T @ p - torch.eye(4, dtype=p.dtype)),
        ]
    torch.testing.assert_close(loss, 0.3 * sum(terms) / 6, rtol=1e-12, atol=0)
    params = [t for layer in layers.values() for t in (layer.lora_A, layer.lora_B)]
    expected = torch.autograd.grad(loss, params)
    add_orthogonality_grad(layers, 0.3)
    for p, g in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-14)
    assert all(layer.lora_E.grad is None for layer in layers.values())


def test_allocator_state_round_trip():
    model, layers, alloc = _allocator()
    _train_loop(model, alloc, 17)
    state = alloc.state_dict()
    other = RankAllocator(alloc.config)
    other.setup(model, layers, 100)
    for layer in layers.values():
        layer.rank_mask.fill_(1.0)
    other.load_state_dict(state)
    assert other.history_steps == alloc.history_steps and other.step == 17
    assert other.rank_pattern() == alloc.rank_pattern()
    for x, y in zip(other.ipt, alloc.ipt, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


# --- adapter files ------------------------------------------------------------------------
def test_truncated_save_loads_into_fresh_model_with_identical_outputs(tmp_path):
    model, layers, alloc = _allocator()
    _train_loop(model, alloc, 100)
    pattern = alloc.rank_pattern()
    assert sum(pattern.values()) == 6
    full_path = save_adapter(model, tmp_path / "full.safetensors")
    small_path = save_adapter(model, tmp_path / "small.safetensors", truncate=True)
    tensors, meta = read_adapter(small_path)
    for name, rank in pattern.items():
        assert meta["layers"][name] == {"rank": rank}
        assert tensors[f"{name}.lora_A"].shape == (rank, layers[name].in_features)
        assert tensors[f"{name}.lora_B"].shape == (layers[name].out_features, rank)
    assert small_path.stat().st_size < full_path.stat().st_size
    x = torch.randn(5, 6)
    with torch.no_grad():
        expected = model(x)
    for path in (small_path, full_path):
        fresh = _net()
        load_adapter(fresh, path)
        loaded = adapter_layers(fresh)
        assert {n: layer.live_rank() for n, layer in loaded.items()} == pattern
        # the full file is bit-exact; dropping the zero-lambda slots only changes the order of
        # float32 sums, hence the tolerance
        tol = 1e-5 if path == small_path else 0.0
        with torch.no_grad():
            torch.testing.assert_close(fresh(x), expected, rtol=tol, atol=tol)
        merge(fresh)
        with torch.no_grad():
            torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-6)
        unmerge(fresh)


# --- analysis -----------------------------------------------------------------------------
def test_rank_history_and_heatmap():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from lightning_lowrank.analysis import plot_rank_allocation, rank_allocation_matrix

    model, layers, alloc = _allocator()
    _train_loop(model, alloc, 100)
    history = alloc.rank_history()
    assert history["layers"] == ["0", "2", "4"]
    names, steps, matrix = rank_allocation_matrix(history)
    assert matrix.shape == (3, 101) and steps[-1] == 100
    assert matrix[:, 0].tolist() == [4, 4, 4]
    assert matrix[:, -1].sum() == 6
    assert matrix[:, 17].tolist() == history["ranks"][1]  # forward-filled from step 15
    ax = plot_rank_allocation(history)
    assert ax.get_ylabel() and len(ax.get_images()) == 1
    ax = plot_rank_allocation(alloc, total_steps=120)
    assert ax.get_images()[0].get_array().shape == (3, 121)
