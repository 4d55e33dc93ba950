"""A quantized frozen base under FSDP2: its storage stays whole on every rank.

bitsandbytes stores a 4-bit weight as packed ``uint8`` codes in a ``Params4bit`` parameter whose
absmax and code tables hang on the parameter and the layer (``quant_state``); an int8 weight keeps
its row scales the same way (``Int8Params.SCB``, ``Linear8bitLt.state``). ``fully_shard`` would
replace such a parameter by a ``DTensor`` of dim-0 chunks of the codes and, inside a forward, by a
plain tensor of the gathered codes: the subclass and its attributes are gone. bitsandbytes'
``Linear4bit`` reattaches the layer's copy of the state in each forward, so training happens to
run, but an eval-mode forward on an AVX512-BF16 CPU repacks the gathered codes and rewrites that
shared state in place (see ``lightning_lowrank.quant.backend``): from then on the standard layout
that the next gather delivers is decoded as the packed one. No state of this kind survives
resharding, so the rule here keeps it out of FSDP2 altogether.

The rule. ``shard_model`` passes the weight of every quantized layer (bitsandbytes ``Linear4bit``
and int8 ``Linear8bitLt``, made by ``quantize_base`` or already in the model) to ``fully_shard`` as
an *ignored* parameter: it stays a plain ``Params4bit``/``Int8Params`` with its state, whole on
every rank, and the layer computes exactly as on one process. Before sharding, rank 0's storage
is broadcast to the other ranks, so the replicas are identical even if the ranks built or
quantized different weights. The biases of quantized layers, the adapters, their gradients and
optimizer state, and every dense layer are sharded as before.

Memory: each rank holds the whole quantized storage of those layers, about 0.53 bytes a weight
for NF4 (13 % of float32) or 1 byte for int8, where a base sharded over ``N`` ranks takes ``4 / N``
(float32) or ``2 / N`` (bfloat16): the replicated NF4 base is smaller per rank up to 7 ranks
against float32, up to 3 against bfloat16.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_lowrank.quant.backend import _state_4bit, quant_format


def quantized_storage(model: nn.Module) -> set[nn.Parameter]:
    """The weights of every quantized layer of ``model``: the ``ignored_params`` to pass to
    ``fully_shard`` (a ``parallelize=`` function must pass them too)."""
    return {
        module.weight
        for module in model.modules()
        if quant_format(module) is not None and isinstance(module.weight, nn.Parameter)
    }


def _storage_tensors(module: nn.Module) -> list[Tensor]:
    """The tensors that hold a quantized layer's weight: its codes and their quantisation state."""
    weight: Any = module.weight
    if quant_format(module) == "int8":
        state = getattr(module, "state", None)
        found = [weight.data, weight.SCB, getattr(state, "SCB", None), getattr(state, "CB", None)]
    else:
        qs = _state_4bit(module)
        found = [weight.data, qs.absmax, qs.code]
        if getattr(qs, "nested", False):
            found += [qs.offset, qs.state2.absmax, qs.state2.code]
    out: list[Tensor] = []
    for t in found:  # the int8 state may share the weight's tensor: broadcast each once
        if isinstance(t, Tensor) and all(t is not u for u in out):
            out.append(t)
    return out


def _signature(tensors: list[Tensor]) -> list[tuple[tuple[int, ...], str]]:
    return [(tuple(t.shape), str(t.dtype)) for t in tensors]


@torch.no_grad()
def broadcast_storage(model: nn.Module, mesh: Any) -> int:
    """Copy the quantized storage of mesh rank 0 into every other rank's, in place. A collective
    over ``mesh`` (every rank calls it, with the same model structure). Returns the number of
    quantized layers.

    Raises:
        RuntimeError: the ranks' quantized layers differ in shapes or dtypes (not one model), on
            every rank.
    """
    layers = [(n, m) for n, m in model.named_modules() if quant_format(m) is not None]
    if not layers or mesh.size() == 1:
        return len(layers)
    group = mesh.get_group()
    tensors = [_storage_tensors(m) for _, m in layers]
    mine = [(name, _signature(ts)) for (name, _), ts in zip(layers, tensors, strict=True)]
    every: list[Any] = [None] * mesh.size()
    dist.all_gather_object(every, mine, group=group)
    different = [r for r, theirs in enumerate(every) if theirs != every[0]]
    if different:
        raise RuntimeError(
            f"the quantized layers of rank {different[0]} differ from rank 0's (names, shapes or "
            "dtypes): every rank must build the same model before LowRankCallback shards it"
        )
    src = dist.get_global_rank(group, 0)
    device = torch.device(mesh.device_type)
    for t in (t for ts in tensors for t in ts):
        # the collective's own device (NCCL takes CUDA tensors only); contiguous, written back
        buf = t if t.device == device and t.is_contiguous() else t.to(device).contiguous()
        dist.broadcast(buf, src=src, group=group)
        if buf is not t:
            t.copy_(buf)
    return len(layers)


def check_unsharded(model: nn.Module) -> None:
    """Raise if a quantized layer's weight was sharded (by a user's ``parallelize=``)."""
    from torch.distributed.tensor import DTensor

    sharded = [
        n
        for n, m in model.named_modules()
        if quant_format(m) is not None and isinstance(m.weight, DTensor)
    ]
    if sharded:
        raise ValueError(
            f"parallelize= sharded the quantized weight of {sharded[0]!r} (and "
            f"{len(sharded) - 1} more): FSDP2 loses the quantisation state of bitsandbytes "
            "parameters. Pass ignored_params=lightning_lowrank.quant.fsdp.quantized_storage("
            "module) to every fully_shard call"
        )
