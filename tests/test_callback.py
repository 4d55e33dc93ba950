"""LowRankCallback inside Trainer.fit: injection timing, LoRA+, step counting, checkpoints, CLI."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import RandomDataset
from torch import nn
from torch.utils.data import DataLoader

from lightning_lowrank import LoRA, LowRankCallback, Schedule, adapter_layers, inject
from lightning_lowrank.optim import parameter_roles


class Net(L.LightningModule):
    """A small regression model; one batch per epoch so resumed runs see the same data."""

    def __init__(
        self, batches: int = 1, build_in_configure_model: bool = False, scheduler: bool = False
    ):
        super().__init__()
        self.batches = batches
        self.scheduler = scheduler
        self.net: nn.Module | None = None
        if not build_in_configure_model:
            self.configure_model()

    def configure_model(self) -> None:
        if self.net is not None:  # idempotent, as Lightning requires
            return
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh())
        self.head = nn.Linear(32, 2)

    def forward(self, x):
        return self.head(self.net(x))

    def training_step(self, batch, batch_idx):
        return self(batch).pow(2).mean()

    def train_dataloader(self):
        torch.manual_seed(123)
        return DataLoader(RandomDataset(32, 8 * self.batches), batch_size=8)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.01)
        if not self.scheduler:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _trainer(tmp_path=None, **kwargs):
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def _adapter_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_fit_trains_only_adapters_and_head():
    model = Net()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cb = LowRankCallback(
        LoRA(rank=4, alpha=8), target_modules=["net.0", "net.2"], train_modules=["head"]
    )
    _trainer(max_steps=3, callbacks=[cb]).fit(model)
    after = dict(model.named_parameters())
    changed = {n for n in after if n in before and not torch.equal(after[n], before[n])}
    new = {n for n in after if n not in before and ".base." not in n}
    for name in ("net.0", "net.2"):  # the wrapped base layers are unchanged
        assert torch.equal(after[f"{name}.base.weight"], before[f"{name}.weight"])
    assert new == {"net.0.lora_A", "net.0.lora_B", "net.2.lora_A", "net.2.lora_B"}
    assert changed == {"head.weight", "head.bias"}
    assert all(not torch.equal(after[n], torch.zeros_like(after[n])) for n in new if "lora_B" in n)
    assert not any(after[n].requires_grad for n in after if ".base." in n)


def test_injects_layers_built_in_configure_model():
    model = Net(build_in_configure_model=True)
    assert model.net is None
    cb = LowRankCallback(LoRA(rank=2), target_modules=["net.0"])
    _trainer(max_steps=1, callbacks=[cb]).fit(model)
    assert list(adapter_layers(model)) == ["net.0"]


def test_lora_plus_groups_in_fit_follow_the_scheduler():
    model = Net(scheduler=True)
    cb = LowRankCallback(
        LoRA(rank=2), target_modules=["net.0", "net.2"], train_modules=["head"], lr_ratio=16
    )
    trainer = _trainer(max_steps=3, callbacks=[cb])
    trainer.fit(model)
    roles = parameter_roles(model)
    groups = trainer.optimizers[0].param_groups
    a = [g for g in groups if roles[id(g["params"][0])] == "A"]
    b = [g for g in groups if roles[id(g["params"][0])] == "B"]
    assert len(a) == 1 and len(b) == 1
    expected_a = 0.01 / (1 + 3)  # LambdaLR after 3 steps
    assert a[0]["lr"] == pytest.approx(expected_a)
    assert b[0]["lr"] == pytest.approx(16 * expected_a)
    assert all(g["weight_decay"] == 0.01 for g in groups)
    b_names = {n for n, p in model.named_parameters() if id(p) in {id(q) for q in b[0]["params"]}}
    assert b_names == {"net.0.lora_B", "net.2.lora_B", "head.bias"}


class StepRecorder(Schedule):
    def __init__(self):
        self.steps: list[int] = []
        self.before: list[int] = []

    def before_optimizer_step(self, model, layers, step):
        self.before.append(step)

    def after_optimizer_step(self, model, layers, step):
        self.steps.append(step)

    def state_dict(self):
        return {"steps": list(self.steps)}

    def load_state_dict(self, state):
        self.steps = list(state["steps"])


def test_schedules_fire_once_per_optimizer_step_under_accumulation():
    model = Net(batches=4)
    recorder = StepRecorder()
    cb = LowRankCallback(LoRA(rank=2), target_modules=["net.0"], schedules=[recorder])
    trainer = _trainer(max_epochs=2, accumulate_grad_batches=2, callbacks=[cb], limit_val_batches=0)
    trainer.fit(model)
    assert recorder.steps == [1, 2, 3, 4]  # 8 batches, 2 per optimizer step
    assert recorder.before == [0, 1, 2, 3]


def _checkpoint_run(tmp_path, steps, resume_from=None, save_every=None):
    model = Net()
    recorder = StepRecorder()
    cb = LowRankCallback(
        LoRA(rank=2, alpha=4), target_modules=["net.0", "net.2"], lr_ratio=4, schedules=[recorder]
    )
    callbacks = [cb]
    if save_every:
        callbacks.append(
            ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=save_every, save_top_k=-1)
        )
    trainer = _trainer(
        tmp_path, max_steps=steps, callbacks=callbacks, enable_checkpointing=bool(save_every)
    )
    trainer.fit(model, ckpt_path=resume_from)
    return model, recorder


def test_resume_from_adapter_only_checkpoint_matches_uninterrupted_run(tmp_path):
    full, full_rec = _checkpoint_run(tmp_path / "a", steps=6)
    _checkpoint_run(tmp_path / "b", steps=3, save_every=3)
    ckpt = tmp_path / "b" / "epoch=2-step=3.ckpt"
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    assert set(state) == {"net.0.lora_A", "net.0.lora_B", "net.2.lora_A", "net.2.lora_B"}
    resumed, resumed_rec = _checkpoint_run(tmp_path / "c", steps=6, resume_from=ckpt)
    assert resumed_rec.steps == full_rec.steps == [1, 2, 3, 4, 5, 6]
    for key, value in _adapter_state(full).items():
        torch.testing.assert_close(_adapter_state(resumed)[key], value, rtol=0, atol=0)


class BeforeRecorder(Schedule):
    """A second stateful schedule, with state of another shape than StepRecorder's."""

    def __init__(self):
        self.before: list[int] = []

    def before_optimizer_step(self, model, layers, step):
        self.before.append(step)

    def state_dict(self):
        return {"before": list(self.before)}

    def load_state_dict(self, state):
        self.before = list(state["before"])


def _keyed_run(tmp_path, steps, schedules, resume_from=None, save_every=None):
    callbacks = [LowRankCallback(LoRA(rank=2), target_modules=["net.0"], schedules=schedules)]
    if save_every:
        callbacks.append(
            ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=save_every, save_top_k=-1)
        )
    trainer = _trainer(
        tmp_path, max_steps=steps, callbacks=callbacks, enable_checkpointing=bool(save_every)
    )
    trainer.fit(Net(), ckpt_path=resume_from)


def test_schedule_state_is_keyed_and_resumes_in_any_order(tmp_path):
    _keyed_run(tmp_path / "a", 3, [StepRecorder(), BeforeRecorder()], save_every=3)
    ckpt = tmp_path / "a" / "epoch=2-step=3.ckpt"
    saved = torch.load(ckpt, weights_only=False)["callbacks"]["LowRankCallback"]["schedules"]
    assert saved == {"StepRecorder": {"steps": [1, 2, 3]}, "BeforeRecorder": {"before": [0, 1, 2]}}
    # the same schedules in the other order: each gets its own state back
    steps, before = StepRecorder(), BeforeRecorder()
    _keyed_run(tmp_path / "b", 5, [before, steps], resume_from=ckpt)
    assert steps.steps == [1, 2, 3, 4, 5]
    assert before.before == [0, 1, 2, 3, 4]


def test_resume_with_other_schedules_names_them(tmp_path):
    _keyed_run(tmp_path / "a", 3, [StepRecorder()], save_every=3)
    ckpt = tmp_path / "a" / "epoch=2-step=3.ckpt"
    with pytest.raises(
        ValueError,
        match=r"missing from the checkpoint \['BeforeRecorder'\], not in this callback \[\]",
    ):
        _keyed_run(tmp_path / "b", 5, [StepRecorder(), BeforeRecorder()], resume_from=ckpt)
    with pytest.raises(
        ValueError,
        match=r"missing from the checkpoint \['BeforeRecorder'\], "
        r"not in this callback \['StepRecorder'\]. Resume with the same schedules",
    ):
        _keyed_run(tmp_path / "c", 5, [BeforeRecorder()], resume_from=ckpt)


def test_positional_schedule_state_of_older_checkpoints_still_loads():
    steps, before = StepRecorder(), BeforeRecorder()
    cb = LowRankCallback(LoRA(rank=2), schedules=[steps, before])
    cb.load_state_dict({"last_step": 3, "schedules": [{"steps": [1, 2, 3]}, {"before": [0, 1]}]})
    assert cb._last_step == 3 and steps.steps == [1, 2, 3] and before.before == [0, 1]
    with pytest.raises(ValueError, match="state for 1 schedules, this callback has 2"):
        cb.load_state_dict({"last_step": 5, "schedules": [{"steps": [1]}]})
    assert cb._last_step == 3 and steps.steps == [1, 2, 3]  # the refusal changed nothing


def test_schedules_with_one_state_key_are_refused():
    with pytest.raises(
        ValueError, match=r"several schedules have the state key \['StepRecorder'\]"
    ):
        LowRankCallback(LoRA(rank=2), schedules=[StepRecorder(), StepRecorder()])

    class Keyed(StepRecorder):
        def __init__(self, name):
            super().__init__()
            self.name = name

        @property
        def state_key(self):
            return f"Keyed[{self.name}]"

    cb = LowRankCallback(LoRA(rank=2), schedules=[Keyed("a"), Keyed("b")])
    assert list(cb.state_dict()["schedules"]) == ["Keyed[a]", "Keyed[b]"]


def test_full_checkpoint_when_requested(tmp_path):
    model = Net()
    cb = LowRankCallback(LoRA(rank=2), target_modules=["net.0"], save_adapter_only=False)
    trainer = _trainer(tmp_path, max_steps=1, callbacks=[cb])
    trainer.fit(model)
    trainer.save_checkpoint(tmp_path / "full.ckpt")
    state = torch.load(tmp_path / "full.ckpt", weights_only=False)["state_dict"]
    assert "net.0.base.weight" in state and "head.weight" in state


def test_checkpoint_of_another_method_is_rejected(tmp_path):
    model = Net()
    trainer = _trainer(
        tmp_path, max_steps=1, callbacks=[LowRankCallback(LoRA(rank=2), target_modules=["net.0"])]
    )
    trainer.fit(model)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    other = _trainer(
        tmp_path, max_steps=2, callbacks=[LowRankCallback(LoRA(rank=2), target_modules=["net.2"])]
    )
    with pytest.raises(ValueError, match="does not match the adapted model"):
        other.fit(Net(), ckpt_path=tmp_path / "a.ckpt")


def test_callback_after_inject_is_an_error():
    model = Net()
    inject(model, LoRA(rank=2), target_modules=["net.0"])
    cb = LowRankCallback(LoRA(rank=2), target_modules=["net.0"])
    with pytest.raises(ValueError, match="already has adapters"):
        _trainer(max_steps=1, callbacks=[cb]).fit(model)


def test_unsupported_strategy_is_an_error():
    cb = LowRankCallback(LoRA(rank=2), target_modules=["net.0"])
    trainer = SimpleNamespace(strategy=object())
    with pytest.raises(ValueError, match="strategy='ddp'"):
        cb.setup(trainer, Net(), "fit")


def test_bad_arguments():
    with pytest.raises(TypeError, match="method config"):
        LowRankCallback("lora")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lr_ratio"):
        LowRankCallback(LoRA(), lr_ratio=0)


def test_second_fit_reuses_the_adapters():
    model = Net()
    cb = LowRankCallback(LoRA(rank=2), target_modules=["net.0"])
    _trainer(max_steps=1, callbacks=[cb]).fit(model)
    layer = model.net[0]
    _trainer(max_steps=1, callbacks=[cb]).fit(model)
    assert model.net[0] is layer


def test_lightning_cli_yaml(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        """
trainer:
  max_steps: 2
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning_lowrank.LowRankCallback
      init_args:
        method:
          class_path: lightning_lowrank.LoRA
          init_args: {rank: 4, alpha: 8, scaling: rslora, train_a: false}
        target_modules: ["net.0", "net.2"]
        train_modules: ["head"]
        lr_ratio: 16
"""
    )
    cli = LightningCLI(Net, run=False, args=["--config", str(config)], save_config_callback=None)
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, LowRankCallback))
    assert cb.method == LoRA(rank=4, alpha=8, scaling="rslora", train_a=False)
    assert cb.lr_ratio == 16
    cli.trainer.fit(cli.model)
    assert set(adapter_layers(cli.model)) == {"net.0", "net.2"}
