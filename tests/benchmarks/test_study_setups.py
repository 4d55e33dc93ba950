"""The study's configuration grids are the fair setups, and the SLTrain memory task counts right."""

from __future__ import annotations

import importlib

import pytest

from benchmarks.stats import MIN_SEEDS


def test_default_seeds_are_enough_for_a_verdict():
    from benchmarks.study_common import DEFAULT_SEEDS

    assert len(DEFAULT_SEEDS) >= MIN_SEEDS


def _grid(tasks: list[dict], config: str) -> list[float]:
    return sorted({t["lr"] for t in tasks if t["config"] == config})


def test_intruders_grid_matches_rslora_against_lora_r64():
    from benchmarks import study_intruders as m

    tasks = m.tasks([0])
    assert _grid(tasks, "rsLoRA r=64") == [3e-5, 1e-4, 3e-4]
    assert _grid(tasks, "LoRA r=64") == [3e-4]
    assert m.HEAD_LR == 1e-3
    assert m.CONFIGS["LoRA r=64"][0] == {"rank": 64, "alpha": 128.0}
    assert "full fine-tuning" in {t["config"] for t in tasks}
    assert m.STUDY.key == ("config", "lr", "seed")


def test_singlora_sweeps_the_adapter_with_the_head_fixed():
    from benchmarks import study_singlora as m

    tasks = m.tasks([0, 1])
    for config in m.CONFIGS:
        assert _grid(tasks, config) == [5e-4, 1e-3, 1.4e-3, 2e-3, 2.8e-3]
    assert m.HEAD_LR == 1e-3 and m.BAND == 0.02


def test_loraplus_tunes_both():
    from benchmarks import study_loraplus as m

    tasks = m.tasks([0])
    assert _grid(tasks, "LoRA r=8") == [5e-4, 1e-3, 2e-3]
    assert _grid(tasks, "LoRA+ r=8") == [3e-5, 6e-5, 1e-4, 2e-4]


def test_methods_grid():
    from benchmarks import study_methods as m

    tasks = m.tasks([0])
    configs = {t["config"] for t in tasks}
    assert {"LoRA r=2", "AdaLoRA 3 -> 2", "AdaLoRA 12 -> 8"} <= configs
    assert m.ADALORA_BUDGETS["AdaLoRA 3 -> 2"] == (3, 2)
    assert _grid(tasks, "AdaLoRA 3 -> 2") == _grid(tasks, "LoRA r=2") == [1e-3]
    assert {f"LoRA-drop r=8 t={t:g}" for t in (0.8, 0.9, 0.95)} <= configs
    assert _grid(tasks, "Delta-LoRA r=8") == sorted(m.DELTA_LRS)
    assert set(m.DELTA_LRS) <= set(_grid(tasks, "LoRA r=8"))
    assert 0 < m.LORA_DROP_MARGIN <= 0.02
    assert m.STUDY.meta["lora_drop_margin"] == m.LORA_DROP_MARGIN


def test_sltrain_grid_and_memory_tasks():
    from benchmarks import study_sltrain as m

    tasks = m.tasks([0, 1])
    train = [t for t in tasks if t["kind"] == "train"]
    memory = [t for t in tasks if t["kind"] == "memory"]
    for variant, lrs in m.VARIANTS.items():
        assert _grid(train, variant) == sorted(lrs) and len(lrs) >= 3
    assert sorted(t["config"] for t in memory) == sorted(m.VARIANTS)
    assert {t["seed"] for t in train} == {0, 1}


@pytest.fixture
def quick_sltrain(monkeypatch):
    from benchmarks import study_common

    monkeypatch.setenv(study_common.QUICK_ENV, "1")
    import benchmarks.study_sltrain as m

    yield importlib.reload(m)
    monkeypatch.delenv(study_common.QUICK_ENV)
    importlib.reload(m)


def test_sltrain_memory_task_counts_from_tensors(quick_sltrain):
    m = quick_sltrain
    full = m.run(
        {"config": "full rank", "lr": None, "seed": 0, "kind": "memory", "accelerator": "cpu"}
    )
    sl = m.run({"config": "SLTrain", "lr": None, "seed": 0, "kind": "memory", "accelerator": "cpu"})
    # full rank trains every weight: gradients = weights, AdamW keeps two moments of each
    assert full["gradients_mib"] == pytest.approx(full["weights_mib"], rel=1e-3)
    assert full["optimizer_state_mib"] == pytest.approx(2 * full["gradients_mib"], rel=1e-3)
    assert full["static_mib"] == pytest.approx(
        full["weights_mib"] + full["gradients_mib"] + full["optimizer_state_mib"], abs=2e-3
    )
    assert sl["static_mib"] < full["static_mib"]
    assert sl["saved_for_backward_mib"] > 0 and sl["peak_source"] == "CPU peak RSS increase"


def test_runs_without_a_commit_do_not_join_new_ones():
    from benchmarks.study_common import stored_runs

    doc = {
        "device": "GPU",
        "runs": [
            {"config": "a", "seed": 0},
            {"config": "a", "seed": 1, "commit": "f" * 40, "device": "CPU"},
            {"config": "b", "seed": 0, "commit": "f" * 40},
        ],
    }
    kept, left_out = stored_runs(doc)
    assert left_out == 1
    assert [(r["config"], r["seed"], r["device"]) for r in kept] == [
        ("a", 1, "CPU"),
        ("b", 0, "GPU"),
    ]


def test_only_selects_tasks_by_field_and_refuses_unknown_values():
    from benchmarks import study_methods
    from benchmarks.study_common import check_only, parse_only, selected

    tasks = study_methods.tasks(range(5))
    only = parse_only(["config=LoRA r=2", "config=AdaLoRA 3 -> 2", "seed=0"])
    picked = [t for t in tasks if selected(t, only)]
    assert {(t["config"], t["seed"]) for t in picked} == {("LoRA r=2", 0), ("AdaLoRA 3 -> 2", 0)}
    check_only(only, tasks)  # every value exists
    with pytest.raises(SystemExit, match="'LoRA r=3'.*'LoRA r=2'"):
        check_only(parse_only(["config=LoRA r=3"]), tasks)
    with pytest.raises(SystemExit, match="no task of these studies has kind"):
        check_only(parse_only(["kind=memory"]), tasks)
    with pytest.raises(SystemExit, match="FIELD=VALUE"):
        parse_only(["config"])
