"""Class B: results that used to be silently wrong are now right, or refused with a message."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_lowrank import (
    DeltaLoRA,
    LoRA,
    LowRankCallback,
    adapter_layers,
    inject,
    merge,
    unload,
    unmerge,
)
from tests.conftest import assert_unchanged, snapshot, tiny_gpt2

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits.double()


def _gpt2_with_tied_embedding_adapter():
    model = tiny_gpt2().double()
    inject(model, LoRA(rank=4, alpha=8), target_modules=["wte", "c_attn"])
    torch.manual_seed(3)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_A.normal_()
            layer.lora_B.normal_()
    assert model.transformer.wte.tied_with == ["lm_head.weight"]
    return model


def test_merge_and_unmerge_of_a_tied_embedding_keep_the_outputs():
    model = _gpt2_with_tied_embedding_adapter()
    adapted = _logits(model)
    original_head = model.lm_head.weight.detach().clone()
    with pytest.warns(UserWarning, match="tied"):
        merge(model)
    torch.testing.assert_close(_logits(model), adapted, rtol=0, atol=1e-9)
    assert torch.equal(model.lm_head.weight, original_head)  # the head kept the original
    unmerge(model)
    torch.testing.assert_close(_logits(model), adapted, rtol=0, atol=1e-9)


def test_unload_of_a_tied_embedding_then_save_pretrained_round_trips(tmp_path):
    from transformers import GPT2LMHeadModel

    model = _gpt2_with_tied_embedding_adapter()
    adapted = _logits(model)
    with pytest.warns(UserWarning, match="tied"):
        unload(model)
    assert not adapter_layers(model)
    torch.testing.assert_close(_logits(model), adapted, rtol=0, atol=1e-9)
    model.save_pretrained(tmp_path / "merged")
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path / "merged", torch_dtype=torch.float64)
    torch.testing.assert_close(_logits(reloaded.eval()), adapted, rtol=0, atol=1e-9)


class NaNAtStep(L.LightningModule):
    """A regression model whose loss is NaN at one batch."""

    def __init__(self, nan_batch: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
        self.nan_batch = nan_batch

    def forward(self, x):
        return self.body(x)

    def training_step(self, batch, batch_idx):
        loss = self(batch).pow(2).mean()
        return loss * float("nan") if batch_idx == self.nan_batch else loss

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(0)
        return DataLoader(list(torch.randn(10, 8, generator=gen)), batch_size=2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_delta_lora_never_writes_a_non_finite_update_into_the_base():
    module = NaNAtStep()
    cb = LowRankCallback(
        LoRA(rank=2), target_modules=["body.0", "body.2"], schedules=[DeltaLoRA(start_step=0)]
    )
    trainer = L.Trainer(
        max_steps=5,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
    )
    with pytest.warns(UserWarning, match="non-finite"):
        trainer.fit(module)
    for layer in adapter_layers(module).values():
        assert torch.isfinite(layer.base.weight).all()


# --- loading into existing adapters --------------------------------------------------------------
def _mlp_lora(alpha=4.0, **kw):
    from tests.conftest import MLP

    torch.manual_seed(0)
    model = MLP()
    inject(model, LoRA(rank=2, alpha=alpha, **kw), target_modules=["fc1", "fc2"])
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.normal_()
    return model


def test_load_into_a_merged_model_is_refused_and_unmerge_restores_the_base(tmp_path):
    from lightning_lowrank import load_adapter, save_adapter

    path = save_adapter(_mlp_lora(), tmp_path / "a.safetensors")
    model = _mlp_lora()
    original = {n: layer.base.weight.detach().clone() for n, layer in adapter_layers(model).items()}
    merge(model)
    with pytest.raises(ValueError, match="unmerge"):
        load_adapter(model, path)
    unmerge(model)
    for name, layer in adapter_layers(model).items():
        torch.testing.assert_close(layer.base.weight, original[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "other", [dict(alpha=8.0), dict(alpha=4.0, scaling="rslora")], ids=["alpha", "scaling"]
)
def test_load_into_adapters_built_otherwise_is_refused(tmp_path, other):
    from lightning_lowrank import load_adapter, save_adapter

    path = save_adapter(_mlp_lora(alpha=4.0), tmp_path / "a.safetensors")
    model = _mlp_lora(**other)
    before = snapshot(model)
    with pytest.raises(ValueError, match="unload"):
        load_adapter(model, path)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "make",
    [
        lambda: __import__("lightning_lowrank").SingLoRA(rank=2, ramp_steps=5),
        lambda: __import__("lightning_lowrank").VeRA(rank=4, seed=1),
        lambda: __import__("lightning_lowrank").SLTrain(rank=2, density=0.2, seed=1),
    ],
    ids=["singlora-ramp", "vera-seed", "sltrain-seed"],
)
def test_file_config_facts_are_not_ignored_by_existing_adapters(tmp_path, make):
    from dataclasses import replace

    from lightning_lowrank import load_adapter, save_adapter
    from tests.conftest import MLP

    config = make()
    trained = MLP()
    inject(trained, config, target_modules=["fc1", "fc2"])
    path = save_adapter(trained, tmp_path / "a.safetensors")
    changed = {"ramp_steps": 9} if hasattr(config, "ramp_steps") else {"seed": 2}
    model = MLP()
    inject(model, replace(config, **changed), target_modules=["fc1", "fc2"])
    before = snapshot(model)
    with pytest.raises(ValueError, match="unload"):
        load_adapter(model, path)
    assert_unchanged(model, before)


# --- AdaLoRA ----------------------------------------------------------------------------------
def test_adalora_truncation_mid_schedule_keeps_slots_whose_lambda_moved(tmp_path):
    from lightning_lowrank import AdaLoRA, load_adapter, save_adapter
    from tests.conftest import MLP

    torch.manual_seed(0)
    model = MLP().double()
    inject(model, AdaLoRA(init_rank=3, target_rank=1), target_modules=["fc1"])
    layer = model.fc1
    with torch.no_grad():
        layer.lora_E.copy_(torch.tensor([0.5, 0.0, 0.7], dtype=torch.float64))
        layer.rank_mask.copy_(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))  # slot 2 moved
    ids = torch.randint(0, 20, (2, 5))
    expected = model(ids)
    path = save_adapter(model, tmp_path / "t.safetensors", truncate=True)
    torch.manual_seed(0)
    fresh = MLP().double()
    load_adapter(fresh, path)
    assert fresh.fc1.rank == 2
    torch.testing.assert_close(fresh(ids), expected, rtol=0, atol=1e-12)


def test_adalora_skips_non_finite_gradients():
    from lightning_lowrank import AdaLoRA, RankAllocator
    from tests.conftest import MLP

    torch.manual_seed(0)
    model = MLP()
    inject(
        model,
        AdaLoRA(init_rank=2, target_rank=1, t_init=0, t_final=1, delta_t=1, total_steps=6),
        target_modules=["fc1", "fc2"],
    )
    layers = adapter_layers(model)
    allocator = RankAllocator(layers["fc1"].config)
    allocator.setup(model, layers, 6)
    for step in (1, 2):
        model(torch.randint(0, 20, (2, 5))).sum().backward()
        if step == 2:  # a step GradScaler skipped: inf gradients
            layers["fc2"].lora_A.grad.fill_(float("inf"))
        with pytest.warns(UserWarning, match="non-finite") if step == 2 else _no_warning():
            allocator.after_optimizer_step(model, layers, step)
        model.zero_grad()
    assert allocator.skipped_updates == 1
    assert all(torch.isfinite(t).all() for t in allocator.ipt + allocator.unc)
    assert all(torch.isfinite(s).all() for s in allocator.slot_scores())


def _no_warning():
    import contextlib

    return contextlib.nullcontext()


# --- VeRA + LoRA-drop "drop": the shared pair's size is recorded -------------------------------
def test_vera_file_without_the_widest_layer_reloads_the_same_pair(tmp_path):
    from lightning_lowrank import VeRA, load_adapter, save_adapter
    from tests.conftest import MLP

    torch.manual_seed(0)
    model = MLP()
    inject(model, VeRA(rank=4, seed=3), target_modules=["fc1", "fc2", "classifier"])
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.vera_lambda_b.normal_()
    model.fc1.disabled = True  # what LoRA-drop's mode="drop" does: fc1 has the widest output
    ids = torch.randint(0, 20, (2, 5))
    expected = model(ids)
    path = save_adapter(model, tmp_path / "v.safetensors")
    torch.manual_seed(0)
    fresh = MLP()
    load_adapter(fresh, path)
    assert "fc1" not in adapter_layers(fresh)
    torch.testing.assert_close(fresh(ids), expected, rtol=0, atol=1e-6)


# --- resume checks ------------------------------------------------------------------------------
class Regress(L.LightningModule):
    def __init__(self, seed: int = 0, batches: int = 4):
        super().__init__()
        self.batches = batches
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))

    def forward(self, x):
        return self.body(x)

    def training_step(self, batch, batch_idx):
        return self(batch).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        return self(batch).pow(2).mean()

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(0)
        return DataLoader(list(torch.randn(2 * self.batches, 8, generator=gen)), batch_size=2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(module, cb, steps, tmp_path=None, ckpt_path=None, every=None):
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks = [cb]
    if every:
        callbacks.append(
            ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=every, save_top_k=-1)
        )
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=bool(every),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def _checkpoint(tmp_path, method=None):
    cb = LowRankCallback(method or LoRA(rank=2, alpha=4), target_modules=["body.0", "body.2"])
    module = Regress()
    trainer = _fit(module, cb, 2, tmp_path)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    return tmp_path / "a.ckpt"


@pytest.mark.parametrize(
    "method, message",
    [
        (LoRA(rank=2, alpha=8), "alpha"),
        (LoRA(rank=2, alpha=4, scaling="rslora"), "scaling"),
        (LoRA(rank=4, alpha=4), "rank"),
    ],
    ids=["alpha", "scaling", "rank"],
)
def test_resume_with_another_method_config_is_refused(tmp_path, method, message):
    ckpt = _checkpoint(tmp_path)
    module = Regress()
    cb = LowRankCallback(method, target_modules=["body.0", "body.2"])
    with pytest.raises(ValueError, match=message) as err:
        _fit(module, cb, 4, tmp_path, ckpt_path=ckpt)
    assert "size mismatch" not in str(err.value)


def test_resume_on_another_base_model_is_refused(tmp_path):
    ckpt = _checkpoint(tmp_path)
    module = Regress(seed=1)  # other base weights
    cb = LowRankCallback(LoRA(rank=2, alpha=4), target_modules=["body.0", "body.2"])
    with pytest.raises(ValueError, match="base"):
        _fit(module, cb, 4, tmp_path, ckpt_path=ckpt)


def test_resume_with_the_same_config_still_works(tmp_path):
    ckpt = _checkpoint(tmp_path)
    cb = LowRankCallback(LoRA(rank=2, alpha=4), target_modules=["body.0", "body.2"])
    trainer = _fit(Regress(), cb, 4, tmp_path, ckpt_path=ckpt)
    assert trainer.global_step == 4


# --- reuse: one callback and its schedules per module and run -----------------------------------
def test_fit_twice_continues_the_singlora_ramp():
    from lightning_lowrank import SingLoRA

    module = Regress()
    cb = LowRankCallback(SingLoRA(rank=2, ramp_steps=10), target_modules=["body.0", "body.2"])
    _fit(module, cb, 3)
    assert int(module.body[0].step) == 3
    _fit(module, cb, 2)  # a new Trainer: its global_step starts at 0, the run's does not
    assert int(module.body[0].step) == 5


def test_validate_then_fit_gives_adalora_the_fit_length():
    from lightning_lowrank import AdaLoRA

    module = Regress()
    cb = LowRankCallback(
        AdaLoRA(init_rank=2, target_rank=1, t_init=1, t_final=1, delta_t=1),
        target_modules=["body.0", "body.2"],
    )
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
    )
    trainer.validate(module, dataloaders=module.train_dataloader())
    _fit(module, cb, 6)
    allocator = cb.schedules[-1]
    assert allocator.total_steps == 6
    assert allocator.fixed  # the final phase was reached within those 6 steps


def test_a_callback_is_not_reused_on_another_module():
    cb = LowRankCallback(
        LoRA(rank=2), target_modules=["body.0"], schedules=[DeltaLoRA(start_step=1)]
    )
    _fit(Regress(), cb, 2)
    other = Regress()
    with pytest.raises(ValueError, match="new LowRankCallback"):
        _fit(other, cb, 2)
    assert not adapter_layers(other)


def test_a_schedule_is_not_reused_by_another_callback():
    delta = DeltaLoRA(start_step=1, mode="implicit")
    _fit(Regress(), LowRankCallback(LoRA(rank=2), target_modules=["body.0"], schedules=[delta]), 2)
    other = Regress()
    cb = LowRankCallback(LoRA(rank=2), target_modules=["body.0"], schedules=[delta])
    with pytest.raises(ValueError, match="new schedule"):
        _fit(other, cb, 2)
    assert not adapter_layers(other)


# --- an in-process retry from a checkpoint taken before LoRA-drop's switch -----------------------
def test_in_process_retry_before_the_lora_drop_switch_matches_an_uninterrupted_run(tmp_path):
    from lightning_lowrank import LoRADrop, adapter_state_dict

    def run(drop):
        return LowRankCallback(LoRA(rank=2), target_modules=["body.0", "body.2"], schedules=[drop])

    # one batch per epoch: every checkpoint is at an epoch end, so the data order is the same
    reference = Regress(batches=1)
    _fit(reference, run(LoRADrop(sample_steps=2, threshold=0.5, log_table=False)), 4)

    module = Regress(batches=1)
    drop = LoRADrop(sample_steps=2, threshold=0.5, log_table=False)
    cb = run(drop)
    _fit(module, cb, 4, tmp_path, every=1)  # the "crashed" run went past the switch
    assert drop.phase == "switched"
    _fit(module, cb, 4, tmp_path, ckpt_path=tmp_path / "epoch=0-step=1.ckpt")  # retry
    expected = adapter_state_dict(reference)
    got = adapter_state_dict(module)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0)


def test_a_refused_resume_leaves_the_module_as_it_was(tmp_path):
    # Lightning copies a checkpoint's tensors before calling on_load_checkpoint: the callback's
    # load pre-hook must refuse a changed config before anything is copied
    ckpt = _checkpoint(tmp_path)
    module = Regress()
    cb = LowRankCallback(LoRA(rank=2, alpha=8), target_modules=["body.0", "body.2"])
    before: dict[str, torch.Tensor] = {}

    class Snapshot(L.Callback):
        def setup(self, trainer, pl_module, stage):  # after the adapters, before any restore
            before.update({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    trainer = L.Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb, Snapshot()],
        default_root_dir=tmp_path,
    )
    with pytest.raises(ValueError, match="alpha"):
        trainer.fit(module, ckpt_path=ckpt)
    after = module.state_dict()
    assert before and set(after) == set(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
