"""FSDP2 (``fully_shard``) for adapted models: which blocks to shard, and gathers for files.

Under Lightning's ``ModelParallelStrategy`` the callback injects the adapters, then shards:

1. every *block* gets its own FSDP2 group (``fully_shard(block)``): by default the instances of
   the classes named in a transformers model's ``_no_split_modules`` (``LlamaDecoderLayer``,
   ``BertLayer``, ...); otherwise the entries of the longest ``nn.ModuleList`` in the model (the
   repeated layer stack); the callback's ``shard_blocks=`` names the classes instead, and its
   ``parallelize=`` replaces the whole step with the user's function;
2. then every top-level child of the LightningModule that holds parameters is a root group,
   which takes what the blocks left (embeddings, final norm, head).

When a schedule shares adapters between layers (LoRA-drop), all adapter parameters form one
group instead, gathered through the forward and backward (``adapter_group``).

Quantized bases (bitsandbytes ``Linear4bit``/``Linear8bitLt``, from ``quantize_base`` or already in
the model) are not sharded: their weights are ``ignored_params`` of every ``fully_shard`` call and
stay whole on every rank, copied from rank 0 first, since FSDP2 would drop the quantisation state
that bitsandbytes keeps on the parameter. Memory: every rank holds the whole quantized storage
(NF4: 13 % of the float32 bytes, against 1/N of them for a float32 base sharded over N ranks);
their biases, the adapters and every dense layer are sharded (``lightning_lowrank.quant.fsdp``).

Frozen and trainable parameters mix freely in one group. Parameters become ``DTensor`` shards
(``Shard(0)`` over the data-parallel mesh); inside a group's forward and backward FSDP2 swaps in
the full tensors, so layers compute as on one process. Outside the forward, code that reads
parameters must gather them: ``gathered`` swaps every sharded parameter of a model for its
full tensor (a collective: every rank calls it), and ``on_rank_zero`` runs a writer on global
rank 0 only, inside that gather, so files equal the ones a single process writes. Schedules
use ``full_tensor`` and ``shard_like`` to compute on full tensors and write back shards.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")

#: ``parallelize(module, mesh)``: a user's own sharding of the adapted LightningModule
ParallelizeFn = Callable[[nn.Module, Any], None]

_MOVE_SHARDING = (
    "the model is already sharded (fully_shard or DTensor parameters) when LowRankCallback sets "
    "it up: adapters must be injected before sharding. Build the model in configure_model "
    "without calling fully_shard there, and let the callback shard it (pass "
    "LowRankCallback(shard_blocks=[...]) to name the block classes, or "
    "parallelize=your_function to shard it your way)"
)


def _dtensor_type() -> type:
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(model: nn.Module) -> bool:
    """True if any parameter of ``model`` is a DTensor or any submodule is an FSDP2 module."""
    from torch.distributed.fsdp import FSDPModule

    dtensor = _dtensor_type()
    if any(isinstance(p, dtensor) for p in model.parameters()):
        return True
    return any(isinstance(m, FSDPModule) for m in model.modules())


def check_strategy(strategy: Any) -> bool:
    """Validate the Trainer's strategy for sharded training; True if it is ModelParallelStrategy.

    Raises:
        ValueError: for ``FSDPStrategy`` (FSDP1) and for tensor parallelism, which are not
            supported, with the strategy to use instead.
    """
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    use = (
        "use strategy=ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) "
        "(FSDP2, sharded over N processes)"
    )
    if type(strategy) is FSDPStrategy:
        raise ValueError(f"LowRankCallback does not support FSDPStrategy (FSDP1): {use}")
    if type(strategy) is not ModelParallelStrategy:
        return False
    tp = strategy._tensor_parallel_size
    if tp == "auto" or int(tp) > 1:
        raise ValueError(
            f"LowRankCallback does not support tensor parallelism (tensor_parallel_size={tp!r}; "
            f"'auto' means one tensor-parallel group per node): {use}"
        )
    return True


def block_modules(model: nn.Module, blocks: Sequence[type | str] | None = None) -> list[nn.Module]:
    """The modules that get their own FSDP2 group, outermost first, in module order.

    Args:
        model: the adapted model (a LightningModule or a bare ``nn.Module``).
        blocks: block classes, or class names; default: the union of the ``_no_split_modules``
            of every transformers model inside ``model``, or, when there is none, the entries of
            the longest ``nn.ModuleList`` (ties: the first found).

    A block nested inside another block is not returned (the outer group takes it).
    """
    if blocks is not None:
        wanted = {b if isinstance(b, str) else b.__name__ for b in blocks}
    else:
        wanted = set()
        for m in model.modules():
            wanted.update(getattr(m, "_no_split_modules", None) or ())
    if wanted:
        found = [m for m in model.modules() if type(m).__name__ in wanted]
    else:
        lists: list[nn.ModuleList] = [
            m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0
        ]
        sizes = [len(m) for m in lists]
        found = list(lists[sizes.index(max(sizes))]) if lists else []  # the first longest
    inside: set[int] = set()
    out = []
    for m in found:
        if id(m) in inside:
            continue
        out.append(m)
        inside.update(id(sub) for sub in m.modules() if sub is not m)
    return [m for m in out if id(m) not in inside]


def root_modules(pl_module: nn.Module) -> list[nn.Module]:
    """The top-level children holding parameters: each becomes a root FSDP2 group.

    Raises:
        ValueError: if the LightningModule holds parameters directly (no child would call
            FSDP2's unshard before a forward that reads them).
    """
    direct = [n for n, _ in pl_module.named_parameters(recurse=False)]
    if direct:
        raise ValueError(
            f"the LightningModule holds parameters directly ({direct[:3]}): move them into a "
            "submodule, or pass parallelize=your_function to shard the model yourself"
        )
    return [m for m in pl_module.children() if any(True for _ in m.parameters())]


def check_shardable(pl_module: nn.Module, parallelize: ParallelizeFn | None = None) -> None:
    """Raise a ``ValueError`` naming the fix if ``shard_model`` would refuse ``pl_module``
    (called before injecting, so a refusal changes nothing)."""
    if is_sharded(pl_module):
        raise ValueError(_MOVE_SHARDING)
    if parallelize is None:
        root_modules(pl_module)


def shard_model(
    pl_module: nn.Module,
    mesh: Any,
    blocks: Sequence[type | str] | None = None,
    parallelize: ParallelizeFn | None = None,
    adapter_group: bool = False,
) -> None:
    """``fully_shard`` every block, then every root (the rule at the top of this module).

    Args:
        pl_module: the adapted model; its adapters must already be injected.
        mesh: the data-parallel device mesh (``strategy.device_mesh["data_parallel"]``).
        blocks: the block classes (see ``block_modules``).
        parallelize: replaces the default with ``parallelize(pl_module, mesh)``; it must pass
            ``ignored_params=quant.fsdp.quantized_storage(pl_module)`` to ``fully_shard`` when
            the model has quantized layers (a quantized weight it shards raises afterwards).
        adapter_group: put every adapter parameter in one FSDP2 group, kept unsharded from the
            first adapter layer's forward through the backward, so that a layer may compute
            with another layer's parameters (LoRA-drop's sharing; torch refuses one Parameter in
            two groups). Each base layer then gets a group of its own.
    """
    from torch.distributed.fsdp import fully_shard

    from lightning_lowrank.quant import fsdp as quant_fsdp

    check_shardable(pl_module, parallelize)
    quant_fsdp.broadcast_storage(pl_module, mesh)
    if parallelize is not None:
        parallelize(pl_module, mesh)
        quant_fsdp.check_unsharded(pl_module)
        return
    roots = root_modules(pl_module)
    ignored = quant_fsdp.quantized_storage(pl_module)
    kwargs: dict[str, Any] = (
        {"mesh": mesh, "ignored_params": ignored} if ignored else {"mesh": mesh}
    )
    if adapter_group:
        from lightning_lowrank.inject import adapter_layers

        layers: list[nn.Module] = list(adapter_layers(pl_module).values())
        for layer in layers:
            base = cast(nn.Module, layer.base)
            if any(p not in ignored for p in base.parameters()):  # a whole quantized base: none
                fully_shard(base, **kwargs)
        fully_shard(layers, reshard_after_forward=False, **kwargs)
    for block in block_modules(pl_module, blocks):
        fully_shard(block, **kwargs)
    for root in roots:
        fully_shard(root, **kwargs)


# --- tensors of schedules -------------------------------------------------------------------
def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or for a DTensor its full tensor (a collective: every rank must call it)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``value`` (a full tensor, the same on every rank) laid out like ``target``: ``value``
    itself for a plain target, this rank's shard as a DTensor for a DTensor target (no
    communication: each rank cuts its own part)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(target, DTensor):
        return value
    value = value.to(device=target.device, dtype=target.dtype)
    return distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)


# --- gathers ---------------------------------------------------------------------------------
def _sharded_slots(model: nn.Module, everything: bool) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """``(module, name, parameter)`` for the DTensor parameters to gather: all of them, or only
    those an adapter file can hold (trainable ones and everything outside adapter bases)."""
    dtensor = _dtensor_type()
    frozen_bases: set[int] = set()
    if not everything:
        from lightning_lowrank.inject import adapter_layers

        for layer in adapter_layers(model).values():
            frozen_bases.update(id(p) for p in layer.base.parameters() if not p.requires_grad)
    slots = []
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and isinstance(p, dtensor) and id(p) not in frozen_bases:
                slots.append((module, name, p))
    return slots


#: non-empty while rank 0 runs a writer inside ``on_rank_zero``
_WRITING: list[bool] = []


def has_sharded_parameters(model: nn.Module) -> bool:
    """True if any parameter of ``model`` is a DTensor (a sharded model outside a gather)."""
    dtensor = _dtensor_type()
    return any(isinstance(p, dtensor) for p in model.parameters())


def needs_gather(model: nn.Module) -> bool:
    """True if a writer (``save_adapter``, ``export_peft``) must go through
    ``on_rank_zero``: ``model`` is sharded and no gathered write is under way."""
    return not _WRITING and has_sharded_parameters(model)


@contextmanager
def gathered(model: nn.Module, everything: bool = True) -> Iterator[nn.Module]:
    """Within the block, the sharded parameters of ``model`` are full (plain) tensors.

    Args:
        model: a model sharded with ``fully_shard`` (or any model: then nothing changes).
        everything: gather every parameter; ``False`` leaves frozen adapter bases sharded (what
            adapter files and PEFT exports need, at a fraction of the memory).

    A collective: every rank of the mesh must enter it, in the same order. The full tensors are
    new Parameters (same ``requires_grad``); the sharded ones are put back on exit, so nothing
    may run a forward inside the block, and writes into the full tensors are discarded.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        # a forward outside training leaves the root group unsharded (FSDP2 keeps it for a
        # backward that never comes): register the shards again, so every slot is found
        if isinstance(module, FSDPModule):
            module.reshard()
    slots = _sharded_slots(model, everything)
    full: dict[int, nn.Parameter] = {}
    for _, _, p in slots:
        if id(p) not in full:  # a tied parameter is gathered once
            full[id(p)] = nn.Parameter(full_tensor(p.detach()), requires_grad=p.requires_grad)
    try:
        for module, name, p in slots:
            module._parameters[name] = full[id(p)]
        yield model
    finally:
        for module, name, p in slots:
            module._parameters[name] = p


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def on_rank_zero(model: nn.Module, write: Callable[[], T], everything: bool = False) -> T:
    """Run ``write()`` once, on global rank 0, inside ``gathered`` ``(model, everything)``.

    Every rank must call this: all gather, rank 0 writes, the others wait for it and get its
    return value (or the same error). On a model without sharded parameters it calls ``write()``.
    """
    if not needs_gather(model):
        return write()
    box: list[Any] = [None, None]  # rank 0's (result, error message)
    with gathered(model, everything):
        if _rank() == 0:
            _WRITING.append(True)
            try:
                box[0] = write()
            except Exception as exc:  # every rank raises below, so none waits forever
                box[1] = f"{type(exc).__name__}: {exc}"
                failure = exc
            finally:
                _WRITING.pop()
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        if _rank() == 0:
            raise failure
        raise RuntimeError(f"writing on rank 0 failed: {box[1]}")
    return box[0]


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of ``unload(model)`` without changing ``model``: every adapter folded
    into its base weight, and adapter layers named as their plain base layers.

    On a sharded model every rank must call it (it gathers every parameter); every rank gets
    the full tensors, on the CPU. A quantized adapted base becomes, as in ``unload``, a plain
    weight ``dequantize(W0) + dW`` in the base's compute dtype (its quantisation entries go).
    """
    from lightning_lowrank.inject import adapter_layers
    from lightning_lowrank.methods.base import weight_oi
    from lightning_lowrank.methods.layers import is_quantized
    from lightning_lowrank.quant.model import unloaded_linear

    with gathered(model, everything=True), torch.no_grad():
        layers = adapter_layers(model)
        state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
        for name, layer in layers.items():
            quantized = not layer.merged and is_quantized(layer.base)
            for key in [k for k in state if k.startswith(name + ".")]:
                rest = key[len(name) + 1 :]
                value = state.pop(key)
                if rest.startswith("base.") and not quantized:
                    state[f"{name}.{rest[5:]}"] = value
            if quantized:
                unloaded = unloaded_linear(layer, None).state_dict(prefix=f"{name}.")
                state.update({k: v.detach().to("cpu") for k, v in unloaded.items()})
                continue
            if layer.merged:
                continue
            w = weight_oi(layer.base)
            merged = (w + layer.merged_delta().to(w.dtype)).detach().to("cpu")
            state[f"{name}.weight"] = merged if layer.kind == "linear" else merged.t().contiguous()
    return state


def save_merged(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``merged_state_dict`` to a safetensors file, atomically, from global rank 0
    only; on a sharded model every rank must call it. Returns the path."""
    from safetensors.torch import save_file

    state = merged_state_dict(model)
    path = Path(path)
    if _rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file({k: v.contiguous() for k, v in state.items()}, tmp)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # the file exists on return, on every rank
    return path
