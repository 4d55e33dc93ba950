"""The benchmark's multiply-add counts equal the matmul work the layers actually run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.arithmetic import adapter_multiply_adds
from lightning_lowrank.methods import AdaLoRA, DoRA, LoRA, SingLoRA, VeRA


class _MultiplyAdds(TorchDispatchMode):
    """Counts the multiply-adds of every matrix product run under it. Unlike PyTorch's
    FlopCounterMode it registers no module hooks, which would send the layers to their generic
    path (a hooked module is never fused)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet in (torch.ops.aten.mm, torch.ops.aten.mv):
            self.total += args[0].numel() * (args[1].shape[-1] if args[1].ndim == 2 else 1)
        elif packet in (torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.total += args[1].numel() * args[2].shape[1]
        elif packet in (torch.ops.aten.bmm, torch.ops.aten.baddbmm):
            raise AssertionError(f"uncounted product {func}")
        return func(*args, **(kwargs or {}))


def _step_multiply_adds(fn, x: torch.Tensor) -> int:
    """Multiply-adds of ``fn(x)`` forward and backward."""
    with _MultiplyAdds() as counter:
        y = fn(x)
        y.backward(torch.ones_like(y))
    return counter.total


@pytest.mark.parametrize(
    "config",
    [
        LoRA(rank=3),
        DoRA(rank=3),
        AdaLoRA(init_rank=3, target_rank=2),
        SingLoRA(rank=3),
        VeRA(rank=5),
    ],
    ids=lambda c: type(c).__name__,
)
@pytest.mark.parametrize("tokens", [2, 40])
def test_multiply_adds_match_the_counted_matmuls(config, tokens):
    torch.manual_seed(0)
    base = nn.Linear(6, 10)
    base.requires_grad_(False)
    (layer,) = config.build({"l": base}).values()
    x = torch.randn(tokens, 6, requires_grad=True)
    adapted = _step_multiply_adds(layer, x)
    floor = _step_multiply_adds(lambda t: F.linear(t, base.weight, base.bias), x)
    # VeRA at 2 tokens takes the factored order, at 40 the effective-weight one
    assert adapted - floor == adapter_multiply_adds(layer, tokens)


def test_fsdp_memory_section_renders_from_a_result():
    from benchmarks.fsdp_memory import markdown_section

    rank = {"param_mib": 2.0, "optimizer_mib": 0.5, "rss_before_mib": 10.0, "peak_mib": 20.0}
    half = {"param_mib": 1.0, "optimizer_mib": 0.25, "rss_before_mib": 8.0, "peak_mib": 25.0}
    res = {
        "meta": {
            "commit": "0123456789abcdef",
            "device": "CPU (x86_64, 2 CPUs), torch threads 1 per rank",
            "model": "m",
            "method": "LoRA",
            "ranks": 2,
            "batch_per_rank": [1, 128],
            "steps": 3,
        },
        "ranks": {"ddp": [rank, rank], "fsdp": [half, half]},
    }
    text = "\n".join(markdown_section(res))
    assert "| DDP | 2.0 | 0.50 | 10 | 20 |" in text
    assert "| FSDP2 (ModelParallelStrategy) | 1.0 | 0.25 | 8 | 25 |" in text
    assert "`0123456789`" in text and "peak RSS of FSDP2 is above" in text
    assert "CPU (x86_64, 2 CPUs), torch threads 1 per rank" in text
