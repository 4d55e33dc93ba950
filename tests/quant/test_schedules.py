"""The callback over a quantized base: ``LowRankCallback(..., quantize_base="nf4")`` with LoRA+,
AdaLoRA, LoRA-drop and Delta-LoRA's implicit form; Delta-LoRA in place refused; adapter-only
checkpoints leave the 4-bit storage out and resume."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

pytest.importorskip("bitsandbytes")

from lightning_lowrank import (  # noqa: E402
    AdaLoRA,
    DeltaLoRA,
    DoRA,
    LoRA,
    LoRADrop,
    LowRankCallback,
    adapter_layers,
    inject,
    load_adapter,
    save_adapter,
)
from lightning_lowrank.methods.base import is_quantized  # noqa: E402
from tests.quant.helpers import ids, llama  # noqa: E402


class _LM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = llama()

    def forward(self, tokens):
        return self.model(input_ids=tokens).logits

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(
            self(batch)[:, :-1].flatten(0, 1), batch[:, 1:].flatten()
        )

    def train_dataloader(self):
        data = torch.randint(0, 64, (48, 8), generator=torch.Generator().manual_seed(0))
        return DataLoader(data, batch_size=4)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def _trainer(steps: int, tmp_path, **kwargs) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize(
    ("method", "schedules", "lr_ratio"),
    [
        (LoRA(rank=4), [], 16.0),
        (DoRA(rank=4), [], None),
        (AdaLoRA(init_rank=6, target_rank=3, t_init=2, t_final=2, delta_t=1), [], None),
        (LoRA(rank=4), [LoRADrop(sample_steps=3)], None),
        (LoRA(rank=4), [DeltaLoRA(start_step=3, mode="implicit")], None),
    ],
    ids=["lora+", "dora", "adalora", "lora-drop", "delta-implicit"],
)
def test_callback_trains_over_an_nf4_base_and_files_reload_exactly(
    method, schedules, lr_ratio, tmp_path
):
    module = _LM()
    cb = LowRankCallback(
        method,
        target_modules=TARGETS,
        schedules=schedules,
        lr_ratio=lr_ratio,
        quantize_base="nf4",
        total_steps=8,
    )
    _trainer(8, tmp_path, callbacks=[cb], enable_checkpointing=False).fit(module)
    layers = adapter_layers(module)
    assert layers and all(is_quantized(la.base) for la in layers.values())
    assert all(torch.isfinite(p).all() for p in module.parameters() if p.is_floating_point())
    moved = [la for la in layers.values() if not la.disabled and la.adapter_host is None]
    assert moved and any(
        p.abs().sum() > 0 for la in moved for n, p in la.named_parameters() if "lora_B" in n
    )
    path = save_adapter(module.model, tmp_path / "a.safetensors")
    fresh = llama()
    load_adapter(fresh, path)
    tokens = ids()
    with torch.no_grad():
        want = module.model.eval()(input_ids=tokens).logits
        assert torch.equal(fresh.eval()(input_ids=tokens).logits, want)


def test_delta_lora_in_place_is_refused_over_a_quantized_base():
    with pytest.raises(ValueError, match="mode='implicit'"):
        LowRankCallback(LoRA(rank=4), schedules=[DeltaLoRA()], quantize_base="nf4")
    # a model quantized beforehand: refused when the schedule is set up, naming the fix
    model = llama()
    inject(model, LoRA(rank=4), target_modules=TARGETS, quantize_base="nf4")
    layers = adapter_layers(model)
    with pytest.raises(ValueError, match="mode='implicit'"):
        DeltaLoRA().setup(model, layers, total_steps=10)
    assert all(la.extension is None for la in layers.values())


def test_adapter_only_checkpoint_leaves_the_4bit_storage_out_and_resumes(tmp_path):
    module = _LM()
    cb = LowRankCallback(LoRA(rank=4), target_modules=TARGETS, quantize_base="nf4")
    trainer = _trainer(4, tmp_path, callbacks=[cb], enable_checkpointing=False)
    trainer.fit(module)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    assert state and all(".base." not in k for k in state)
    resumed = _LM()
    cb2 = LowRankCallback(LoRA(rank=4), target_modules=TARGETS, quantize_base="nf4")
    _trainer(6, tmp_path, callbacks=[cb2], enable_checkpointing=False).fit(resumed, ckpt_path=ckpt)
    assert all(is_quantized(la.base) for la in adapter_layers(resumed).values())
