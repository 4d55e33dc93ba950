"""Models, a LightningModule and helpers shared by the LoRA-drop tests (also imported by the DDP
scripts, which run in a subprocess)."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lowrank import LoRA, LoRADrop, LowRankCallback, adapter_layers, inject
from lightning_lowrank.schedules.lora_drop import adapter_parameters

TARGETS = r"blocks\.\d|head"
MEMBERS = ["blocks.1", "blocks.2", "blocks.3"]


class Stack(nn.Module):
    """Four same-shape layers and a head of another shape."""

    def __init__(self, d: int = 8, classes: int = 3, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.Linear(d, d, dtype=dtype) for _ in range(4)])
        self.head = nn.Linear(d, classes, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        return self.head(x)


def randomise_adapters(model: nn.Module, seed: int = 1) -> None:
    """Nonzero adapters (B is zero at init), so that every layer has an output to measure."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for p in adapter_parameters(layer).values():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def switched(mode: str = "share", shared_init: str = "mean", method=None, dtype=torch.float32):
    """A Stack with adapters and a schedule ready to switch on crafted importances: blocks.0 and
    head kept, blocks.1-3 unselected (one shape group)."""
    model = Stack(dtype=dtype)
    layers = {n: model.get_submodule(n) for n in inject(model, method or LoRA(rank=2), TARGETS)}
    randomise_adapters(model)
    schedule = LoRADrop(
        threshold=0.9, sample_steps=1, mode=mode, shared_init=shared_init, log_table=False
    )
    schedule.setup(model, layers, None)
    schedule.importance = {
        "blocks.0": 5.0,
        "blocks.1": 0.4,
        "blocks.2": 0.3,
        "blocks.3": 0.3,
        "head": 4.0,
    }
    schedule.calls = dict.fromkeys(layers, 1)
    return model, layers, schedule


def step(model, x, y, opt, schedule=None, layers=None, at=0):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    if schedule is not None:
        schedule.before_optimizer_step(model, layers, at)
    opt.step()


class StackModule(L.LightningModule):
    def __init__(self, batch_size: int = 32) -> None:
        super().__init__()
        self.net = Stack()
        self.batch_size = batch_size

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.05, weight_decay=0.01)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(32, 8, generator=g)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size)


def callback(schedule: LoRADrop) -> LowRankCallback:
    return LowRankCallback(
        LoRA(rank=2),
        target_modules=[f"blocks.{i}" for i in range(4)] + ["head"],
        schedules=[schedule],
    )


def trainer(max_steps: int, cb: LowRankCallback, **kwargs) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
        **kwargs,
    )


def fit(max_steps, ckpt_path=None, save=None, **drop_kwargs):
    module = StackModule()
    schedule = LoRADrop(threshold=0.6, sample_steps=3, log_table=False, **drop_kwargs)
    run = trainer(max_steps, callback(schedule))
    run.fit(module, ckpt_path=ckpt_path)
    if save is not None:
        run.save_checkpoint(save)
    return module, schedule
