"""The SingLoRA-vs-LoRA section (Bensaid et al. 2025) and its plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from benchmarks.render_study.common import (
    ASSETS,
    Runs,
    best_rate,
    configs,
    figure,
    header,
    mean,
    pick,
    verdict_line,
)


def plot_singlora(study: dict[str, Any], path: Path) -> None:
    runs = study["runs"]
    with figure(
        path,
        "learning rate",
        "validation accuracy",
        "MiniLM on fortunes topics (band: min-max over seeds)",
    ) as ax:
        for c in configs(runs):
            lrs = sorted({r["lr"] for r in pick(runs, config=c)})
            accs = [[r["val_acc"] for r in pick(runs, config=c, lr=lr)] for lr in lrs]
            ax.plot(lrs, [mean(a) for a in accs], marker="o", label=c)
            ax.fill_between(lrs, [min(a) for a in accs], [max(a) for a in accs], alpha=0.2)
        ax.set_xscale("log")


def _on_grid(lr: float, rates: list[float]) -> float | None:
    return next((r for r in rates if math.isclose(r, lr, rel_tol=0.02)), None)


def drop_at_double(runs: Runs, best: float) -> dict[int, float] | None:
    """``{seed: acc(best) - acc(2 best)}``; ``None`` when 2x the best rate is not on the grid."""
    rates = sorted({r["lr"] for r in runs})
    double = _on_grid(2 * best, rates)
    if double is None:
        return None
    at = {lr: {r["seed"]: r["val_acc"] for r in pick(runs, lr=lr)} for lr in (best, double)}
    return {s: at[best][s] - at[double][s] for s in set(at[best]) & set(at[double])}


def band_width(runs: Runs, band: float) -> dict[int, float]:
    """``{seed: log2(max / min)}`` of the rates whose accuracy is within ``band`` of that seed's
    best: the width of the good band, in factors of 2."""
    out = {}
    for seed in sorted({r["seed"] for r in runs}):
        rs = pick(runs, seed=seed)
        top = max(r["val_acc"] for r in rs)
        good = [r["lr"] for r in rs if r["val_acc"] >= top - band]
        out[seed] = math.log2(max(good) / min(good))
    return out


def singlora_section(study: dict[str, Any]) -> list[str]:
    from benchmarks.study_singlora import BAND

    runs = study["runs"]
    band = study.get("band", BAND)
    plot_singlora(study, ASSETS / "study_singlora.png")
    lrs = sorted({r["lr"] for r in runs})
    head = (
        f"the classifier head at a fixed {study['head_lr']:g}"
        if "head_lr" in study
        else "the classifier head at the swept rate too"
    )
    lines = header(
        "SingLoRA vs LoRA (Bensaid et al. 2025)",
        study,
        "singlora",
        f"MiniLM fine-tuned on Debian fortunes topics for {study['steps']} steps (batch "
        f"{study['batch_size']}, {study['max_length']} tokens, AdamW, 20 warm-up steps) at each "
        f"of {len(lrs)} learning rates, {head}; validation accuracy, mean over seeds. A "
        "method's best rate has the highest mean validation accuracy.",
    )
    lines += [
        "![accuracy against learning rate](assets/study_singlora.png)",
        "",
        "| config | trainable | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | seeds |",
        "|---|---|" + "---|" * (len(lrs) + 1),
    ]
    for c in configs(runs):
        cells = []
        for lr in lrs:
            v = [r["val_acc"] for r in pick(runs, config=c, lr=lr)]
            cells.append(f"{mean(v):.3f}" if v else "-")
        seeds = len({r["seed"] for r in pick(runs, config=c)})
        lines.append(
            f"| {c} | {pick(runs, config=c)[0]['trainable']:,} | "
            + " | ".join(cells)
            + f" | {seeds} |"
        )
    lines += ["", "Claims:", ""]
    lora, s8, s16 = (pick(runs, config=c) for c in ("LoRA r=8", "SingLoRA r=8", "SingLoRA r=16"))
    if not (lora and s8):
        return lines + ["- Not compared: the result file lacks LoRA r=8 or SingLoRA r=8 runs."]
    best = {c: best_rate(pick(runs, config=c), "val_acc", True) for c in configs(runs)}
    for name, rs, what in (
        ("SingLoRA r=8", s8, "at equal rank"),
        ("SingLoRA r=16", s16, "at about equal trainable parameters"),
    ):
        if rs:
            lines.append(
                verdict_line(
                    f"SingLoRA is more accurate than LoRA r=8 {what}, each at its best rate",
                    f"{name} (lr {best[name]:g})",
                    pick(rs, lr=best[name]),
                    f"LoRA r=8 (lr {best['LoRA r=8']:g})",
                    pick(lora, lr=best["LoRA r=8"]),
                    "test_acc",
                    "greater",
                )
            )
    d_s8, d_lora = drop_at_double(s8, best["SingLoRA r=8"]), drop_at_double(lora, best["LoRA r=8"])
    if d_s8 is not None and d_lora is not None:
        lines.append(
            verdict_line(
                "SingLoRA r=8 loses less accuracy than LoRA r=8 when the rate doubles past its "
                "best",
                "SingLoRA's drop",
                d_s8,
                "LoRA's drop",
                d_lora,
                "val_acc(best) - val_acc(2 x best)",
                "less",
                devices_of=s8 + lora,
            )
        )
    else:
        lines.append(
            "- Accuracy drop at 2x the best rate: not computed, 2x the best rate "
            f"(SingLoRA r=8 {best['SingLoRA r=8']:g}, LoRA r=8 {best['LoRA r=8']:g}) is not on "
            "the grid for "
            + " and ".join(
                n for n, d in (("SingLoRA r=8", d_s8), ("LoRA r=8", d_lora)) if d is None
            )
            + "."
        )
    lines.append(
        verdict_line(
            f"SingLoRA r=8's band of good rates (within {band:g} of each seed's best accuracy) "
            "is wider than LoRA r=8's",
            "SingLoRA's width",
            band_width(s8, band),
            "LoRA's width",
            band_width(lora, band),
            "log2(max rate / min rate) of the band",
            "greater",
            devices_of=s8 + lora,
        )
    )
    return lines
