"""Markdown tables from ``benchmarks/results/speed.json`` (used by ``speed.py`` and ``render.py``)."""

from __future__ import annotations

from typing import Any

NOT_MEASURED = "Not measured in this run."


def _ratio(d: dict[str, Any] | None) -> str:
    if not d:
        return "-"
    return f"{d['ratio']:.2f} ({d['ratio_min']:.2f}-{d['ratio_max']:.2f})"


def _check(value: float | None, limit: float | None) -> str:
    if value is None or limit is None:
        return "-"
    return "yes" if value <= limit else "**no**"


def training_table(res: dict[str, Any]) -> str:
    tr = res["training"]
    targets = res["targets"]["step_over_floor"]
    reported = res["targets"]["peft_step_over_floor_reported"]
    vs_peft = res["targets"].get("ours_over_peft", {})
    lines = [
        f"Floor (frozen model, gradient to the embedding output): {tr['floor_seconds']:.3f} s/step.",
        "",
        "| method | ours s/step | ours / floor | PEFT s/step | PEFT / floor | ours / PEFT "
        "| target ours / floor | met | target ours / PEFT | met | trainable ours "
        "| trainable PEFT |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in tr["methods"].items():
        ours, peft = row["ours"], row.get("peft")
        target = targets.get(name)
        target_s = f"<= {target:.2f}" if target else "-"
        if name in reported:
            target_s += f" (PEFT measured {reported[name]:.2f} when set)"
        lines.append(
            f"| {name} | {ours['seconds']:.3f} | {_ratio(ours)} | "
            + (
                f"{peft['seconds']:.3f} | {_ratio(peft)} | {row['ours_over_peft']:.2f}"
                if peft
                else "- | - | -"
            )
            + f" | {target_s} | {_check(ours['ratio'], target)} | "
            + (f"<= {vs_peft[name]:.2f}" if name in vs_peft else "-")
            + f" | {_check(row.get('ours_over_peft'), vs_peft.get(name))} | {ours['trainable']:,} | "
            + (f"{peft['trainable']:,}" if peft else "-")
            + " |"
        )
    return "\n".join(lines)


def arithmetic_table(res: dict[str, Any]) -> str:
    ar = res["arithmetic"]
    targets = res["targets"]["step_over_floor"]
    lines = [
        f"The adapted layers' base matmuls alone (forward and input gradient) take "
        f"{ar['share']:.0%} ({ar['share_min']:.0%}-{ar['share_max']:.0%}) of the floor's time. "
        "An adapter whose extra multiply-adds are a fraction f of those matmuls' cannot bring a "
        "step below 1 + share x f floors unless its arithmetic runs faster than the base's.",
        "",
        "| method | adapter multiply-adds / base matmuls' | lower bound on ours / floor "
        "| measured ours / floor | target |",
        "|---|---|---|---|---|",
    ]
    for name, row in ar["methods"].items():
        measured = res["training"]["methods"][name]["ours"]["ratio"]
        target = targets.get(name)
        lines.append(
            f"| {name} | {row['fraction']:.1%} | {row['bound']:.2f} | {measured:.2f} | "
            + (f"<= {target:.2f}" if target else "-")
            + " |"
        )
    return "\n".join(lines)


def memory_table(res: dict[str, Any]) -> str:
    mem = res["memory"]
    floor = mem.get("floor_mib")
    lines = [
        f"Measured as the {mem['how']}"
        + (f"; {mem['separate_run']}" if mem.get("separate_run") else "")
        + ". Floor: "
        + (f"{floor:.0f} MiB." if floor is not None else "not measured."),
        "",
        "| method | ours MiB | PEFT MiB | ours <= PEFT |",
        "|---|---|---|---|",
    ]
    for name, row in mem["methods"].items():
        ours, peft = row.get("ours_mib"), row.get("peft_mib")
        lines.append(
            f"| {name} | {ours:.0f} | "
            + (f"{peft:.0f}" if peft is not None else "-")
            + f" | {_check(ours, peft)} |"
            if ours is not None
            else f"| {name} | failed | - | - |"
        )
    return "\n".join(lines)


def inference_table(res: dict[str, Any]) -> str:
    inf = res["inference"]
    lines = [
        f"Base model forward (eval, no grad, 16 x 64): {inf['base_seconds']:.3f} s.",
        "",
        "| method | unmerged / base | merged / base |",
        "|---|---|---|",
    ]
    for name, row in inf["methods"].items():
        lines.append(f"| {name} | {_ratio(row['unmerged'])} | {_ratio(row['merged'])} |")
    return "\n".join(lines)


def callback_table(res: dict[str, Any]) -> str:
    cb = res["callback"]
    target = res["targets"]["callback_overhead"]
    return "\n".join(
        [
            "| LoRA step in `Trainer.fit` + `LowRankCallback` | plain loop | ratio | target |",
            "|---|---|---|---|",
            f"| {cb['fit_seconds']:.3f} s | {cb['loop_seconds']:.3f} s | {_ratio(cb)} "
            f"| <= {target:.2f} ({_check(cb['ratio'], target)}) |",
        ]
    )


def markdown_report(res: dict[str, Any]) -> str:
    meta = res["meta"]
    skipped = "".join(f"\n- {k}: {v}" for k, v in meta.get("skipped", {}).items())
    return "\n".join(
        [
            f"Run {meta['date']} on {meta['machine']}; torch {meta['versions']['torch']}, "
            f"PEFT {meta['versions']['peft']}, transformers {meta['versions']['transformers']}, "
            f"Lightning {meta['versions']['lightning']}. {meta['model']}, batch {meta['batch']} x "
            f"{meta['seq_len']} tokens, {meta['optimizer']}; timed by "
            f"{meta.get('clock', 'wall time')}; {meta['reps']} interleaved rounds of "
            f"{meta['steps_per_rep']} steps; medians, ratios as median (min-max) over rounds of "
            f"the ratio within a round. Whole run: {meta['wall_seconds']} s."
            + (f"\n\nNot measured:{skipped}" if skipped else ""),
            "",
            "### Training step",
            "",
            training_table(res),
            "",
            "### What the arithmetic allows",
            "",
            arithmetic_table(res) if "arithmetic" in res else NOT_MEASURED,
            "",
            "### Peak training memory",
            "",
            memory_table(res) if "memory" in res else NOT_MEASURED,
            "",
            "### Inference, merged and unmerged",
            "",
            inference_table(res) if "inference" in res else NOT_MEASURED,
            "",
            "### Callback overhead",
            "",
            callback_table(res) if "callback" in res else NOT_MEASURED,
        ]
    )
