"""The speed benchmark's method: shuffled rounds, intervals on ratios, memory from tensors."""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.common import Runner, round_order, time_interleaved
from benchmarks.memory import memory_block
from benchmarks.report import _met, memory_table
from benchmarks.speed import met, ratio_summary
from benchmarks.tensor_bytes import saved_tensor_bytes, static_bytes


def test_round_order_is_a_seeded_shuffle():
    names = [f"v{i}" for i in range(6)]
    orders = [round_order(names, rep) for rep in range(8)]
    assert all(sorted(o) == names for o in orders)
    assert orders == [round_order(names, rep) for rep in range(8)]  # repeatable
    assert len({tuple(o) for o in orders}) > 4
    # unlike a rotation, who runs right after v0 changes between rounds
    followers = {o[(o.index("v0") + 1) % 6] for o in orders}
    assert len(followers) > 2


def test_time_interleaved_warms_up_and_runs_every_variant_each_round():
    calls: list[str] = []
    runners = [Runner(n, nn.Identity(), (lambda n=n: calls.append(n))) for n in "abcd"]
    times = time_interleaved(runners, reps=5, steps=2, warmup=3, log=lambda _: None)
    assert calls[:12] == [n for n in "abcd" for _ in range(3)]
    rounds = [calls[12 + 8 * r : 12 + 8 * (r + 1)] for r in range(5)]
    assert all(sorted(set(r)) == list("abcd") for r in rounds)
    assert len({tuple(dict.fromkeys(r)) for r in rounds}) > 1  # the order changed
    assert all(len(t) == 5 for t in times.values())


def test_met_only_when_the_whole_interval_is_under_the_target():
    noisy = ratio_summary([1.05, 1.13, 1.08, 1.12, 1.10, 1.15, 1.07])
    assert noisy["ratio_low"] < 1.12 < noisy["ratio_high"]
    assert met(noisy, 1.12) is False
    assert _met(noisy, 1.12).startswith("not shown")
    tight = ratio_summary([1.01, 1.02, 1.015, 1.012, 1.018])
    assert met(tight, 1.05) is True and _met(tight, 1.05) == "yes"
    assert _met(tight, 1.0) == "**no**"
    assert _met({"ratio": 1.0, "ratio_min": 0.9, "ratio_max": 1.1}, 1.2).startswith("not judged")


def test_saved_tensor_bytes_counts_each_storage_once():
    x = torch.randn(100, dtype=torch.float64, requires_grad=True)
    # sin saves its input: x itself and a view of x share one storage of 800 bytes
    assert saved_tensor_bytes(lambda: x.sin().sum() + x[:10].sin().sum()) == 800
    # exp saves its result: a new 100-float tensor
    assert saved_tensor_bytes(lambda: x.exp().sum()) == 800
    w = torch.randn(100, dtype=torch.float64)
    assert saved_tensor_bytes(lambda: (x * w).sum(), exclude=[w]) == 0  # mul saves w only
    assert saved_tensor_bytes(lambda: (x * w).sum()) == 800


def test_static_bytes_of_a_linear_layer_and_adamw():
    layer = nn.Linear(4, 3)  # 15 float32 numbers
    opt = torch.optim.AdamW(layer.parameters())
    assert static_bytes(layer, opt) == {"weights": 60, "gradients": 0, "optimizer_state": 0}
    layer(torch.randn(2, 4)).sum().backward()
    opt.step()
    # exp_avg and exp_avg_sq per parameter; the one-number step counters are not state bytes
    assert static_bytes(layer, opt) == {"weights": 60, "gradients": 60, "optimizer_state": 120}


def test_memory_block_keeps_every_reading():
    def reading(v: str, mib: float) -> dict:
        return {
            "variant": v,
            "peak_mib": mib,
            "saved_mib": 10.0,
            "grads_mib": 1.0,
            "adamw_state_mib": 2.0,
        }

    raw = {
        "floor": [reading("floor", 300.0), reading("floor", 310.0), reading("floor", 305.0)],
        "LoRA:ours": [reading("LoRA:ours", 320.0), reading("LoRA:ours", 330.0)],
        "LoRA:peft": [reading("LoRA:peft", 400.0)],
    }
    block = memory_block(raw)
    assert block["floor_mib"] == 305.0
    row = block["methods"]["LoRA"]
    assert row["ours_mib"] == 325.0 and row["ours"]["rss"]["all"] == [320.0, 330.0]
    assert row["peft_mib"] == 400.0
    table = memory_table({"memory": block})
    assert "325 (320-330, 2 readings)" in table and "400 (1 reading)" in table
    assert "| 0.81 |" in table  # 325 / 400


def test_callback_overhead_runs_both_sides_on_a_tiny_model():
    # the plain loop must train the same LightningModule the Trainer fits (no private helpers)
    from benchmarks import speed
    from tests.conftest import tiny_bert

    base = tiny_bert(num_labels=5)
    for p in base.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(0, 64, (2, 8), generator=g),
        "attention_mask": torch.ones(2, 8, dtype=torch.long),
        "labels": torch.randint(0, 5, (2,), generator=g),
    }
    out = speed.bench_callback(base, batch, reps=2, steps=3)
    assert out["fit_seconds"] > 0 and out["loop_seconds"] > 0


def test_inference_table_judges_unmerged_lora_against_its_target():
    from benchmarks.report import inference_table

    def ratio(low: float, high: float) -> dict:
        return {"ratio_mean": (low + high) / 2, "ratio_low": low, "ratio_high": high}

    res = {
        "targets": {"unmerged_inference_lora": 1.10},
        "inference": {
            "base_seconds": 0.2,
            "methods": {
                "LoRA": {"unmerged": ratio(1.02, 1.08), "merged": ratio(0.99, 1.01)},
                "DoRA": {"unmerged": ratio(1.15, 1.25), "merged": ratio(0.99, 1.01)},
            },
        },
    }
    rows = {line.split(" | ")[0]: line for line in inference_table(res).splitlines()}
    assert "<= 1.10 (yes)" in rows["| LoRA"]
    assert "<= 1.10" not in rows["| DoRA"]  # the target is LoRA's alone
    res["inference"]["methods"]["LoRA"]["unmerged"] = ratio(1.12, 1.20)
    assert "<= 1.10 (**no**)" in inference_table(res)


def test_arithmetic_table_and_notes_quote_the_mean_the_training_table_shows():
    from benchmarks.render import _arithmetic_notes
    from benchmarks.report import arithmetic_table

    # skewed rounds: the medians (1.10, 1.50) and the means (1.30, 1.86) differ
    ours = ratio_summary([1.1, 1.1, 1.1, 1.6, 1.6])
    peft = ratio_summary([1.5, 1.5, 1.5, 2.4, 2.4])
    vs = ratio_summary([0.90, 0.905, 0.91, 0.905, 0.90])  # 0.904 [0.898, 0.910]
    res = {
        "targets": {
            "step_over_floor": {"LoRA": 1.08},
            "ours_over_peft": {"LoRA": 0.95},
            "peft_step_over_floor_reported": {"LoRA": 1.29},
        },
        "training": {
            "methods": {
                "LoRA": {
                    "ours": ours,
                    "peft": peft,
                    "ours_over_peft": vs["ratio"],
                    "ours_over_peft_interval": vs,
                }
            }
        },
        "arithmetic": {
            "share": 0.5,
            "share_min": 0.5,
            "share_max": 0.5,
            "methods": {"LoRA": {"fraction": 0.05, "bound": 1.025}},
        },
    }
    assert ours["ratio"] == 1.1 and abs(ours["ratio_mean"] - 1.3) < 1e-12
    assert "| LoRA | 5.0% | 1.02 | 1.30 | <= 1.08 |" in arithmetic_table(res)
    # the interval 0.94 [0.922, 0.958] reaches the target 0.95: not met, the note explains it
    # (the mean alone, 0.94, is under it)
    res["training"]["methods"]["LoRA"]["ours_over_peft_interval"] = ratio_summary(
        [0.92, 0.94, 0.96, 0.94, 0.94]
    )
    (note,) = _arithmetic_notes(res)
    assert "PEFT's LoRA runs at 1.86 floors here, so 0.95x of it means 1.77 floors" in note
    # met: the whole interval is under the target, nothing to explain
    res["training"]["methods"]["LoRA"]["ours_over_peft_interval"] = vs
    assert _arithmetic_notes(res) == []
