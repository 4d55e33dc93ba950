"""The AdaLoRA, LoRA-drop and Delta-LoRA vs LoRA section."""

from __future__ import annotations

from typing import Any

from benchmarks.render_study.common import (
    compare,
    configs,
    header,
    knobs,
    mean,
    pick,
    spread,
    spread_int,
)


def methods_section(study: dict[str, Any]) -> list[str]:
    runs = study["runs"]
    lines = header(
        "AdaLoRA, LoRA-drop and Delta-LoRA vs LoRA",
        study,
        "methods",
        f"MiniLM on Debian fortunes topics, {study['steps']} steps, batch {study['batch_size']}, "
        f"learning rate {study['lr']:g} for every method, 36 encoder layers. AdaLoRA: "
        f"{knobs(study['adalora'])}; LoRA-drop: {knobs(study['lora_drop'])}; Delta-LoRA: "
        f"{knobs(study['delta_lora'])}. "
        "'Adapter parameters' counts what the saved adapter file holds (AdaLoRA truncated to its "
        "kept rank slots; LoRA-drop's shared adapters once).",
    )
    lines += [
        "| config | val accuracy | test accuracy | adapter parameters | peak GPU MiB | device |",
        "|---|---|---|---|---|---|",
    ]
    acc: dict[str, list[float]] = {}
    params: dict[str, list[int]] = {}
    for c in configs(runs):
        rs = pick(runs, config=c)
        acc[c] = [r["test_acc"] for r in rs]
        params[c] = [r["adapter_parameters"] for r in rs if "adapter_parameters" in r]
        peak = [r["peak_mib"] for r in rs if "peak_mib" in r]
        where = ", ".join(sorted({r.get("device") or study["device"] for r in rs}))
        lines.append(
            f"| {c} | {spread([r['val_acc'] for r in rs])} | {spread(acc[c])} | "
            f"{spread_int(params[c])} | "
            f"{spread(peak, 4) if peak else '-'} | {where} |"
        )
    lines += [
        "",
        "Claims, and what these runs show (test accuracy, 'better' only when the "
        "seed ranges do not overlap):",
        "",
    ]
    lora = acc.get("LoRA r=8")
    if lora and acc.get("AdaLoRA 12 -> 8"):
        ada = acc["AdaLoRA 12 -> 8"]
        lines.append(
            f"- AdaLoRA beats LoRA at the same rank budget: AdaLoRA {mean(ada):.3f} is "
            f"{compare(ada, lora)} LoRA {mean(lora):.3f}: "
            f"**{'reproduced' if compare(ada, lora) == 'better than' else 'not reproduced'}**. Its "
            "budget counts rank slots, and it gave more of them to the larger FFN layers, so its "
            f"file holds {mean(params['AdaLoRA 12 -> 8']) / mean(params['LoRA r=8']):.2f} times "
            "LoRA's parameters."
        )
    if lora and acc.get("LoRA-drop r=8"):
        drop = acc["LoRA-drop r=8"]
        saved = 1 - mean(params["LoRA-drop r=8"]) / mean(params["LoRA r=8"])
        same = compare(drop, lora) != "worse than"
        lines.append(
            f"- LoRA-drop keeps the accuracy with fewer parameters: it stores {saved:.0%} fewer "
            f"adapter parameters, and its accuracy {mean(drop):.3f} is {compare(drop, lora)} "
            f"LoRA {mean(lora):.3f}: **{'reproduced' if same else 'not reproduced'}** "
            "(the paper reports about half the parameters)."
        )
    if lora and acc.get("Delta-LoRA r=8"):
        delta = acc["Delta-LoRA r=8"]
        lines.append(
            f"- Delta-LoRA beats LoRA: {mean(delta):.3f} is {compare(delta, lora)} LoRA "
            f"{mean(lora):.3f}: "
            f"**{'reproduced' if compare(delta, lora) == 'better than' else 'not reproduced'}**."
        )
    lines.append(
        "- Scale: one short run per seed on one task; the papers report GLUE-size gains of "
        "fractions of a point to about a point, below the seed spread here."
    )
    return lines
