"""AdaLoRA under DDP with 2 CPU processes: the allocator masks identically on both ranks."""

from __future__ import annotations

import pytest
import torch

from tests.ddp_utils import run_ddp

pytestmark = [pytest.mark.ddp, pytest.mark.slow]


def test_adalora_masks_identical_across_ranks_at_every_update(tmp_path):
    results = run_ddp(
        tmp_path,
        """
        import lightning as L
        import torch
        from torch import nn
        from torch.utils.data import DataLoader, TensorDataset
        from lightning_lowrank import AdaLoRA, LowRankCallback, adapter_layers

        class Model(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.net = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 8),
                                         nn.Tanh(), nn.Linear(8, 4))

            def training_step(self, batch, batch_idx):
                x, y = batch
                return (self.net(x) - y).pow(2).mean()  # a bare loss tensor

            def train_dataloader(self):
                g = torch.Generator().manual_seed(0)
                ds = TensorDataset(torch.randn(64, 8, generator=g), torch.randn(64, 4, generator=g))
                return DataLoader(ds, batch_size=4)  # each rank gets its own shard

            def configure_optimizers(self):
                return torch.optim.AdamW(self.parameters(), lr=0.05)

        class Recorder(L.Callback):
            # after LowRankCallback in the list: sees the masks each optimizer step left
            def __init__(self):
                self.masks, self.lambdas = [], []

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                layers = adapter_layers(pl_module)
                self.masks.append(torch.cat([l.rank_mask.clone() for l in layers.values()]))
                self.lambdas.append(torch.cat([l.lora_E.detach().clone() for l in layers.values()]))

        torch.manual_seed(0)
        model = Model()
        cfg = AdaLoRA(init_rank=4, target_rank=2, t_init=2, t_final=4, delta_t=2)
        cb = LowRankCallback(cfg, target_modules=["0", "2", "4"])
        rec = Recorder()
        trainer = ddp_trainer(max_steps=12, callbacks=[cb, rec])
        trainer.fit(model)
        alloc = cb.schedules[0]
        save_rank_result({
            "masks": rec.masks, "lambdas": rec.lambdas,
            "history_steps": alloc.history_steps, "history_ranks": alloc.history_ranks,
            "ipt": [t.clone() for t in alloc.ipt],
            "updates": alloc.num_updates,
        })
        """,
    )
    a, b = results
    assert a["updates"] == b["updates"] == 12
    assert a["history_steps"] == [0, 4, 6, 8, 9]
    assert a["history_ranks"] == b["history_ranks"]
    assert sum(a["history_ranks"][-1]) == 6
    assert len(a["masks"]) == len(b["masks"]) == 12
    for step, (ma, mb) in enumerate(zip(a["masks"], b["masks"], strict=True), start=1):
        torch.testing.assert_close(ma, mb, rtol=0, atol=0, msg=f"masks differ at step {step}")
    assert a["masks"][3].sum() < 12  # masking happened on the way
    for la, lb in zip(a["lambdas"], b["lambdas"], strict=True):
        torch.testing.assert_close(la, lb, rtol=0, atol=0)
    for x, y in zip(a["ipt"], b["ipt"], strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
