"""The AdaLoRA, LoRA-drop and Delta-LoRA vs LoRA section."""

from __future__ import annotations

from typing import Any

from benchmarks.render_study.common import (
    Runs,
    best_rate,
    configs,
    device_refusal,
    header,
    knobs,
    mean,
    pick,
    verdict_line,
    with_interval,
)


def _rates(runs: Runs) -> list[float]:
    return sorted({r["lr"] for r in runs})


def _adalora_lines(runs: Runs) -> list[str]:
    lines = []
    for ada_name in [c for c in configs(runs) if c.startswith("AdaLoRA")]:
        target = ada_name.split("->")[-1].strip()
        lora_name = f"LoRA r={target}"
        ada = pick(runs, config=ada_name)
        for lr in _rates(ada):
            lora = pick(runs, config=lora_name, lr=lr)
            if not lora:
                lines.append(f"- {ada_name} at lr {lr:g}: not compared, no {lora_name} run there.")
                continue
            a_params = [r["adapter_parameters"] for r in pick(ada, lr=lr)]
            l_params = [r["adapter_parameters"] for r in lora]
            lines.append(
                verdict_line(
                    f"AdaLoRA is more accurate than LoRA at the same rank budget ({ada_name} "
                    f"against {lora_name}; AdaLoRA's file holds "
                    f"{mean(a_params) / mean(l_params):.2f} times LoRA's parameters)",
                    f"{ada_name} (lr {lr:g})",
                    pick(ada, lr=lr),
                    f"{lora_name} (lr {lr:g})",
                    lora,
                    "test_acc",
                    "greater",
                )
            )
    return lines


def _lora_drop_lines(runs: Runs, margin: float | None) -> list[str]:
    lines = []
    for name in [c for c in configs(runs) if c.startswith("LoRA-drop")]:
        drop = pick(runs, config=name)
        for lr in _rates(drop):
            lora = pick(runs, config="LoRA r=8", lr=lr)
            if not lora:
                lines.append(f"- {name} at lr {lr:g}: not compared, no LoRA r=8 run there.")
                continue
            saved = 1 - mean([r["adapter_parameters"] for r in pick(drop, lr=lr)]) / mean(
                [r["adapter_parameters"] for r in lora]
            )
            claim = (
                f"LoRA-drop keeps LoRA's accuracy with fewer parameters ({name} stores "
                f"{saved:.0%} fewer adapter parameters)"
            )
            refused = device_refusal(claim, name, "LoRA r=8", pick(drop, lr=lr) + lora)
            if refused:
                lines.append(refused)
            elif margin is None:
                lines.append(
                    f"- {claim}: not judged, the study states no equivalence margin for this file."
                )
            else:
                lines.append(
                    verdict_line(
                        claim,
                        f"{name} (lr {lr:g})",
                        pick(drop, lr=lr),
                        f"LoRA r=8 (lr {lr:g})",
                        lora,
                        "test_acc",
                        "equivalent",
                        margin=margin,
                    )
                )
    return lines


def _delta_lines(runs: Runs) -> list[str]:
    delta = pick(runs, config="Delta-LoRA r=8")
    if not delta:
        return []
    rates = _rates(delta)
    lora = [r for r in pick(runs, config="LoRA r=8") if r["lr"] in rates]
    if not lora:
        return ["- Delta-LoRA: not compared, no LoRA r=8 run at its rates."]
    best_d, best_l = best_rate(delta, "val_acc", True), best_rate(lora, "val_acc", True)
    return [
        verdict_line(
            "Delta-LoRA is more accurate than LoRA, each at its best rate of "
            f"{', '.join(f'{lr:g}' for lr in rates)} by validation accuracy",
            f"Delta-LoRA r=8 (lr {best_d:g})",
            pick(delta, lr=best_d),
            f"LoRA r=8 (lr {best_l:g})",
            pick(lora, lr=best_l),
            "test_acc",
            "greater",
        )
    ]


def _not_run_lines(runs: Runs) -> list[str]:
    """A line for each comparison of the plan whose method has no run in ``runs`` yet, with the
    command that runs just that comparison (the method and its baseline at the method's rates)."""
    from benchmarks.study_methods import ADALORA_BUDGETS, CONFIGS, LORA_DROP_THRESHOLDS

    pairs = [(name, f"LoRA r={target}") for name, (_, target) in ADALORA_BUDGETS.items()]
    pairs += [(f"LoRA-drop r=8 t={t:g}", "LoRA r=8") for t in LORA_DROP_THRESHOLDS]
    pairs.append(("Delta-LoRA r=8", "LoRA r=8"))
    have = set(configs(runs))
    lines = []
    for method, base in pairs:
        if method in have:
            continue
        only = f"--only 'config={method}' 'config={base}'"
        if not set(CONFIGS[base]) <= set(CONFIGS[method]):  # the baseline runs at more rates
            only += "".join(f" lr={lr}" for lr in sorted(set(CONFIGS[method])))
        lines.append(
            f"- {method} against {base}: not run yet under this method "
            f"(`python -m benchmarks.study --studies methods {only}`)."
        )
    return lines


def _plan(study: dict[str, Any]) -> str:
    """The rates and thresholds the study's file says it ran with (files from before the plan
    name none)."""
    parts = []
    if "adalora_lr" in study:
        parts.append(f"AdaLoRA and its LoRA baselines at lr {study['adalora_lr']:g}")
    if "lora_drop_thresholds" in study:
        thresholds = ", ".join(f"{t:g}" for t in study["lora_drop_thresholds"])
        parts.append(f"LoRA-drop at thresholds {thresholds}, against LoRA r=8 at the same rate")
    if "delta_lrs" in study:
        rates = ", ".join(f"{lr:g}" for lr in study["delta_lrs"])
        parts.append(f"Delta-LoRA and LoRA r=8 each over lr {rates}")
    return "; ".join(parts) + ". " if parts else ""


def methods_section(study: dict[str, Any]) -> list[str]:
    runs = study["runs"]
    margin = study.get("lora_drop_margin")
    lines = header(
        "AdaLoRA, LoRA-drop and Delta-LoRA vs LoRA",
        study,
        "methods",
        f"MiniLM on Debian fortunes topics, {study['steps']} steps, batch {study['batch_size']}, "
        f"adapters on the 36 encoder linear layers. AdaLoRA: {knobs(study['adalora'])}; LoRA-drop: "
        f"{knobs(study['lora_drop'])}; Delta-LoRA: {knobs(study['delta_lora'])}. "
        + _plan(study)
        + (
            f"LoRA-drop's equivalence margin on test accuracy: +/-{margin:g}. "
            if margin is not None
            else ""
        )
        + "'Adapter parameters' counts what the saved adapter file holds (AdaLoRA truncated to "
        "its kept rank slots; LoRA-drop's shared adapters once).",
    )
    lines += [
        "| config | lr | val accuracy | test accuracy | adapter parameters | peak GPU MiB "
        "| device |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in configs(runs):
        for lr in _rates(pick(runs, config=c)):
            rs = pick(runs, config=c, lr=lr)
            params = [r["adapter_parameters"] for r in rs if "adapter_parameters" in r]
            peak = [r["peak_mib"] for r in rs if "peak_mib" in r]
            where = ", ".join(sorted({str(r.get("device")) for r in rs}))
            lines.append(
                f"| {c} | {lr:g} | {with_interval([r['val_acc'] for r in rs])} | "
                f"{with_interval([r['test_acc'] for r in rs])} | "
                f"{with_interval([float(p) for p in params], 6) if params else '-'} | "
                f"{with_interval(peak, 4) if peak else '-'} | {where} |"
            )
    lines += ["", "Claims (test accuracy):", ""]
    lines += _adalora_lines(runs) + _lora_drop_lines(runs, margin) + _delta_lines(runs)
    if any(r.get("commit") for r in runs):  # a file under the plan: say what it still lacks
        lines += _not_run_lines(runs)
    return lines
