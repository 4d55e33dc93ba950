"""Class C: real use that used to fail (strategies, run lengths, PyTorch attention, checkpoints)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_lowrank import (
    AdaLoRA,
    LoRA,
    LoRADrop,
    LowRankCallback,
    adapter_layers,
    find_targets,
    inject,
    load_adapter_checkpoint,
)


class Stream(IterableDataset):
    """A dataset without a length: Lightning cannot know the steps per epoch."""

    def __iter__(self):
        gen = torch.Generator().manual_seed(0)
        for _ in range(6):
            yield torch.randn(8, generator=gen)


class Net(L.LightningModule):
    def __init__(self, data=None):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 1)
        self.data = data
        self.steps_run = 0

    def forward(self, x):
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        self.steps_run += 1
        return self(batch).pow(2).mean()

    def train_dataloader(self):
        if self.data is not None:
            return DataLoader(self.data, batch_size=2)
        gen = torch.Generator().manual_seed(0)
        return DataLoader(list(torch.randn(8, 8, generator=gen)), batch_size=2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(**kwargs):
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


class MyDDP(DDPStrategy):
    """Stands for DeepSpeedStrategy / XLAStrategy, which subclass DDPStrategy."""


class MySingle(SingleDeviceStrategy):
    """Stands for SingleDeviceXLAStrategy."""


@pytest.mark.parametrize(
    "strategy",
    [
        MyDDP(),
        MySingle(device=torch.device("cpu")),
        DDPStrategy(start_method="spawn"),
        DDPStrategy(start_method="fork"),
    ],
    ids=["ddp-subclass", "single-subclass", "ddp_spawn", "ddp_fork"],
)
def test_only_tested_strategies_are_accepted_by_exact_type(strategy):
    module = Net()
    cb = LowRankCallback(LoRA(rank=2), target_modules=["body.0"])
    trainer = _trainer(strategy=strategy, devices=1)
    with pytest.raises(ValueError, match="strategy='ddp'"):
        cb.setup(trainer, module, "fit")
    assert not adapter_layers(module)


def test_ddp_spawn_by_name_is_refused():
    module = Net()
    cb = LowRankCallback(LoRA(rank=2), target_modules=["body.0"])
    trainer = _trainer(strategy="ddp_spawn", devices=2)
    with pytest.raises(ValueError, match="spawn"):
        cb.setup(trainer, module, "fit")
    assert not adapter_layers(module)


@pytest.mark.parametrize(
    "second",
    [
        lambda: LowRankCallback(LoRA(rank=2), target_modules=["body.2"]),
        lambda: LowRankCallback(AdaLoRA(init_rank=2, target_rank=1, total_steps=50)),
        lambda: LowRankCallback(LoRA(rank=2), target_modules=["body.0"]),
    ],
    ids=["other-targets", "other-method", "same-config"],
)
def test_two_callbacks_get_this_librarys_message(second):
    first = LowRankCallback(LoRA(rank=2), target_modules=["body.0"])
    module = Net()
    with pytest.raises(ValueError, match="LowRankCallbacks"):
        _trainer(max_steps=1, callbacks=[first, second()]).fit(module)
    assert not adapter_layers(module)


def test_iterable_dataset_with_adalora_and_max_epochs_fails_before_the_first_step():
    module = Net(data=Stream())
    cb = LowRankCallback(AdaLoRA(init_rank=2, target_rank=1, t_init=0, t_final=0))
    with pytest.raises(ValueError, match="max_steps") as err:
        _trainer(max_epochs=1, callbacks=[cb]).fit(module)
    assert "-1" not in str(err.value)
    assert module.steps_run == 0


def test_iterable_dataset_with_lora_drop_fraction_fails_before_the_first_step():
    module = Net(data=Stream())
    cb = LowRankCallback(
        LoRA(rank=2), target_modules=["body.0", "body.2"], schedules=[LoRADrop(log_table=False)]
    )
    with pytest.raises(ValueError, match="sample_steps"):
        _trainer(max_steps=4, callbacks=[cb]).fit(module)
    assert module.steps_run == 0


def test_iterable_dataset_with_lora_drop_sample_steps_runs():
    module = Net(data=Stream())
    drop = LoRADrop(sample_steps=2, log_table=False)
    cb = LowRankCallback(LoRA(rank=2), target_modules=["body.0", "body.2"], schedules=[drop])
    _trainer(max_steps=3, callbacks=[cb]).fit(module)
    assert drop.phase == "switched"


# --- PyTorch's own attention: its forward reads out_proj.weight directly ------------------------
def test_multihead_attention_out_proj_is_refused_by_name():
    model = nn.Sequential(nn.MultiheadAttention(8, 2))
    with pytest.raises(ValueError, match="MultiheadAttention"):
        inject(model, LoRA(rank=2), target_modules=["out_proj"])
    assert not adapter_layers(model)


def test_encoder_layer_linears_are_refused_by_name():
    model = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    with pytest.raises(ValueError, match="TransformerEncoderLayer"):
        inject(model, LoRA(rank=2), target_modules=["linear1", "linear2"])
    assert not adapter_layers(model)


@pytest.mark.parametrize("train", [True, False])
def test_all_linear_leaves_pytorch_attention_alone_and_the_model_runs(train):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0), nn.Linear(8, 8)
    )
    assert set(find_targets(model, "all-linear")) == {"1"}
    inject(model, LoRA(rank=2), target_modules="all-linear")
    model.train(train)
    x = torch.randn(2, 3, 8)
    with torch.set_grad_enabled(train):
        assert model(x).shape == (2, 3, 8)


# --- an adapter-only checkpoint into a bare module --------------------------------------------
def test_load_adapter_checkpoint_gives_the_trained_outputs(tmp_path):
    module = Net()
    cb = LowRankCallback(LoRA(rank=2, alpha=4), target_modules=["body.0", "body.2"])
    trainer = _trainer(max_steps=3, callbacks=[cb], default_root_dir=tmp_path)
    trainer.fit(module)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    x = torch.randn(4, 8)
    expected = module(x)
    with pytest.raises(RuntimeError):
        Net.load_from_checkpoint(tmp_path / "a.ckpt")  # what load_adapter_checkpoint replaces
    fresh = Net()
    names = load_adapter_checkpoint(fresh, tmp_path / "a.ckpt")
    assert names == ["body.0", "body.2"]
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)


def test_load_adapter_checkpoint_into_another_model_changes_nothing(tmp_path):
    module = Net()
    cb = LowRankCallback(LoRA(rank=2), target_modules=["body.0"])
    trainer = _trainer(max_steps=1, callbacks=[cb], default_root_dir=tmp_path)
    trainer.fit(module)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    other = nn.Module()
    other.body = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError):
        load_adapter_checkpoint(other, tmp_path / "a.ckpt")
    assert not adapter_layers(other)


# --- adapter files name layers relative to the model root --------------------------------------
class Wrapper(L.LightningModule):
    """The docs' flow: a LightningModule holding a transformers model as ``self.model``."""

    def __init__(self):
        super().__init__()
        from tests.conftest import tiny_bert

        self.model = tiny_bert()

    def forward(self, ids):
        return self.model(ids).logits


IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))


def _randomised(model, method):
    inject(model, method, target_modules=["query", "value"])
    torch.manual_seed(5)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for name, p in layer.named_parameters():
                if not name.startswith("base."):
                    p.normal_(std=0.1)


@pytest.mark.parametrize("method", [LoRA(rank=2, alpha=4), None], ids=["lora", "sltrain"])
def test_saved_from_a_lightning_module_loads_into_the_bare_model(tmp_path, method):
    from lightning_lowrank import SLTrain, load_adapter, save_adapter
    from tests.conftest import tiny_bert

    method = method or SLTrain(rank=2, density=0.1, seed=4)
    wrapper = Wrapper()
    _randomised(wrapper, method)
    expected = wrapper(IDS)
    path = save_adapter(wrapper, tmp_path / "a.safetensors")
    bare = tiny_bert()
    names = load_adapter(bare, path)
    assert all(n.startswith("bert.") for n in names)
    with torch.no_grad():
        torch.testing.assert_close(bare(IDS).logits, expected.detach(), rtol=0, atol=1e-6)
    again = Wrapper()  # and back into a wrapper
    load_adapter(again, path)
    torch.testing.assert_close(again(IDS), expected, rtol=0, atol=1e-6)


def test_names_of_a_compiled_model_have_no_orig_mod(tmp_path):
    from lightning_lowrank import load_adapter, read_adapter, save_adapter
    from tests.conftest import tiny_bert

    model = tiny_bert()
    _randomised(model, LoRA(rank=2, alpha=4))
    expected = model(IDS).logits
    compiled = torch.compile(model)  # names gain "_orig_mod."; nothing is compiled until a call
    path = save_adapter(compiled, tmp_path / "c.safetensors")
    _, meta = read_adapter(path)
    assert not any("_orig_mod" in n for n in meta["layers"])
    plain = tiny_bert()
    load_adapter(plain, path)
    torch.testing.assert_close(plain(IDS).logits, expected, rtol=0, atol=1e-6)
    target = torch.compile(tiny_bert())
    load_adapter(target, path)
    torch.testing.assert_close(target._orig_mod(IDS).logits, expected, rtol=0, atol=1e-6)


# --- SLTrain under autocast ---------------------------------------------------------------------
@pytest.mark.parametrize("pretrain", [False, True], ids=["adapter", "pretrain"])
def test_sltrain_runs_under_bf16_autocast(pretrain):
    from lightning_lowrank import SLTrain, sltrain_pretrain

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    if pretrain:
        sltrain_pretrain(model, rank=2, density=0.2)
    else:
        inject(model, SLTrain(rank=2, density=0.2), target_modules=["0", "2"])
        with torch.no_grad():
            model[0].sparse_values.normal_()
            model[2].sparse_values.normal_()
    x = torch.randn(3, 8)
    reference = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().sum().backward()
    grad = model[0].sparse_values.grad
    assert grad is not None and grad.dtype == torch.float32 and torch.isfinite(grad).all()
    # bf16 has 8 bits of mantissa: a loose tolerance, stated
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)


# --- PEFT's save_embedding_layers output ----------------------------------------------------------
def test_import_peft_of_saved_embedding_layers_matches_peft(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    from lightning_lowrank import import_peft
    from tests.conftest import tiny_gpt2

    peft_model = get_peft_model(
        tiny_gpt2(),
        LoraConfig(r=2, lora_alpha=4, target_modules=["wte", "c_attn"], init_lora_weights=False),
    )
    peft_model.save_pretrained(tmp_path / "emb", save_embedding_layers=True)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    reference = PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "emb").eval()
    model = tiny_gpt2()
    import_peft(model, tmp_path / "emb")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)
