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
#: hidden and intermediate sizes bitsandbytes can quantize (every in_features a multiple of 32)
QUANT_WIDTHS = (32, 64)


def llama_config(hidden_size: int = 16, intermediate_size: int = 32):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=64,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )


class TinyLM(L.LightningModule):
    """A causal LM built in ``configure_model`` (idempotent), optionally on the meta device.

    ``base="wide"`` builds it at ``QUANT_WIDTHS``; ``base="bnb"`` also stores its layers as
    bitsandbytes builds them (a model that comes quantized): ``Linear4bit`` NF4 attention and
    gate/up projections, int8 ``Linear8bitLt`` down projections."""

    def __init__(self, lr: float = 1e-2, meta: bool = False, base: str = "dense") -> None:
        super().__init__()
        self.lr = lr
        self.meta = meta
        self.base = base
        self.model = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        from transformers import LlamaForCausalLM

        config = llama_config(*QUANT_WIDTHS) if self.base != "dense" else llama_config()
        torch.manual_seed(0)
        if self.meta:
            with torch.device("meta"):
                self.model = LlamaForCausalLM(config)
        else:
            self.model = LlamaForCausalLM(config)
        if self.base == "bnb":
            quantize_as_bitsandbytes(self.model)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def quantize_as_bitsandbytes(model: torch.nn.Module) -> None:
    """Store ``model``'s decoder linear layers as bitsandbytes does when it loads a quantized
    model: NF4 ``Linear4bit`` (blocks of 32, double quantisation), int8 for ``down_proj``."""
    import bitsandbytes as bnb

    from lightning_lowrank.quant import NF4
    from lightning_lowrank.quant.model import quantize_named

    names = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and "layers" in n]
    quantize_named(model, {n: NF4(blocksize=32) for n in names if not n.endswith("down_proj")})
    for name in [n for n in names if n.endswith("down_proj")]:
        dense = model.get_submodule(name)
        int8 = bnb.nn.Linear8bitLt(
            dense.in_features, dense.out_features, bias=False, has_fp16_weights=False
        )
        int8.weight = bnb.nn.Int8Params(
            dense.weight.detach().clone(), requires_grad=False, has_fp16_weights=False
        )
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, int8.to("cpu"))  # .to quantizes to int8


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
    # over a quantized base: NF4 by quantize_base, or a model that comes quantized (NF4 + int8)
    "nf4_lora": lambda: dict(method=LoRA(rank=4, alpha=8), quantize_base="nf4"),
    "nf4_dora": lambda: dict(method=DoRA(rank=4, alpha=8), quantize_base="nf4"),
    "nf4_adalora": lambda: dict(
        method=AdaLoRA(init_rank=4, target_rank=2, t_init=2, t_final=2, delta_t=1),
        quantize_base="nf4",
    ),
    "bnb_lora": lambda: dict(method=LoRA(rank=4, alpha=8)),
}
#: the cases over a quantized base (they need bitsandbytes) and the base ``TinyLM`` builds
QUANT_CASES = {"nf4_lora": "wide", "nf4_dora": "wide", "nf4_adalora": "wide", "bnb_lora": "bnb"}

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
    module = TinyLM(base=QUANT_CASES.get(case, "dense"))
    cb = callback(case)
    t = trainer(distributed, callbacks=[cb])
    t.fit(module, loader(rank))
    facts = quantized_facts(module) if case in QUANT_CASES else {}
    save_adapter(module, out / f"{case}.safetensors")
    save_merged(module, out / f"{case}_merged.safetensors")
    return {**schedule_facts(cb), **facts}


def probe_logits(module: torch.nn.Module) -> torch.Tensor:
    """The LM's logits on fixed tokens (train mode: no eval-mode repack of 4-bit weights)."""
    module.train()
    with torch.no_grad():
        return module.model(input_ids=tokens(1)[:2]).logits


def quantized_facts(module: TinyLM) -> dict[str, Any]:
    """What a trained model over a quantized base must agree on with one process: its logits,
    the quantized storage (whole and plain on every rank), and ``merge``'s refusal, which
    leaves the adapters as they were."""
    from lightning_lowrank import adapter_state_dict, merge
    from lightning_lowrank.quant import quant_format
    from lightning_lowrank.shard import gathered

    def adapters() -> dict[str, torch.Tensor]:
        with gathered(module, everything=False):
            return {k: v.detach().clone() for k, v in adapter_state_dict(module).items()}

    layers = [(n, m) for n, m in module.named_modules() if quant_format(m) is not None]
    facts: dict[str, Any] = {
        "logits": probe_logits(module),
        "storage": {n: m.weight.data.clone() for n, m in layers},
        "storage_types": {n: type(m.weight).__name__ for n, m in layers},
    }
    before = adapters()
    try:
        merge(module)
    except ValueError as exc:
        facts["merge_refused"] = str(exc)
    after = adapters()
    facts["unchanged"] = set(before) == set(after) and all(
        torch.equal(before[k], after[k]) for k in before
    )
    return facts
