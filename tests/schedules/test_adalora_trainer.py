"""AdaLoRA's rank allocator inside a Trainer: the orthogonality gradient with a bare loss, one update
per optimizer step, the run's total steps, exact resume, and one allocator per callback (the user's
own when given)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lowrank import AdaLoRA, LowRankCallback, RankAllocator, adapter_layers, inject


def _net(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4)
    ).to(dtype)


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


# --- one allocator per callback ---------------------------------------------------------------
def test_callback_runs_only_the_users_allocator_when_one_is_given():
    # T = 12, t_init 2, t_final 4, delta_t 2: masking at 4, 6 and 8, the final pattern at 9; b0 = 12.
    # The cubic schedule would keep 7, 6, 6 and 6 slots there
    chosen = {4: 10, 6: 9, 8: 8, 9: 5}

    def budget(t: int) -> int:
        return chosen.get(t, 12)

    alloc = RankAllocator(budget=budget)
    cb = LowRankCallback(_cfg(total_steps=12), target_modules=["0", "2", "4"], schedules=[alloc])
    assert cb.schedules == [alloc]
    _trainer(max_steps=12, callbacks=[cb]).fit(Regression(), _data())
    assert alloc.num_updates == 12 and alloc.history_steps == [0, 4, 6, 8, 9]
    # a second (default, cubic) allocator masking after this one would leave its own budget:
    # the layers hold exactly the user's budget at every masking and at the end
    assert [sum(r) for r in alloc.history_ranks] == [12, 10, 9, 8, 5]
    assert sum(int(layer.rank_mask.sum()) for layer in cb.layers.values()) == 5
    # without one, the callback adds exactly one
    default = LowRankCallback(_cfg(), target_modules=["0", "2", "4"])
    assert [type(s) for s in default.schedules] == [RankAllocator]


def test_callback_refuses_an_allocator_for_another_config_or_twice():
    with pytest.raises(ValueError, match="the RankAllocator follows AdaLoRA.*pass RankAllocator"):
        LowRankCallback(_cfg(), schedules=[RankAllocator(_cfg(t_init=3))])
    same = LowRankCallback(_cfg(), schedules=[RankAllocator(_cfg())])  # an equal config is fine
    assert len(same.schedules) == 1
    with pytest.raises(
        ValueError, match=r"several schedules have the state key \['RankAllocator'\]"
    ):
        LowRankCallback(_cfg(), schedules=[RankAllocator(), RankAllocator()])
