"""The study page's verdicts come from the records: the rule, the seed floor, one device."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from benchmarks import render_study  # noqa: E402
from benchmarks.provenance import describe, git_commit, provenance  # noqa: E402
from benchmarks.render_study import common  # noqa: E402
from benchmarks.render_study.loraplus import loraplus_section  # noqa: E402
from benchmarks.render_study.methods import methods_section  # noqa: E402
from benchmarks.render_study.singlora import band_width, drop_at_double  # noqa: E402

DEVICE = "CPU (1 thread per run)"
STAMP = {"commit": "a" * 40, "dirty": False, "device": DEVICE, "versions": {"torch": "2.13.0"}}


def _methods_study(lift: float, seeds: int = 5, drop_device: str = DEVICE) -> dict:
    """LoRA r=8 and AdaLoRA 12 -> 8 at 1e-3, AdaLoRA's test accuracy ``lift`` above LoRA's per
    seed (with per-seed noise shared by both), and LoRA-drop on ``drop_device``."""
    runs = []
    for s in range(seeds):
        base = 0.5 + 0.03 * ((s * 7) % 5)
        for config, acc, params, device in (
            ("LoRA r=8", base, 1000, DEVICE),
            ("AdaLoRA 12 -> 8", base + lift + 0.001 * (s % 2), 1100, DEVICE),
            ("LoRA-drop r=8 t=0.9", base + 0.001 * (s % 3 - 1), 500, drop_device),
        ):
            runs.append(
                {
                    **STAMP,
                    "device": device,
                    "config": config,
                    "lr": 1e-3,
                    "seed": s,
                    "val_acc": acc,
                    "test_acc": acc,
                    "adapter_parameters": params,
                }
            )
    return {
        "runs": runs,
        "steps": 10,
        "batch_size": 4,
        "adalora": {"init_rank": 12},
        "lora_drop": {"sample_fraction": 0.1},
        "delta_lora": {"scale": 2.0},
        "lora_drop_margin": 0.01,
        "device": DEVICE,
    }


def _claim(lines: list[str], start: str) -> str:
    return next(line for line in lines if line.startswith(f"- {start}"))


def test_verdicts_follow_the_data():
    better = _claim(methods_section(_methods_study(0.05)), "AdaLoRA is more accurate")
    worse = _claim(methods_section(_methods_study(-0.05)), "AdaLoRA is more accurate")
    same = _claim(methods_section(_methods_study(0.0)), "AdaLoRA is more accurate")
    assert "**reproduced**" in better and "mean +0.0504" in better
    assert "**not reproduced**" in worse and "mean -0.0496" in worse
    assert "**inconclusive**" in same
    assert "5 paired seeds" in better


def test_equivalence_margin_decides_lora_drop():
    line = _claim(methods_section(_methods_study(0.0)), "LoRA-drop keeps")
    assert "**reproduced**" in line and "margin +/-0.01" in line
    assert "50% fewer adapter parameters" in line


def test_fewer_than_five_seeds_gives_no_verdict():
    line = _claim(methods_section(_methods_study(0.05, seeds=4)), "AdaLoRA is more accurate")
    assert "**inconclusive (4 seeds < 5)**" in line


def test_runs_from_two_devices_are_not_compared():
    line = _claim(methods_section(_methods_study(0.0, drop_device="GPU")), "LoRA-drop keeps")
    assert "not compared" in line and "2 devices" in line
    assert "reproduced" not in line


def _loraplus_study(plus_faster: bool) -> dict:
    runs = []
    for s in range(5):
        for config, lr in (("LoRA r=8", 5e-4), ("LoRA r=8", 1e-3), ("LoRA+ r=8", 6e-5)):
            good = config == "LoRA r=8" and lr == 1e-3
            floor = 1.0 + 0.01 * s if good or config == "LoRA+ r=8" else 1.5
            fast = config == "LoRA+ r=8" and plus_faster
            history = [
                {"step": step, "val_loss": floor + (0.0 if step >= (2 if fast else 4) else 1.0)}
                for step in (1, 2, 3, 4)
            ]
            runs.append(
                {
                    **STAMP,
                    "config": config,
                    "lr": lr,
                    "seed": s,
                    "history": history,
                    "val_acc": 0.5,
                    "test_acc": 0.5 + (0.01 * s if config == "LoRA+ r=8" else 0.0),
                }
            )
    return {"runs": runs, "steps": 4, "eval_every": 1, "batch_size": 4, "lr_ratio": 16.0}


def test_loraplus_compares_tuned_against_tuned(monkeypatch, tmp_path):
    monkeypatch.setattr("benchmarks.render_study.loraplus.ASSETS", tmp_path)
    lines = loraplus_section(_loraplus_study(plus_faster=True))
    steps = _claim(lines, "LoRA+ reaches")
    assert "tuned LoRA (lr 0.001)" in steps  # the better of LoRA's two rates is the reference
    assert "**reproduced**" in steps and "mean -2" in steps
    slow = _claim(loraplus_section(_loraplus_study(plus_faster=False)), "LoRA+ reaches")
    assert "**inconclusive**" in slow  # the same steps on every seed: a zero-width interval at 0


def test_singlora_metrics_by_hand():
    runs = []
    for s in range(2):
        for lr, acc in ((5e-4, 0.50), (1e-3, 0.60), (1.4e-3, 0.59), (2e-3, 0.40), (2.8e-3, 0.1)):
            runs.append({"seed": s, "lr": lr, "val_acc": acc + 0.01 * s})
    assert drop_at_double(runs, 1e-3) == {0: pytest.approx(0.20), 1: pytest.approx(0.20)}
    assert drop_at_double(runs, 2e-3) is None  # 4e-3 is off the grid
    # within 0.02 of the best (0.60): 1e-3 and 1.4e-3: log2(1.4)
    assert band_width(runs, 0.02) == {
        0: pytest.approx(math.log2(1.4)),
        1: pytest.approx(0.4854, abs=1e-3),
    }


def test_records_without_a_commit_are_marked_as_predating_the_method():
    assert "predate" in describe([{"config": "x"}, {"config": "y"}])
    text = describe([{**STAMP}, {**STAMP, "dirty": True}])
    assert "commit aaaaaaaaaa" in text and "1 of 2 from a checkout with uncommitted" in text
    assert "predate" not in text


def test_provenance_fields():
    p = provenance("CPU")
    assert set(p) == {"commit", "dirty", "device", "versions"}
    assert p["device"] == "CPU"
    assert set(p["versions"]) == {"torch", "lightning", "transformers", "peft", "python"}
    here = git_commit(Path(__file__).resolve().parent)
    if here["commit"] is not None:
        assert re.fullmatch(r"[0-9a-f]{40}", here["commit"])
        assert isinstance(here["dirty"], bool)


def test_recorded_command_can_be_pasted_into_a_shell():
    import shlex

    from benchmarks.provenance import command_line, cpu_device

    argv = ["--studies", "methods", "--only", "config=LoRA r=2", "config=AdaLoRA 3 -> 2"]
    line = command_line("benchmarks.study", argv)
    assert line.startswith("python -m benchmarks.study --studies methods --only 'config=LoRA r=2'")
    assert shlex.split(line) == ["python", "-m", "benchmarks.study", *argv]
    assert re.fullmatch(r"CPU \(.+, \d+ CPUs\), torch threads 1", cpu_device())


def test_section_modules_hold_no_verdict_text():
    # the verdict words come from benchmarks.stats through the Verdict; the sections only pass
    # claims and numbers (common.method_lines states the rule, and is the one place naming them)
    folder = Path(render_study.__file__).parent
    for path in folder.glob("*.py"):
        if path.name == "common.py":
            continue
        source = path.read_text()
        assert "reproduced" not in source and "inconclusive" not in source, path.name


def test_method_section_states_the_rule_from_the_constants(monkeypatch):
    monkeypatch.setattr(common, "MIN_SEEDS", 7)
    text = " ".join(common.method_lines())
    assert "fewer than 7 seeds" in text and "95% Student-t interval" in text


def test_sltrain_memory_without_pretraining_runs_claims_nothing(monkeypatch, tmp_path):
    from benchmarks.render_study.sltrain import sltrain_section

    monkeypatch.setattr("benchmarks.render_study.sltrain.ASSETS", tmp_path)
    stale = tmp_path / "study_sltrain.png"
    stale.write_bytes(b"old plot")
    memory = {
        "memory_model": {"width": 8, "layers": 1, "heads": 1, "seq": 4, "batch": 1, "rank": 2}
    }
    fields = ("weights_mib", "gradients_mib", "optimizer_state_mib", "static_mib")
    runs = [
        {**STAMP, **memory, "config": c, "lr": None, "seed": 0, "kind": "memory",
         **dict.fromkeys(fields, size), "saved_for_backward_mib": 1.0, "peak_mib": 2 * size,
         "peak_source": "CPU peak RSS increase"}
        for c, size in (("full rank", 4.0), ("SLTrain", 2.0))
    ]  # fmt: skip
    study = {
        "runs": runs,
        "model": {"layers": 1, "width": 8, "heads": 1, "seq": 4},
        "learning_rates": {"SLTrain": [1e-3]},
        "steps": 2,
        "batch_size": 1,
        "rank": 2,
        "density": 0.03,
    }
    text = "\n".join(sltrain_section(study))
    assert "No pre-training runs yet" in text
    assert "study_sltrain.png" not in text and not stale.exists()  # no plot of nothing
    assert "verdict" not in text and "**" not in text
    assert "SLTrain against full rank: static memory 0.50x, measured peak 0.50x" in text


def test_changed_result_files_do_not_make_a_checkout_dirty(tmp_path):
    import subprocess

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "study.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "docs" / "concepts").mkdir(parents=True)
    (tmp_path / "docs" / "concepts" / "adalora.md").write_text("a table\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    assert git_commit(tmp_path)["dirty"] is False
    (tmp_path / "benchmarks" / "results" / "study.json").write_text('{"runs": []}')
    assert git_commit(tmp_path)["dirty"] is False  # a resumed study's own output
    (tmp_path / "docs" / "concepts" / "adalora.md").write_text("a table rendered anew\n")
    assert git_commit(tmp_path)["dirty"] is False  # a page an earlier benchmark rendered
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path)["dirty"] is True


def _intruder_run(config: str, lr: float, seed: int, loss: float, at05: int, at07: int) -> dict:
    return {**STAMP, "config": config, "lr": lr, "seed": seed, "layers": 36, "val_loss": loss,
            "val_acc": 0.9, "mean_delta_effective_rank": 1.0, "update_norm_ratio": 0.05,
            "intruders_by_epsilon": {"0.5": at05, "0.7": at07}}  # fmt: skip


def _intruder_study(configs: tuple[str, ...]) -> dict:
    runs = []
    for s in range(5):
        for c in configs:
            count = 0 if c == "full fine-tuning" else 3 + s % 2  # LoRA: 3-4 intruders per seed
            runs.append(_intruder_run(c, 1e-3, s, 0.1, count, 2 * count))
    return {"runs": runs, "steps": 3, "batch_size": 2, "max_length": 8, "k": 10,
            "epsilons": [0.5, 0.7]}  # fmt: skip


def test_intruder_claims_are_judged_or_named_as_not_compared(monkeypatch, tmp_path):
    from benchmarks.render_study.intruders import intruder_section

    monkeypatch.setattr("benchmarks.render_study.intruders.ASSETS", tmp_path)
    lines = intruder_section(_intruder_study(("LoRA r=1", "LoRA r=8", "full fine-tuning")))
    for c in ("LoRA r=1", "LoRA r=8"):
        line = next(x for x in lines if x.startswith("- LoRA introduces") and f"{c} (lr" in x)
        assert "**reproduced**" in line and "mean +3.4" in line
    lines = intruder_section(_intruder_study(("LoRA r=1", "LoRA r=8")))
    missing = [x for x in lines if x.startswith("- LoRA introduces")]
    assert len(missing) == 2 and all(
        "not compared, no runs of full fine-tuning" in x for x in missing
    )
    assert any("no runs of LoRA r=64, rsLoRA r=64" in x for x in lines)


def test_progress_counts_planned_runs_under_the_method_only():
    runs = [
        {**STAMP, "config": "LoRA r=1", "lr": 1e-3, "seed": 0, "train_seconds": 500.0},
        {**STAMP, "config": "LoRA r=8", "lr": 1e-3, "seed": 4, "train_seconds": 700.0},
        {**STAMP, "config": "LoRA r=8", "lr": 1e-3, "seed": 9, "train_seconds": 900.0},  # unplanned
        {"config": "LoRA r=8", "lr": 1e-3, "seed": 1, "train_seconds": 10.0},  # predates it
    ]
    text = common.progress("intruders", runs)
    assert text.startswith("2 of the 35 planned runs (seeds 0-4)")
    assert "700 s (median), so the 33 left take about 6.4 h one at a time" in text


def _r64_study(rs_loss: dict[float, float]) -> dict:
    """LoRA r=64 at 3e-4 (val loss 0.10, 4 intruders per seed) and diverged at 1e-3, a rate not
    in the plan (val loss 1.6, 0 intruders); rsLoRA r=64 at each rate with its given val loss
    and 2 intruders, except at 3e-4, where it has 6."""
    runs = []
    for s in range(5):
        runs.append(_intruder_run("LoRA r=64", 3e-4, s, 0.1, 4, 4))
        runs.append(_intruder_run("LoRA r=64", 1e-3, s, 1.6, 0, 0))
        for lr, loss in rs_loss.items():
            count = 6 if lr == 3e-4 else 2
            runs.append(_intruder_run("rsLoRA r=64", lr, s, loss + 0.001 * s, count, count))
    return {**_intruder_study(()), "runs": runs, "head_lr": 1e-3}


def test_rslora_claim_is_judged_at_the_matched_rate_only(monkeypatch, tmp_path):
    from benchmarks.render_study.intruders import intruder_section

    monkeypatch.setattr("benchmarks.render_study.intruders.ASSETS", tmp_path)

    def claim(study: dict) -> str:
        return next(x for x in intruder_section(study) if x.startswith("- Rank-stabilised"))

    # LoRA r=64's reference is its planned rate 3e-4, not the diverged 1e-3; rsLoRA's middle rate
    # matches it (gap 0.037 < 0.05): fewer intruders there, whatever 3e-4 shows
    lines = intruder_section(_r64_study({3e-5: 0.6}))
    assert any("the classifier head at 0.001 in adapter runs" in x for x in lines)
    assert [x.split(" | ")[1] for x in lines if x.startswith("| LoRA r=64")] == [
        "0.0003",
        "0.001 (outside the plan: shown, not compared)",
    ]
    line = claim(_r64_study({3e-5: 0.6, 1e-4: 0.135, 3e-4: 1.6}))
    assert "LoRA r=64 at 0.0003 has mean validation loss 0.1;" in line and "is 0.0001" in line
    assert "**reproduced**" in line and "over 5 paired seeds" in line
    assert "Also inside the margin" not in line
    # two rates inside the margin: the closest is judged, the other is shown without a verdict
    line = claim(_r64_study({3e-5: 0.13, 1e-4: 0.135, 3e-4: 1.6}))
    assert "is 3e-05: 0.132" in line and "**reproduced**" in line
    assert line.endswith(
        "Also inside the margin: rsLoRA r=64 at 0.0001 (mean validation loss 0.137): minus LoRA "
        "r=64 in intruders_0.5, mean -2, 95% interval [-2, -2]; the rule judges the closest rate "
        "only."
    )
    # the rate closest in loss has more intruders: judged there, so not reproduced
    line = claim(_r64_study({3e-5: 0.6, 1e-4: 0.3, 3e-4: 0.12}))
    assert "is 0.0003: 0.122" in line and "**not reproduced**" in line
    # no rate within the margin (closest gap 0.086): no verdict from the counts
    line = claim(_r64_study({3e-5: 0.6, 1e-4: 0.184, 3e-4: 1.6}))
    assert "not compared at matched validation loss" in line and "**inconclusive**" in line
    assert "margin of 0.05" in line
    # a seed missing one planned rate is left out of the whole comparison
    study = _r64_study({3e-5: 0.6, 1e-4: 0.135, 3e-4: 1.6})
    study["runs"] = [r for r in study["runs"] if (r["seed"], r["lr"]) != (4, 3e-5)]
    line = claim(study)
    assert "over the 4 seeds" in line and "**inconclusive (4 seeds < 5)**" in line
    # no seed ran every planned rate
    study["runs"] = [r for r in study["runs"] if r["lr"] != 3e-5]
    assert "not compared yet: no seed has run every planned rate" in claim(study)


def test_planned_comparisons_without_runs_are_listed_with_their_command():
    from benchmarks import study_methods
    from benchmarks.study_common import parse_only, selected

    study = _methods_study(0.05)
    lines = methods_section(study)
    missing = [line for line in lines if "not run yet" in line]
    # AdaLoRA 12 -> 8 and LoRA-drop t=0.9 have runs; the other three comparisons have none
    assert [line.split(" against ")[0] for line in missing] == [
        "- AdaLoRA 3 -> 2",
        "- LoRA-drop r=8 t=0.8",
        "- LoRA-drop r=8 t=0.95",
        "- Delta-LoRA r=8",
    ]
    wanted = {
        "AdaLoRA 3 -> 2": {("AdaLoRA 3 -> 2", 1e-3), ("LoRA r=2", 1e-3)},
        "LoRA-drop r=8 t=0.8": {("LoRA-drop r=8 t=0.8", 1e-3), ("LoRA r=8", 1e-3)},
        "LoRA-drop r=8 t=0.95": {("LoRA-drop r=8 t=0.95", 1e-3), ("LoRA r=8", 1e-3)},
        "Delta-LoRA r=8": {
            (c, lr) for c in ("Delta-LoRA r=8", "LoRA r=8") for lr in study_methods.DELTA_LRS
        },
    }
    tasks = study_methods.tasks([0])
    for line in missing:
        method = line[2:].split(" against ")[0]
        pairs = re.findall(r"'([^']*)'|(lr=\S+?)(?=[ `])", line.split("--only ", 1)[1])
        only = parse_only([quoted or bare for quoted, bare in pairs])
        chosen = {(t["config"], t["lr"]) for t in tasks if selected(t, only)}
        assert chosen == wanted[method], line


def test_a_file_from_before_the_plan_lists_nothing_as_not_run():
    study = _methods_study(0.05)
    for r in study["runs"]:
        del r["commit"]
    assert not [line for line in methods_section(study) if "not run yet" in line]


def test_pages_say_whether_the_library_changed_since_a_results_commit(tmp_path):
    import subprocess

    from benchmarks.provenance import code_since, library_changes, runs_code_note

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)
        return out.stdout.decode().strip()

    def commit(path: str, text: str) -> str:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
        git("add", ".")
        git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", path)
        return git("rev-parse", "HEAD")

    assert code_since("a" * 40, tmp_path) == ""  # no checkout: nothing to say
    git("init", "-q")
    first = commit("lightning_lowrank/core.py", "x = 1\n")
    bench = commit("benchmarks/speed.py", "y = 1\n")  # not the library
    lib1 = commit("lightning_lowrank/core.py", "x = 2\n")
    lib2 = commit("lightning_lowrank/other.py", "z = 1\n")
    head = lib2[:10]

    assert library_changes(first, tmp_path) == [lib1[:10], lib2[:10]]
    assert library_changes(bench, tmp_path) == [lib1[:10], lib2[:10]]
    assert library_changes(lib2, tmp_path) == []
    assert library_changes("f" * 40, tmp_path) is None and library_changes(None, tmp_path) is None

    assert code_since(lib2, tmp_path) == (
        f"The library's code (`lightning_lowrank/`) is the same at `{head}`, the commit this "
        "page was rendered from."
    )
    since = code_since(first, tmp_path)
    assert f"changed in 2 commits (`{lib1[:10]}`, `{lib2[:10]}`) up to `{head}`" in since
    assert "and 1 more" in code_since(first, tmp_path, shown=1)
    assert f"`{'f' * 10}` is not in the history of `{head}`" in code_since("f" * 40, tmp_path)
    assert code_since(None, tmp_path) == ""

    # runs of one study from several commits: measured from the newest, and a second sentence
    # only when the library differs between them (a benchmarks-only commit does not count)
    assert runs_code_note([first, bench], tmp_path) == since
    mixed = runs_code_note([first, bench, lib2], tmp_path)
    assert mixed.startswith(code_since(lib2, tmp_path))
    assert "did not all run the same library code: 2 commits" in mixed
    assert f"oldest commit `{first[:10]}` and `{head}`" in mixed
