"""SingLoRA: dW = s * u(t) * A[:out] @ A[:in].T, u(t) = min(t / T, 1) in optimizer steps."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lowrank import (
    LoRA,
    LowRankCallback,
    SingLoRA,
    adapter_layers,
    inject,
    load_adapter,
    merge,
    save_adapter,
    set_step,
    trainable_parameter_count,
    unmerge,
)
from lightning_lowrank.io import read_adapter
from lightning_lowrank.methods.singlora import SingLoRALayer
from tests.conftest import tiny_bert, tiny_gpt2


def _perturb(layer: SingLoRALayer) -> None:
    with torch.no_grad():
        layer.lora_A.normal_()


@pytest.mark.parametrize(("out_f", "in_f"), [(6, 6), (9, 5), (4, 11)])
@pytest.mark.parametrize("scaling", ["standard", "rslora"])
def test_output_equals_base_plus_dense_delta(out_f, in_f, scaling):
    """Square, out > in and out < in (one public implementation gets out > in wrong)."""
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f).double()
    layer = SingLoRALayer(base, SingLoRA(rank=3, alpha=6.0, scaling=scaling, ramp_steps=10))
    assert layer.lora_A.shape == (max(out_f, in_f), 3)
    x = torch.randn(4, 2, in_f, dtype=torch.float64)
    _perturb(layer)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)  # u(0) = 0 with a random A
    s = 6.0 / 3 if scaling == "standard" else 6.0 / math.sqrt(3)
    a = layer.lora_A.detach()
    for step, u in [(4, 0.4), (10, 1.0), (25, 1.0)]:
        layer.set_step(step)
        dw = s * u * a[:out_f] @ a[:in_f].T  # built independently of the layer
        assert dw.shape == (out_f, in_f)
        expected = x @ (base.weight + dw).T + base.bias
        torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.delta_weight(), dw, rtol=1e-12, atol=1e-12)


def test_square_update_is_symmetric_and_ramp_disabled():
    layer = SingLoRALayer(nn.Linear(5, 5).double(), SingLoRA(rank=2, ramp_steps=0))
    _perturb(layer)
    dw = layer.delta_weight()
    torch.testing.assert_close(dw, dw.T)
    assert torch.linalg.matrix_rank(dw) == 2
    assert layer.ramp_value().item() == 1.0  # T = 0: no ramp


def test_conv1d_and_embedding():
    torch.manual_seed(1)
    conv = tiny_gpt2().double().transformer.h[0].mlp.c_fc  # Conv1D weight (in=16, out=64)
    layer = SingLoRALayer(conv, SingLoRA(rank=2, ramp_steps=1))
    layer.set_step(1)
    _perturb(layer)
    x = torch.randn(3, 16, dtype=torch.float64)
    a = layer.lora_A.detach()
    dw = 8.0 * a[:64] @ a[:16].T
    torch.testing.assert_close(layer(x), x @ (conv.weight.T + dw).T + conv.bias)
    emb = nn.Embedding(10, 4).double()
    layer = SingLoRALayer(emb, SingLoRA(rank=2, ramp_steps=1))
    layer.set_step(1)
    _perturb(layer)
    ids = torch.randint(0, 10, (2, 3))
    a = layer.lora_A.detach()
    dw = 8.0 * a[:4] @ a[:10].T  # (out=dim, in=vocab)
    torch.testing.assert_close(layer(ids), (emb.weight.T + dw).T[ids])


def test_init_kaiming_over_input_dim():
    torch.manual_seed(0)
    layer = SingLoRALayer(nn.Linear(300, 400), SingLoRA(rank=16))
    bound = 1 / math.sqrt(400)
    assert bound * 0.95 < layer.lora_A.abs().max() <= bound


def test_half_of_lora_parameters_on_square_layers():
    def count(method):
        model = tiny_bert()
        inject(model, method, target_modules=["query", "key", "value"])  # 16 x 16
        return trainable_parameter_count(model), adapter_layers(model)

    n_lora, _ = count(LoRA(rank=4))
    n_sing, layers = count(SingLoRA(rank=4))
    assert n_sing * 2 == n_lora
    model = tiny_bert()
    inject(model, SingLoRA(rank=4), target_modules="all-linear")
    expected = sum(
        4 * max(la.in_features, la.out_features) for la in adapter_layers(model).values()
    )
    assert trainable_parameter_count(model) == expected


def test_merge_unmerge_and_save_load_carry_the_step(tmp_path):
    torch.manual_seed(2)
    model = tiny_bert().double()
    inject(model, SingLoRA(rank=2, ramp_steps=8), target_modules="all-linear")
    for layer in adapter_layers(model).values():
        _perturb(layer)
    set_step(model, 3)
    ids = torch.randint(0, 64, (2, 6))
    expected = model(ids).logits
    w0 = {n: la.base.weight.detach().clone() for n, la in adapter_layers(model).items()}
    merge(model)
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-10, atol=1e-10)
    unmerge(model)
    for n, la in adapter_layers(model).items():
        torch.testing.assert_close(la.base.weight, w0[n], rtol=1e-12, atol=1e-12)
    path = save_adapter(model, tmp_path / "sing.safetensors")
    tensors, _ = read_adapter(path)
    assert all(k.endswith(("lora_A", "step")) for k in tensors)
    fresh = tiny_bert().double()
    load_adapter(fresh, path)
    assert all(int(la.step) == 3 for la in adapter_layers(fresh).values())
    torch.testing.assert_close(fresh(ids).logits, expected)


# --- the ramp inside a Lightning fit ----------------------------------------------------------
class _RampProbe(pl.LightningModule):
    """Records the layer's step at every training and validation forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
        self.seen: list[tuple[str, int]] = []

    def _step_of_layer(self) -> int:
        return int(adapter_layers(self)["net.0"].step)

    def training_step(self, batch, batch_idx):
        self.seen.append(("train", self._step_of_layer()))
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        self.seen.append(("val", self._step_of_layer()))
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader(n: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)), batch_size=2
    )


def _trainer(tmp_path, max_steps: int, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps,
        accumulate_grad_batches=4,
        val_check_interval=2,
        limit_val_batches=2,
        callbacks=[LowRankCallback(SingLoRA(rank=2, ramp_steps=4), target_modules=["net.0"])],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


@pytest.mark.slow
def test_ramp_advances_once_per_optimizer_step_and_resumes(tmp_path):
    module = _RampProbe()
    trainer = _trainer(tmp_path, max_steps=3, enable_checkpointing=True)
    trainer.fit(module, _loader(), _loader(8))
    train = [s for kind, s in module.seen if kind == "train"]
    # 4 micro-batches per optimizer step, the step only moves after each 4th
    assert train == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert any(kind == "val" for kind, _ in module.seen)
    assert int(adapter_layers(module)["net.0"].step) == 3
    ckpt = trainer.checkpoint_callback.best_model_path or str(tmp_path / "last.ckpt")
    if not trainer.checkpoint_callback.best_model_path:
        trainer.save_checkpoint(ckpt)
    stored = torch.load(ckpt, weights_only=False)["state_dict"]
    assert int(stored["net.0.step"]) == 3  # the step travels in the checkpoint

    resumed = _RampProbe()
    trainer = _trainer(tmp_path, max_steps=5)
    trainer.fit(resumed, _loader(), _loader(8), ckpt_path=ckpt)
    train = [s for kind, s in resumed.seen if kind == "train"]
    assert train == [3, 3, 3, 3, 4, 4, 4, 4]
    layer = adapter_layers(resumed)["net.0"]
    assert int(layer.step) == 5
    assert layer.ramp_value().item() == 1.0
