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


def _qlora_result(step_ratios: list[float], ours_peaks: list[float]) -> dict:
    from benchmarks.memory import peak_summary
    from benchmarks.qlora import TARGETS
    from benchmarks.stats import ratio_block

    def memory(peaks: list[float], saved: float) -> dict:
        return peak_summary([{"peak_mib": p, "saved_mib": saved} for p in peaks])

    def side(step: float, peaks: list[float], saved: float) -> dict:
        return {
            "step_s": step,
            "memory": memory(peaks, saved),
            "base_mib": 52.4,
            "base_ratio": 0.13,
        }

    method = {
        "ours": side(3.5, ours_peaks, 100.0),
        "peft": side(3.8, [1000.0, 1010.0, 990.0], 120.0),
        "step_ours_over_peft": ratio_block(step_ratios),
    }
    setup = {"batch": 4, "seq": 128, "adapter": "rank 8", "quantisation": "NF4", "rounds": 3,
             "warmup_steps": 3, "order": "shuffled", "memory_repeats": 3, "threads": 1,
             "clock": "process CPU time"}  # fmt: skip
    return {
        "commit": None, "dirty": False, "device": "CPU (test)", "date": "today",
        "versions": {"bitsandbytes": "0", "peft": "0"}, "setup": setup, "targets": TARGETS,
        "methods": {"LoRA": method}, "wall_seconds": 1.0,
    }  # fmt: skip


def test_qlora_table_judges_each_target_by_its_interval_or_range():
    from benchmarks.qlora import table

    met = table(_qlora_result([0.90, 0.92, 0.91], [800.0, 810.0, 805.0]))
    ours_row = next(line for line in met.splitlines() if "| this library |" in line)
    cells = [c.strip() for c in ours_row.strip("|").split("|")]
    assert cells[4] == "yes (<= 0.30)"  # 13 % of float32's bytes
    assert cells[6].startswith("0.910 [") and cells[7] == "yes (<= 1.00)"
    assert cells[8] == "805 (800-810, 3 readings)" and cells[9] == "100.0"
    assert cells[10] == "0.81" and cells[11] == "yes (<= 1.00)"
    peft_row = next(line for line in met.splitlines() if "| PEFT + bitsandbytes |" in line)
    assert "yes (<= 1.00)" not in peft_row  # PEFT is what ours is judged against

    # a mean under 1 whose interval reaches above it, and readings that overlap PEFT's: not met
    noisy = table(_qlora_result([0.80, 1.15, 0.90], [980.0, 1020.0, 1000.0]))
    assert "not shown (<= 1.00 inside the interval)" in noisy
    assert "not shown (<= 1.00 inside the readings' range)" in noisy
    assert "yes (<= 1.00)" not in noisy
    slower = table(_qlora_result([1.10, 1.12, 1.11], [1200.0, 1210.0, 1205.0]))
    assert slower.count("**no** (<= 1.00)") == 2


def test_memory_readings_come_in_shuffled_rounds_from_the_given_reader():
    from benchmarks.common import round_order
    from benchmarks.memory import measure_all, peak_summary

    calls: list[str] = []

    def reader(variant: str) -> dict | None:
        calls.append(variant)
        return None if variant == "broken" else {"peak_mib": float(len(calls)), "saved_mib": 2.0}

    names = ["a", "b", "c", "broken"]
    out = measure_all(names, 3, log=lambda _m: None, run_one=reader)
    assert calls == [v for rep in range(3) for v in round_order(names, rep)]
    assert set(out) == {"a", "b", "c"}  # a variant with no reading is left out
    summary = peak_summary(out["a"])
    assert summary["readings_mib"] == [r["peak_mib"] for r in out["a"]]
    assert summary["min_mib"] == min(summary["readings_mib"]) and summary["saved_mib"] == 2.0
