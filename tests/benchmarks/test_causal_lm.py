"""The causal-LM benchmark runs end to end on a tiny random Llama (the real run is not in CI)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("peft")

from benchmarks import causal_lm  # noqa: E402


def test_tiny_run_times_every_variant_in_both_modes(tmp_path):
    res = causal_lm.main(
        [
            "--tiny",
            "--reps",
            "2",
            "--steps",
            "1",
            "--methods",
            "LoRA",
            "DoRA",
            "SingLoRA",
            "--phases",
            "time",
            "--out",
            str(tmp_path),
        ]
    )
    stored = json.loads((tmp_path / "causal_lm.json").read_text())
    assert stored["modes"].keys() == {"off", "on"}
    for mode in ("off", "on"):
        tr = stored["modes"][mode]["training"]
        assert set(tr["seconds"]) == {
            "floor",
            "LoRA:ours",
            "LoRA:peft",
            "DoRA:ours",
            "DoRA:peft",
            "SingLoRA:ours",
        }
        assert all(len(t) == 2 for t in tr["rounds"].values())
        lora = tr["ratios"]["LoRA:ours"]
        assert lora["over_floor"]["low"] <= lora["over_floor"]["mean"] <= lora["over_floor"]["high"]
        assert "over_peft" in lora and "over_peft" not in tr["ratios"]["SingLoRA:ours"]
    meta = stored["meta"]
    assert {"commit", "dirty", "device", "versions"} <= meta.keys()
    assert meta["batch"] == 2 and meta["seq_len"] == 16
    assert res["targets"]["step_over_floor"]["LoRA"] == 1.05


def test_memory_reading_of_one_variant(tmp_path):
    off = causal_lm.measure_variant(
        "LoRA:ours", tiny=True, checkpointing=False, batch_size=2, seq=16, steps=1
    )
    on = causal_lm.measure_variant(
        "LoRA:ours", tiny=True, checkpointing=True, batch_size=2, seq=16, steps=1
    )
    assert off["peak_mib"] >= 0 and off["saved_mib"] > 0
    # checkpointing keeps the blocks' inputs, not their insides
    assert on["saved_mib"] < off["saved_mib"]


def test_every_method_of_the_issue_is_benchmarked():
    names = [e.name for e in causal_lm.entries()]
    assert names == ["LoRA", "LoRA-FA", "DoRA", "VeRA", "SingLoRA", "AdaLoRA"]
    assert causal_lm.variants(causal_lm.entries()[:2], quant=True) == [
        "floor",
        "LoRA:ours",
        "LoRA:peft",
        "LoRA:ours-nf4",
        "LoRA:peft-nf4",
        "LoRA-FA:ours",
    ]
    assert causal_lm.counterpart("LoRA:ours") == "LoRA:peft"
    assert causal_lm.counterpart("DoRA:ours-nf4") == "DoRA:peft-nf4"
    assert causal_lm.counterpart("LoRA:peft-nf4") is None
    assert causal_lm.counterpart("floor") is None


def test_both_libraries_run_over_the_same_4bit_layers():
    pytest.importorskip("bitsandbytes")
    from lightning_lowrank.quant import quant_format

    base = causal_lm.load_model(tiny=True)
    batch = causal_lm.make_batch(base.config.vocab_size, 2, 8)
    ours = causal_lm.build("LoRA:ours-nf4", base, batch, checkpointing=False)
    peft = causal_lm.build("LoRA:peft-nf4", base, batch, checkpointing=False)
    count = {
        lib: sum(quant_format(m) == "nf4" for m in r.model.modules())
        for lib, r in (("ours", ours), ("peft", peft))
    }
    assert count["ours"] == count["peft"] == 7 * causal_lm.TINY["layers"]
    assert sum(quant_format(m) is not None for m in base.modules()) == 0  # copies were quantized


def test_quant_rows_are_refused_without_the_quantized_base(monkeypatch, tmp_path):
    monkeypatch.setattr(causal_lm, "quant_available", lambda: False)
    with pytest.raises(SystemExit, match="lightning_lowrank.quant"):
        causal_lm.main(["--tiny", "--quant", "--out", str(tmp_path)])
    assert not (tmp_path / "causal_lm.json").exists()


def test_targets_run_has_its_own_file_and_section(tmp_path, monkeypatch):
    from benchmarks import render

    args = ["--tiny", "--reps", "2", "--steps", "1", "--phases", "time", "--out", str(tmp_path)]
    causal_lm.main([*args, "--methods", "LoRA", "SingLoRA"])
    causal_lm.main([*args, "--methods", "LoRA", "DoRA", "--checkpointing", "off",
                    "--name", "causal_lm_targets"])  # fmt: skip
    full = json.loads((tmp_path / "causal_lm.json").read_text())
    later = json.loads((tmp_path / "causal_lm_targets.json").read_text())
    assert "SingLoRA" in full["meta"]["configs"]  # the full run is not overwritten
    assert list(later["meta"]["configs"]) == ["LoRA", "DoRA"] and list(later["modes"]) == ["off"]
    monkeypatch.setattr(render, "RESULTS", tmp_path)
    text = "\n".join(render.causal_lines())
    assert text.count("Gradient checkpointing **off**") == 2
    assert "### LoRA and DoRA again, on their own" in text
    assert text.index("SingLoRA:ours") < text.index("### LoRA and DoRA again")
    with pytest.raises(SystemExit):
        causal_lm.main([*args, "--name", "elsewhere"])
