"""LoRA under DDP with 2 CPU processes: adapter weights stay identical on both ranks."""

from __future__ import annotations

import pytest
import torch

from tests.ddp_utils import run_ddp

pytestmark = [pytest.mark.ddp, pytest.mark.slow]


def test_lora_adapters_identical_across_ranks(tmp_path):
    results = run_ddp(
        tmp_path,
        """
        import torch
        from lightning.pytorch.demos.boring_classes import BoringModel
        from lightning_lowrank import LowRankCallback, LoRA, adapter_state_dict

        class Model(BoringModel):
            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        torch.manual_seed(0)
        model = Model()
        cb = LowRankCallback(LoRA(rank=2, alpha=4), target_modules=["layer"], lr_ratio=4)
        trainer = ddp_trainer(max_steps=4, callbacks=[cb])
        trainer.fit(model)
        save_rank_result({k: v.detach().clone() for k, v in adapter_state_dict(model).items()})
        """,
    )
    a, b = results
    assert set(a) == {"layer.lora_A", "layer.lora_B"}
    assert a["layer.lora_B"].abs().sum() > 0  # training happened
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
