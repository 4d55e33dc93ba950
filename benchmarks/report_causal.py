"""Markdown tables from ``benchmarks/results/causal_lm.json`` (for ``causal_lm`` and ``render``)."""

from __future__ import annotations

from typing import Any

from benchmarks.provenance import code_since


def counterpart(variant: str) -> str | None:
    """The PEFT variant an ``ours`` variant is compared with (``LoRA:ours-nf4`` ->
    ``LoRA:peft-nf4``), or None for the floor and PEFT's own variants."""
    name, _, lib = variant.partition(":")
    return f"{name}:peft{lib[4:]}" if lib.startswith("ours") else None


def interval_text(d: dict[str, Any] | None) -> str:
    if not d:
        return "-"
    return f"{d['mean']:.3f} [{d['low']:.3f}, {d['high']:.3f}]"


def met_text(d: dict[str, Any] | None, target: float | None) -> str:
    """ "yes" only when the 95 % interval lies below ``target``, "**no**" when above it."""
    if not d or target is None:
        return "-"
    if d["high"] < target:
        return f"yes (<= {target:.2f})"
    if d["low"] > target:
        return f"**no** (<= {target:.2f})"
    return f"not shown (<= {target:.2f} inside the interval)"


def memory_met_text(ours: dict | None, peft: dict | None, target: float | None) -> str:
    """Met when even the largest reading of ours over the smallest of PEFT is under the target."""
    if not ours or not peft or target is None:
        return "-"
    worst, best = ours["max_mib"] / peft["min_mib"], ours["min_mib"] / peft["max_mib"]
    if worst < target:
        return f"yes (<= {target:.2f})"
    if best > target:
        return f"**no** (<= {target:.2f})"
    return f"not shown (<= {target:.2f} inside the readings' range)"


def mib_text(m: dict | None) -> str:
    if not m:
        return "-"
    n = len(m["readings_mib"])
    if n == 1:
        return f"{m['median_mib']:.0f} (1 reading)"
    return f"{m['median_mib']:.0f} ({m['min_mib']:.0f}-{m['max_mib']:.0f}, {n} readings)"


def mode_table(res: dict[str, Any], mode: str) -> list[str]:
    block = res["modes"][mode]
    tr, mem = block.get("training"), block.get("memory", {})
    targets = res["targets"]
    names = list(tr["seconds"]) if tr else list(mem)
    lines = [
        f"Gradient checkpointing **{mode}**."
        + (f" Floor: {tr['seconds']['floor']:.3f} s/step." if tr else "")
        + (
            f" Floor memory: {mib_text(mem.get('floor'))} MiB, saved for backward "
            f"{mem['floor']['saved_mib']:.1f} MiB."
            if mem.get("floor")
            else ""
        ),
        "",
        "| variant | s/step | / floor | met | ours / PEFT | met | peak MiB | saved for backward "
        "MiB | ours / PEFT memory (medians) | met |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in names:
        if v == "floor":
            continue
        method, lib = v.split(":")
        r = tr["ratios"][v] if tr else {}
        m = mem.get(v)
        twin = counterpart(v)
        peft_m = mem.get(twin) if twin else None
        ratio_m = f"{m['median_mib'] / peft_m['median_mib']:.2f}" if m and peft_m else "-"
        is_ours = lib == "ours"
        # over a 4-bit base the target is PEFT's QLoRA itself, for time and memory alike
        nf4 = targets.get("nf4_ours_over_peft", {}).get(method) if lib == "ours-nf4" else None
        lines.append(
            f"| {v} | "
            + (f"{tr['seconds'][v]:.3f}" if tr else "-")
            + f" | {interval_text(r.get('over_floor'))} | "
            + (
                met_text(r.get("over_floor"), targets["step_over_floor"].get(method))
                if is_ours
                else "-"
            )
            + f" | {interval_text(r.get('over_peft'))} | "
            + (
                met_text(r.get("over_peft"), nf4 or targets["ours_over_peft"].get(method))
                if is_ours or nf4
                else "-"
            )
            + f" | {mib_text(m)} | "
            + (f"{m['saved_mib']:.1f}" if m else "-")
            + f" | {ratio_m} | "
            + memory_met_text(m, peft_m, nf4 or targets["memory_ours_over_peft"].get(method))
            + " |"
        )
    return lines


def causal_report(res: dict[str, Any]) -> str:
    meta = res["meta"]
    lines = [
        f"Run {meta['date']} on {meta['device']}, commit "
        f"{(meta.get('commit') or 'unknown')[:10]}"
        + (" with uncommitted changes" if meta.get("dirty") else "")
        + "; "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v)
        + f". {meta['model']}, batch {meta['batch']} x {meta['seq_len']} tokens, {meta['loss']}; "
        f"timed by {meta['clock']}; {meta['reps']} rounds of {meta['steps_per_rep']} steps, "
        f"order {meta['order']}, {meta['warmup_steps']} warm-up steps per variant; ratios are "
        "the mean [95 % t-interval] over rounds of the ratio within a round; memory is the "
        f"median (range) of {meta['memory_repeats']} fresh-process readings of the peak-RSS "
        "increase over the training steps, the frozen weights already resident (so a 4-bit "
        "base's smaller weights are not in it: the QLoRA page compares the base weight bytes; "
        "what it shows is the training-time cost of each variant). A `-nf4` row is compared "
        "with PEFT over the same 4-bit layers, against the target of at most PEFT's. Whole run: "
        f"{meta.get('wall_seconds')} s. " + code_since(meta.get("commit")),
        "",
    ]
    for mode in res["modes"]:
        lines += mode_table(res, mode) + [""]
    return "\n".join(lines).rstrip()
