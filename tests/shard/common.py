"""The model, data and cases shared by the 2-rank FSDP2 script and the 1-process references.

Every case trains a tiny Llama (built in ``configure_model``) for ``STEPS`` optimizer steps on
the same global batches: the reference run sees ``GLOBAL_BATCH`` rows per step on one process,
each of the 2 ranks sees its own half (``use_distributed_sampler=False``: Lightning's sampler
would shuffle).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
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
)

STEPS = 8
GLOBAL_BATCH = 4
SEQ = 12
WORLD = 2


def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )


class TinyLM(L.LightningModule):
    """A causal LM built in ``configure_model`` (idempotent), optionally on the meta device."""

    def __init__(self, lr: float = 1e-2, meta: bool = False) -> None:
        super().__init__()
        self.lr = lr
        self.meta = meta
        self.model = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        from transformers import LlamaForCausalLM

        torch.manual_seed(0)
        if self.meta:
            with torch.device("meta"):
                self.model = LlamaForCausalLM(llama_config())
        else:
            self.model = LlamaForCausalLM(llama_config())

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def tokens(steps: int = STEPS) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 64, (steps * GLOBAL_BATCH, SEQ), generator=gen)


def loader(rank: int | None, steps: int = STEPS) -> DataLoader:
    """Rank ``rank``'s half of every global batch, or every row for ``rank=None``."""
    data = tokens(steps)
    if rank is None:
        return DataLoader(list(data), batch_size=GLOBAL_BATCH, shuffle=False)
    local = GLOBAL_BATCH // WORLD
    rows = [data[b * GLOBAL_BATCH + rank * local + i] for b in range(steps) for i in range(local)]
    return DataLoader(rows, batch_size=local, shuffle=False)


#: case name -> (callback kwargs factory)
CASES: dict[str, Callable[[], dict[str, Any]]] = {
    "lora": lambda: dict(method=LoRA(rank=4, alpha=8)),
    "rslora": lambda: dict(method=LoRA(rank=4, alpha=8, scaling="rslora")),
    "lora_fa": lambda: dict(method=LoRA(rank=4, alpha=8, train_a=False)),
    "lora_plus": lambda: dict(method=LoRA(rank=4, alpha=8), lr_ratio=4.0),
    "dora": lambda: dict(method=DoRA(rank=4, alpha=8)),
    "vera": lambda: dict(method=VeRA(rank=8)),
    "singlora": lambda: dict(method=SingLoRA(rank=4, alpha=8, ramp_steps=4)),
    "sltrain": lambda: dict(method=SLTrain(rank=4, alpha=8, density=0.05)),
    "adalora": lambda: dict(
        method=AdaLoRA(init_rank=4, target_rank=2, t_init=2, t_final=2, delta_t=1)
    ),
    "delta_lora": lambda: dict(
        method=LoRA(rank=4, alpha=8), schedules=[DeltaLoRA(scale=2.0, start_step=2)]
    ),
    "delta_lora_implicit": lambda: dict(
        method=LoRA(rank=4, alpha=8),
        schedules=[DeltaLoRA(scale=2.0, start_step=2, mode="implicit")],
    ),
    "lora_drop": lambda: dict(
        method=LoRA(rank=4, alpha=8), schedules=[LoRADrop(threshold=0.5, sample_steps=3)]
    ),
    "lora_drop_drop": lambda: dict(
        method=LoRA(rank=4, alpha=8),
        schedules=[LoRADrop(threshold=0.5, sample_steps=3, mode="drop")],
    ),
}

PLAIN = ["lora", "rslora", "lora_fa", "lora_plus", "dora", "vera", "singlora", "sltrain"]


def trainer(distributed: bool, steps: int = STEPS, **kwargs: Any) -> L.Trainer:
    if distributed:
        from lightning.pytorch.strategies import ModelParallelStrategy

        save_dcp = kwargs.pop("save_distributed_checkpoint", False)
        strategy: Any = ModelParallelStrategy(
            data_parallel_size=WORLD, tensor_parallel_size=1, save_distributed_checkpoint=save_dcp
        )
        devices = WORLD
    else:
        strategy, devices = "auto", 1
    defaults = dict(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def callback(case: str) -> LowRankCallback:
    kwargs = CASES[case]()
    kwargs.setdefault("target_modules", "all-linear")
    return LowRankCallback(**kwargs)


def schedule_facts(cb: LowRankCallback) -> dict[str, Any]:
    """What must be identical on every rank and equal to one process: AdaLoRA's masks and
    LoRA-drop's selections (from the schedules' own state)."""
    facts: dict[str, Any] = {}
    for i, schedule in enumerate(cb.schedules):
        state = schedule.state_dict()
        facts[f"{type(schedule).__name__}{i}"] = state
    masks = {
        n: layer.rank_mask.detach().clone()
        for n, layer in cb.layers.items()
        if hasattr(layer, "rank_mask")
    }
    if masks:
        facts["masks"] = masks
    return facts


def run(case: str, out: Any, rank: int | None) -> dict[str, Any]:
    """Train ``case`` (2 ranks when ``rank`` is an int, else one process) and write its adapter
    to ``out / f"{case}.safetensors"`` (from rank 0 only when distributed)."""
    from lightning_lowrank import save_adapter
    from lightning_lowrank.shard import save_merged

    distributed = rank is not None
    module = TinyLM()
    cb = callback(case)
    t = trainer(distributed, callbacks=[cb])
    t.fit(module, loader(rank))
    save_adapter(module, out / f"{case}.safetensors")
    save_merged(module, out / f"{case}_merged.safetensors")
    return schedule_facts(cb)
