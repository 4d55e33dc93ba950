"""AdaLoRA: the SVD-form layer, the rank allocator (plain loop and inside a Trainer), adapter files."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lowrank import (
    AdaLoRA,
    LowRankCallback,
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
from lightning_lowrank.schedules.adalora import add_orthogonality_grad, orthogonality_loss


def _net(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4)
    ).to(dtype)


def _layer(dtype: torch.dtype = torch.float64, **kw) -> AdaLoRALayer:
    torch.manual_seed(0)
    return AdaLoRALayer(nn.Linear(5, 4).to(dtype), AdaLoRA(init_rank=3, target_rank=1, **kw))


# --- the layer ------------------------------------------------------------------------------
def test_layer_output_equals_base_plus_svd_delta():
    layer = _layer(alpha=6.0)
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer.base(x), rtol=0, atol=0)  # lambda = 0 at init
    assert layer.lora_A.std().item() == pytest.approx(0.02, rel=0.5)
    with torch.no_grad():
        layer.lora_E.copy_(torch.tensor([1.5, -2.0, 0.5]))
    p, lam, q = layer.lora_B.detach(), layer.lora_E.detach(), layer.lora_A.detach()
    dw = (6.0 / 3) * p @ torch.diag(lam) @ q
    torch.testing.assert_close(layer.delta_weight(), dw, rtol=1e-12, atol=1e-12)
    expected = x @ (layer.base.weight + dw).T + layer.base.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    w0 = layer.base.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, w0, rtol=1e-12, atol=1e-12)


def test_scale_is_alpha_over_init_rank_even_when_truncated():
    layer = AdaLoRALayer(nn.Linear(5, 4), AdaLoRA(init_rank=4, target_rank=2, alpha=8.0), rank=2)
    assert layer.scale == 2.0 and layer.lora_A.shape == (2, 5) and layer.lora_B.shape == (4, 2)


def test_param_sides_and_metadata():
    layer = _layer()
    assert layer.param_sides() == {"lora_A": "A", "lora_E": "B", "lora_B": "B"}
    assert layer.layer_metadata() == {"rank": 3}
    assert set(layer.adapter_state_dict()) == {"lora_A", "lora_E", "lora_B", "rank_mask"}


def test_config_errors():
    with pytest.raises(ValueError, match="target_rank .* must be between 0 and init_rank"):
        AdaLoRA(init_rank=4, target_rank=6)
    with pytest.raises(ValueError, match="init_rank 12 is too large for layer '0'"):
        inject(_net(), AdaLoRA(), target_modules=["0"])


# --- budget schedule ------------------------------------------------------------------------
def _allocator(total: int = 100, **kw) -> tuple[nn.Module, dict, RankAllocator]:
    model = _net()
    cfg = AdaLoRA(init_rank=4, target_rank=2, t_init=10, t_final=20, delta_t=5, **kw)
    inject(model, cfg, target_modules=["0", "2", "4"])
    layers = adapter_layers(model)
    alloc = RankAllocator(cfg)
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


# --- inside a Trainer ---------------------------------------------------------------------
class Regression(L.LightningModule):
    """A bare-loss ``training_step`` (no ``.loss`` attribute anywhere)."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.net = _net()
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self.net(x) - y).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def _data(n: int = 16, batch_size: int = 16) -> DataLoader:
    gen = torch.Generator().manual_seed(1)
    ds = TensorDataset(torch.randn(n, 6, generator=gen), torch.randn(n, 4, generator=gen))
    return DataLoader(ds, batch_size=batch_size, shuffle=False)


def _trainer(**kw) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    defaults.update(kw)
    return L.Trainer(**defaults)


def _cfg(**kw) -> AdaLoRA:
    args = dict(init_rank=4, target_rank=2, t_init=2, t_final=4, delta_t=2)
    args.update(kw)
    return AdaLoRA(**args)


class GradRecorder(L.Callback):
    """Runs after LowRankCallback: sees the factors before training and the gradients the
    optimizer uses at every step."""

    def __init__(self) -> None:
        self.initial: dict[str, torch.Tensor] = {}
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_train_start(self, trainer, pl_module):
        for name, layer in adapter_layers(pl_module).items():
            for key in ("lora_A", "lora_B"):
                self.initial[f"{name}.{key}"] = getattr(layer, key).detach().clone()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append(
            {
                f"{name}.{key}": getattr(layer, key).grad.clone()
                for name, layer in adapter_layers(pl_module).items()
                for key in ("lora_A", "lora_B")
            }
        )


def test_orthogonality_reaches_p_and_q_with_a_bare_loss():
    recorder = GradRecorder()
    cb = LowRankCallback(_cfg(orth_reg=0.1, total_steps=10), target_modules=["0", "2", "4"])
    _trainer(max_steps=1, callbacks=[cb, recorder]).fit(Regression(), _data())
    assert len(recorder.grads) == 1
    # at step 1 lambda = 0, so the loss gives P and Q exactly zero gradient: all of their
    # gradient must be the regulariser's, 0.1 * mean of the six Frobenius norms
    factors = {k: v.clone().requires_grad_(True) for k, v in recorder.initial.items()}
    terms = []
    for key, m in factors.items():
        gram = m @ m.T if key.endswith("lora_A") else m.T @ m
        terms.append(torch.linalg.matrix_norm(gram - torch.eye(4)))
    reg = 0.1 * torch.stack(terms).mean()
    expected = torch.autograd.grad(reg, list(factors.values()))
    for key, g in zip(factors, expected, strict=True):
        assert g.abs().sum() > 0
        torch.testing.assert_close(recorder.grads[0][key], g, rtol=1e-5, atol=1e-7)


def test_allocator_updates_once_per_optimizer_step_under_accumulation():
    def run(batch_size: int, accumulate: int):
        model = Regression()
        cb = LowRankCallback(_cfg(), target_modules=["0", "2", "4"])
        recorder = GradRecorder()
        trainer = _trainer(
            max_steps=10, accumulate_grad_batches=accumulate, callbacks=[cb, recorder]
        )
        trainer.fit(model, _data(n=16, batch_size=batch_size))
        return model, cb.schedules[0], recorder, trainer

    model_a, alloc_a, rec_a, trainer_a = run(batch_size=8, accumulate=2)
    model_b, alloc_b, rec_b, _ = run(batch_size=16, accumulate=1)
    assert trainer_a.global_step == 10
    assert alloc_a.num_updates == 10 and alloc_a.step == 10
    assert len(rec_a.grads) == 10  # the regulariser was added once per optimizer step
    assert alloc_a.history_steps == alloc_b.history_steps == [0, 4, 6, 7]
    # two half batches accumulated are one full batch: the same run
    assert alloc_a.history_ranks == alloc_b.history_ranks
    for (ka, a), (kb, b) in zip(
        adapter_layers(model_a).items(), adapter_layers(model_b).items(), strict=True
    ):
        assert ka == kb
        torch.testing.assert_close(a.rank_mask, b.rank_mask, rtol=0, atol=0)
        torch.testing.assert_close(a.lora_B, b.lora_B, rtol=1e-5, atol=1e-6)
    for x, y in zip(alloc_a.ipt, alloc_b.ipt, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-9)


def test_missing_total_steps_and_bad_fit_fail_clearly():
    cb = LowRankCallback(_cfg(t_init=5, t_final=5), target_modules=["0", "2", "4"])
    with pytest.raises(ValueError, match="schedule does not fit the run"):
        _trainer(max_steps=8, callbacks=[cb]).fit(Regression(), _data())
    alloc = RankAllocator(_cfg())
    model = _net()
    inject(model, _cfg(), target_modules=["0"])
    alloc.setup(model, adapter_layers(model), None)
    with pytest.raises(ValueError, match="needs the run's total optimizer steps"):
        alloc.budget(1)


def test_resume_mid_schedule_is_exact(tmp_path):
    cfg = dict(t_init=2, t_final=4, delta_t=2, total_steps=12)

    def fit(max_steps: int, ckpt: str | None = None, save: str | None = None):
        model = Regression()
        cb = LowRankCallback(_cfg(**cfg), target_modules=["0", "2", "4"])
        trainer = _trainer(max_steps=max_steps, callbacks=[cb])
        trainer.fit(model, _data(), ckpt_path=ckpt)  # one batch per epoch: no data replay issue
        if save:
            trainer.save_checkpoint(save)
        return model, cb.schedules[0]

    full, alloc_full = fit(12)
    path = str(tmp_path / "half.ckpt")
    fit(7, save=path)  # stops between two maskings, EMAs and soft masks mid-flight
    resumed, alloc_resumed = fit(12, ckpt=path)
    assert alloc_resumed.history_steps == alloc_full.history_steps
    assert alloc_resumed.history_ranks == alloc_full.history_ranks
    assert alloc_resumed.num_updates == alloc_full.num_updates == 12
    full_state = {k: v for k, v in full.state_dict().items() if "lora_" in k or "rank_mask" in k}
    resumed_state = resumed.state_dict()
    assert any("rank_mask" in k for k in full_state)
    for key, value in full_state.items():
        torch.testing.assert_close(resumed_state[key], value, rtol=0, atol=0, msg=key)
    for x, y in zip(
        alloc_full.ipt + alloc_full.unc, alloc_resumed.ipt + alloc_resumed.unc, strict=True
    ):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


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


def test_truncated_layer_with_no_slot_left(tmp_path):
    model = _net()
    inject(model, AdaLoRA(init_rank=3, target_rank=1), target_modules=["0", "2"])
    layers = adapter_layers(model)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_E.normal_()
        layers["0"].rank_mask.zero_()
        layers["0"].lora_E.zero_()
    x = torch.randn(4, 6)
    expected = model(x).detach()
    path = save_adapter(model, tmp_path / "a.safetensors", truncate=True)
    fresh = _net()
    load_adapter(fresh, path)
    assert adapter_layers(fresh)["0"].rank == 0
    torch.testing.assert_close(fresh(x).detach(), expected, rtol=1e-5, atol=1e-5)


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


def test_total_steps_from_the_trainer_and_config_override():
    # no max_steps: the callback estimates T from the Trainer (4 batches x 3 epochs)
    cb = LowRankCallback(_cfg(), target_modules=["0", "2", "4"])
    _trainer(max_epochs=3, callbacks=[cb]).fit(Regression(), _data(n=16, batch_size=4))
    alloc = cb.schedules[0]
    assert isinstance(alloc, RankAllocator)
    assert alloc.total_steps == 12 and alloc.num_updates == 12
    assert alloc.history_steps == [0, 4, 6, 8, 9]
    # the config's total_steps wins over the Trainer's
    cb = LowRankCallback(_cfg(total_steps=10), target_modules=["0", "2", "4"])
    _trainer(max_steps=4, callbacks=[cb]).fit(Regression(), _data())
    assert cb.schedules[0].total_steps == 10
