"""The 2-rank cases beyond "train one method and compare": files, resume, meta-device init.

Each takes ``(out, rank)`` (``rank=None``: one process, for the references) and returns what the
tests compare; files go under ``out``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from tests.shard import common


def _adapted_llama(rank: int | None) -> nn.Module:
    """A tiny Llama with LoRA on every linear layer and non-trivial adapter values."""
    from transformers import LlamaForCausalLM

    from lightning_lowrank import LoRA, adapter_layers, inject

    torch.manual_seed(0)
    root = nn.Module()
    root.model = LlamaForCausalLM(common.llama_config())
    inject(root, LoRA(rank=4, alpha=8), target_modules="all-linear")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in adapter_layers(root).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.1)
    if rank is not None:
        from torch.distributed.device_mesh import init_device_mesh

        from lightning_lowrank.shard import shard_model

        shard_model(root, init_device_mesh("cpu", (common.WORLD,)))
    return root


def save_files(out: Path, rank: int | None) -> dict[str, Any]:
    """``save_adapter``, ``export_peft`` and ``save_merged`` from the (sharded) model."""
    from lightning_lowrank import export_peft, save_adapter
    from lightning_lowrank.shard import has_sharded_parameters, save_merged

    tag = "sharded" if rank is not None else "single"
    root = _adapted_llama(rank)
    sharded = has_sharded_parameters(root)
    save_adapter(root, out / f"save_{tag}.safetensors")
    export_peft(root, out / f"peft_{tag}")
    save_merged(root, out / f"merged_{tag}.safetensors")
    still_sharded = has_sharded_parameters(root)
    return {"sharded": sharded, "still_sharded": still_sharded}


def _resume(out: Path, rank: int | None, dcp: bool) -> dict[str, Any]:
    """8 steps straight, against 4 steps, an adapter-only checkpoint, then 4 more from it."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_lowrank import adapter_state_dict
    from lightning_lowrank.shard import gathered

    tag = f"resume_{'dcp' if dcp else 'file'}"
    kwargs: dict[str, Any] = {"save_distributed_checkpoint": dcp} if rank is not None else {}
    states = []
    ckpt_dir = out / tag
    for phase in ("straight", "resumed"):
        module = common.TinyLM()
        cb = common.callback("lora")
        callbacks: list[Any] = [cb]
        ckpt_path = None
        if phase == "straight":
            callbacks.append(
                ModelCheckpoint(
                    dirpath=ckpt_dir, filename="{step}", every_n_train_steps=4, save_top_k=-1
                )
            )
        else:
            ckpt_path = ckpt_dir / "step=4.ckpt"
        trainer = common.trainer(
            rank is not None,
            enable_checkpointing=phase == "straight",
            **kwargs,
            callbacks=callbacks,
        )
        # one batch per epoch: a resumed epoch replays no data
        trainer.fit(module, common.loader(rank, steps=1), ckpt_path=ckpt_path)
        with gathered(module, everything=False):
            states.append({k: v.detach().clone() for k, v in adapter_state_dict(module).items()})
    path = ckpt_dir / "step=4.ckpt"
    stored = _stored_keys(path)
    return {"straight": states[0], "resumed": states[1], "stored_keys": stored}


def _stored_keys(path: Path) -> list[str]:
    if path.is_dir():
        from torch.distributed.checkpoint import FileSystemReader

        meta = FileSystemReader(str(path)).read_metadata()
        return sorted(k for k in meta.state_dict_metadata if k.startswith("state_dict."))
    return sorted(f"state_dict.{k}" for k in torch.load(path, weights_only=False)["state_dict"])


def resume_file(out: Path, rank: int | None) -> dict[str, Any]:
    return _resume(out, rank, dcp=False)


def resume_dcp(out: Path, rank: int | None) -> dict[str, Any]:
    return _resume(out, rank, dcp=True)


def meta_init(out: Path, rank: int | None) -> dict[str, Any]:
    """A model built on the meta device: the adapters' values once Lightning materialises it."""
    import lightning as L

    from lightning_lowrank import DoRA, LoRA, SLTrain, VeRA, adapter_state_dict
    from lightning_lowrank.names import file_names
    from lightning_lowrank.shard import gathered

    class Snapshot(L.Callback):
        def __init__(self) -> None:
            self.state: dict[str, torch.Tensor] = {}

        def on_fit_start(self, trainer, pl_module):
            with gathered(pl_module):
                # named_parameters: between on_fit_start and on_train_start the callback keeps
                # frozen weights out of state_dict (for the strategy's checkpoint restore)
                self.state = {k: v.detach().clone() for k, v in pl_module.named_parameters()}
                self.adapter = {
                    k: v.detach().clone() for k, v in adapter_state_dict(pl_module).items()
                }

    results = {}
    for name, method in {
        "lora": LoRA(rank=4, alpha=8),
        "dora": DoRA(rank=4, alpha=8),
        "vera": VeRA(rank=8),
        "sltrain": SLTrain(rank=4, alpha=8, density=0.05),
    }.items():
        from lightning_lowrank import LowRankCallback

        snap = Snapshot()
        cb = LowRankCallback(method, target_modules="all-linear")
        trainer = common.trainer(rank is not None, steps=1, callbacks=[cb, snap])
        module = common.TinyLM(meta=True)
        trainer.fit(module, common.loader(rank, steps=1))
        buffers = {
            n: {k: v.detach().clone() for k, v in layer.named_buffers() if "base" not in k}
            for n, layer in cb.layers.items()
        }
        # SLTrain seeds a layer's support by its name in adapter files (relative to the model root)
        seeded = file_names(module, list(cb.layers))
        results[name] = {
            "state": snap.state,
            "adapter": snap.adapter,
            "buffers": buffers,
            "seeded": seeded,
        }
    return results


def refuse_sharded(out: Path, rank: int | None) -> str:
    """A model that ``configure_model`` already sharded: the callback refuses it unchanged."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_lowrank import LoRA, LowRankCallback, adapter_layers

    class PreSharded(common.TinyLM):
        def configure_model(self) -> None:
            if self.model is None:
                super().configure_model()
                fully_shard(self.model, mesh=init_device_mesh("cpu", (common.WORLD,)))

    strategy = ModelParallelStrategy(data_parallel_size=common.WORLD, tensor_parallel_size=1)
    fake = SimpleNamespace(strategy=strategy, precision_plugin=strategy.precision_plugin)
    module = PreSharded()
    try:
        LowRankCallback(LoRA(rank=2)).setup(fake, module, "fit")
    except ValueError as exc:
        assert not adapter_layers(module), "a refused setup injected adapters"
        return str(exc)
    raise AssertionError("an already sharded model was accepted")


def quantized_replicas(out: Path, rank: int | None) -> dict[str, Any]:
    """Ranks that build (and quantize) different weights: after ``shard_model`` every rank holds
    rank 0's 4-bit storage; a ``parallelize=`` that shards a quantized weight is refused."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaForCausalLM

    from lightning_lowrank import LoRA, inject
    from lightning_lowrank.quant import quant_format
    from lightning_lowrank.shard import shard_model

    def build() -> nn.Module:
        torch.manual_seed(rank or 0)  # another model on each rank
        root = nn.Module()
        root.model = LlamaForCausalLM(common.llama_config(*common.QUANT_WIDTHS))
        inject(root, LoRA(rank=4, alpha=8), target_modules="all-linear", quantize_base="nf4")
        return root

    def storage(root: nn.Module) -> dict[str, torch.Tensor]:
        return {n: m.weight.data.clone() for n, m in root.named_modules() if quant_format(m)}

    mesh = init_device_mesh("cpu", (common.WORLD,))
    root = build()
    own = storage(root)
    shard_model(root, mesh)
    result: dict[str, Any] = {
        "own": own,
        "storage": storage(root),
        "types": {n: type(m.weight).__name__ for n, m in root.named_modules() if quant_format(m)},
    }
    try:
        shard_model(build(), mesh, parallelize=lambda m, mesh: fully_shard(m.model, mesh=mesh))
    except ValueError as exc:
        result["refused"] = str(exc)
    return result


EXTRA = {
    "save_files": save_files,
    "resume_file": resume_file,
    "resume_dcp": resume_dcp,
    "meta_init": meta_init,
    "refuse_sharded": refuse_sharded,
    "quantized_replicas": quantized_replicas,
}
