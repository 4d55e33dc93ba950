"""The LoRA+-vs-LoRA section (Hayou, Ghosh and Yu 2024) and its plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.render_study.common import (
    ASSETS,
    configs,
    figure,
    header,
    mean_curve,
    pick,
    spread,
)


def steps_to(history: list[dict[str, float]], target: float) -> int | None:
    """First validation step whose loss is at most ``target``."""
    return next((h["step"] for h in history if h["val_loss"] <= target), None)


def plot_loraplus(study: dict[str, Any], path: Path) -> None:
    runs = study["runs"]
    with figure(
        path,
        "optimizer step",
        "validation loss (mean over seeds)",
        "LoRA+ (B side 16x) vs LoRA, MiniLM on fortunes topics",
        size=(6.5, 3.8),
    ) as ax:
        for lr in sorted({r["lr"] for r in runs}):
            for c in configs(runs):
                rs = pick(runs, config=c, lr=lr)
                if rs:
                    ax.plot(*mean_curve(rs, "history"), marker=".", label=f"{c}, lr {lr:g}")


def loraplus_section(study: dict[str, Any]) -> list[str]:
    runs = study["runs"]
    plot_loraplus(study, ASSETS / "study_loraplus.png")
    lines = header(
        "LoRA+ vs LoRA (Hayou, Ghosh and Yu 2024)",
        study,
        "loraplus",
        f"LoRA r=8 on MiniLM, Debian fortunes topics, {study['steps']} steps (batch "
        f"{study['batch_size']}), validated every {study['eval_every']} steps. LoRA+ is the same "
        f"adapter with the B matrices at {study['lr_ratio']:g} times the learning rate of the A "
        "matrices; 'lr' is the A side's (and plain LoRA's) rate. The target is the best "
        "validation loss plain LoRA reaches at the same rate and seed.",
    )
    lines += [
        "![validation loss curves](assets/study_loraplus.png)",
        "",
        "| lr | config | best val loss | final val accuracy | steps to the target |",
        "|---|---|---|---|---|",
    ]
    verdicts = []
    for lr in sorted({r["lr"] for r in runs}):
        base = {r["seed"]: r for r in pick(runs, config="LoRA r=8", lr=lr)}
        plus = {r["seed"]: r for r in pick(runs, config="LoRA+ r=8", lr=lr)}
        seeds = sorted(set(base) & set(plus))
        if not seeds:
            continue
        target = {s: min(h["val_loss"] for h in base[s]["history"]) for s in seeds}
        for name, rs in (("LoRA r=8", base), ("LoRA+ r=8", plus)):
            reach = [steps_to(rs[s]["history"], target[s]) for s in seeds]
            shown = ", ".join("never" if x is None else str(x) for x in reach)
            lines.append(
                f"| {lr:g} | {name} | "
                f"{spread([min(h['val_loss'] for h in rs[s]['history']) for s in seeds])} | "
                f"{spread([rs[s]['val_acc'] for s in seeds])} | {shown} |"
            )
        reach_base = [steps_to(base[s]["history"], target[s]) for s in seeds]
        reach_plus = [steps_to(plus[s]["history"], target[s]) for s in seeds]
        if all(x is not None for x in reach_plus):
            ratios = [b / p for b, p in zip(reach_base, reach_plus, strict=True) if b and p]
            verdicts.append(
                f"at lr {lr:g}, LoRA+ reaches plain LoRA's best loss {min(ratios):.1f}-"
                f"{max(ratios):.1f} times sooner"
            )
        else:
            verdicts.append(
                f"at lr {lr:g}, LoRA+ never reaches plain LoRA's best loss in "
                f"{sum(x is None for x in reach_plus)} of {len(seeds)} seeds (its B side, at "
                f"{lr * study['lr_ratio']:g}, destabilises training)"
            )
    lines += [
        "",
        "Claim: LoRA+ fine-tunes faster (up to about 2x) and a little better. What these runs "
        "show: " + "; ".join(verdicts) + ". So the speed-up is **reproduced at the lower rate "
        "and not at the higher one**: LoRA+ moves the usable learning-rate range down, and a fair "
        "comparison tunes the rate of each."
        if len(verdicts) == 2 and "sooner" in verdicts[0] and "never" in verdicts[1]
        else "Claim: LoRA+ fine-tunes faster (up to about 2x) and a little better. What these "
        "runs show: " + "; ".join(verdicts) + ".",
    ]
    return lines
