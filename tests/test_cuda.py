"""Every method on a CUDA device: the same numbers as on the CPU, Trainer runs with the scheduled
methods, adapter files moving between devices, and bf16 autocast.

Skipped where no CUDA device is present (CI has none); run with ``pytest tests/test_cuda.py``
on a machine with a GPU.
"""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import RandomDataset
from torch import nn
from torch.utils.data import DataLoader

from lightning_lowrank import (
    AdaLoRA,
    DeltaLoRA,
    DoRA,
    LoRA,
    LoRADrop,
    LowRankCallback,
    SingLoRA,
    SLTrain,
    VeRA,
    adapter_layers,
    inject,
    load_adapter,
    merge,
    save_adapter,
)

from .conftest import tiny_bert, tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CONFIGS = {
    "lora": lambda: LoRA(rank=4, alpha=8.0),
    "rslora": lambda: LoRA(rank=4, alpha=8.0, scaling="rslora"),
    "lora-fa": lambda: LoRA(rank=4, train_a=False),
    "dora": lambda: DoRA(rank=4),
    "vera": lambda: VeRA(rank=8),
    "singlora": lambda: SingLoRA(rank=4, ramp_steps=10),
    "sltrain": lambda: SLTrain(rank=4, density=0.1),
    "adalora": lambda: AdaLoRA(init_rank=6, target_rank=4, total_steps=100),
}
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
# BERT for the float64 comparisons: Llama's rotary embedding is computed in float32 whatever the
# model's dtype, and float32 differs between CPU and GPU kernels at about 1e-7
BERT_TARGETS = ["query", "value", "intermediate.dense", "output.dense"]


def _randomise(model: nn.Module, seed: int = 1) -> None:
    """Give every adapter parameter a random value (B = 0 at initialisation hides mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for p in layer.parameters():
                if p.requires_grad:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _loss_and_grads(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    logits = model(input_ids=ids).logits
    logits.pow(2).mean().backward()
    grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach().cpu(), grads


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cuda_matches_cpu_in_float64(name):
    cpu = tiny_bert().double()
    torch.manual_seed(0)
    inject(cpu, CONFIGS[name](), target_modules=BERT_TARGETS)
    _randomise(cpu)
    moved = copy.deepcopy(cpu).cuda()  # injected on the CPU, then moved

    # injected on the GPU: every buffer the method builds must land there, and the CPU state
    # loads into it unchanged
    on_gpu = tiny_bert().double().cuda()
    torch.manual_seed(0)
    inject(on_gpu, CONFIGS[name](), target_modules=BERT_TARGETS)
    on_gpu.load_state_dict(cpu.state_dict())
    assert all(t.is_cuda for t in on_gpu.state_dict().values())

    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    ref_out, ref_grads = _loss_and_grads(cpu, ids)
    for model in (moved, on_gpu):
        out, grads = _loss_and_grads(model, ids.cuda())
        torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
        assert grads.keys() == ref_grads.keys()
        for n in grads:
            torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-9, atol=1e-12, msg=n)

    if name != "adalora":  # merging AdaLoRA's masked slots is covered on the CPU
        merge(moved)
        with torch.no_grad():
            merged = moved.eval()(input_ids=ids.cuda()).logits.cpu()
            want = cpu.eval()(input_ids=ids).logits
        torch.testing.assert_close(merged, want, rtol=1e-9, atol=1e-11)


def test_adapter_saved_on_gpu_loads_on_cpu(tmp_path):
    for name, make in CONFIGS.items():
        gpu = tiny_llama().cuda()
        torch.manual_seed(0)
        inject(gpu, make(), target_modules=TARGETS)
        _randomise(gpu)
        path = save_adapter(gpu, tmp_path / f"{name}.safetensors")
        cpu = tiny_llama()
        load_adapter(cpu, path)
        ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = gpu(input_ids=ids.cuda()).logits.cpu()
            got = cpu(input_ids=ids).logits
        # float32 on two devices: different kernels, so not bit-equal
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)


def test_lora_under_bf16_autocast():
    model = tiny_llama().cuda()
    inject(model, LoRA(rank=4), target_modules=TARGETS)
    _randomise(model)
    ids = torch.randint(0, 64, (2, 8), device="cuda")
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = model(input_ids=ids).logits
    # bf16 keeps 8 bits of mantissa: agreement to about 1e-2 relative is all one can ask
    torch.testing.assert_close(got.float(), want, rtol=5e-2, atol=5e-2)


class _Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh())
        self.head = nn.Linear(32, 2)
        self.devices_seen: set[str] = set()

    def forward(self, x):
        return self.head(self.net(x))

    def training_step(self, batch, batch_idx):
        self.devices_seen.add(batch.device.type)
        return self(batch).pow(2).mean()

    def train_dataloader(self):
        torch.manual_seed(123)
        return DataLoader(RandomDataset(32, 64), batch_size=8)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.01)


@pytest.mark.parametrize(
    ("method", "schedules", "lr_ratio"),
    [
        (LoRA(rank=4), [], 16.0),
        (DoRA(rank=4), [], None),
        (VeRA(rank=16), [], None),
        (SingLoRA(rank=4, ramp_steps=4), [], None),
        (SLTrain(rank=4, density=0.1), [], None),
        (AdaLoRA(init_rank=6, target_rank=3, t_init=2, t_final=2, delta_t=1), [], None),
        (LoRA(rank=4), [LoRADrop(sample_steps=3)], None),
        (LoRA(rank=4), [DeltaLoRA(start_step=3)], None),
        (LoRA(rank=4), [DeltaLoRA(start_step=3, mode="implicit")], None),
    ],
    ids=[
        "lora+",
        "dora",
        "vera",
        "singlora",
        "sltrain",
        "adalora",
        "lora-drop",
        "delta-inplace",
        "delta-implicit",
    ],
)
def test_trainer_fit_on_gpu(method, schedules, lr_ratio, tmp_path):
    model = _Net()
    cb = LowRankCallback(
        method,
        target_modules=["net.0", "net.2"],
        train_modules=["head"],
        schedules=schedules,
        lr_ratio=lr_ratio,
    )
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        max_steps=10,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model)
    assert trainer.global_step == 10
    assert model.devices_seen == {"cuda"}
    # Lightning moves the module back to the CPU at the end
    assert all(torch.isfinite(p).all() for p in model.parameters())
    layers = adapter_layers(model)
    for name, layer in layers.items():  # LoRA-drop: the ties survive both moves
        host = layer.adapter_host
        if host is not None:
            for pname, p in host.named_parameters():
                if not pname.startswith("base."):
                    assert getattr(layer, pname) is p and p.device.type == "cpu", (name, pname)
    save_adapter(model, tmp_path / "adapter.safetensors")


# --- quantized bases: bitsandbytes' CUDA kernels --------------------------------------------------
@pytest.mark.parametrize("name", ["lora", "dora", "vera", "singlora", "adalora", "sltrain"])
def test_nf4_base_on_gpu_matches_a_dense_base_of_the_dequantized_weights(name, tmp_path):
    pytest.importorskip("bitsandbytes")
    from tests.quant.helpers import METHODS, dense_twin, ids, llama, loss_and_grads, randomise
    from tests.quant.helpers import TARGETS as QUANT_TARGETS

    model = llama().cuda()
    torch.manual_seed(0)
    inject(model, METHODS[name](), target_modules=QUANT_TARGETS, quantize_base="nf4")
    assert all(layer.base.weight.is_cuda for layer in adapter_layers(model).values())
    randomise(model)
    twin = dense_twin(model, name)  # on the CPU, weights dequantized by the CUDA kernel
    out, grads = loss_and_grads(model, ids().cuda())
    want, want_grads = loss_and_grads(twin, ids())
    # float32 on two devices: different kernels, so not bit-equal
    torch.testing.assert_close(out.cpu(), want, rtol=1e-4, atol=1e-5)
    for key in want_grads:
        torch.testing.assert_close(grads[key].cpu(), want_grads[key], rtol=1e-3, atol=1e-6)
    path = save_adapter(model, tmp_path / "a.safetensors")
    cpu = llama()
    load_adapter(cpu, path)  # quantized again on the CPU, the same codes
    with torch.no_grad():
        got = cpu(input_ids=ids()).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_qlora_trainer_fit_on_gpu():
    pytest.importorskip("bitsandbytes")
    from lightning_lowrank import unload

    model = _Net()
    cb = LowRankCallback(
        DoRA(rank=4), target_modules=["net.0", "net.2"], train_modules=["head"], quantize_base="nf4"
    )
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        max_steps=10,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model)
    assert trainer.global_step == 10 and model.devices_seen == {"cuda"}
    x = torch.randn(4, 32)
    with torch.no_grad():
        want = model.cuda()(x.cuda())
        unload(model, dtype=torch.float32)
        torch.testing.assert_close(model(x.cuda()), want, rtol=1e-4, atol=1e-5)
