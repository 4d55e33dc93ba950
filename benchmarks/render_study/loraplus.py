"""The LoRA+-vs-LoRA section (Hayou, Ghosh and Yu 2024) and its plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.render_study.common import (
    ASSETS,
    Runs,
    configs,
    figure,
    header,
    mean,
    mean_curve,
    pick,
    verdict_line,
    with_interval,
)

LORA, PLUS = "LoRA r=8", "LoRA+ r=8"


def steps_to(history: list[dict[str, float]], target: float) -> int | None:
    """First validation step whose loss is at most ``target``."""
    return next((h["step"] for h in history if h["val_loss"] <= target), None)


def best_loss(run: dict[str, Any]) -> float:
    return min(h["val_loss"] for h in run["history"])


def tuned(runs: Runs) -> float:
    """The rate with the lowest mean best validation loss over seeds."""
    rates = sorted({r["lr"] for r in runs})
    return min(rates, key=lambda lr: mean([best_loss(r) for r in pick(runs, lr=lr)]))


def plot_loraplus(study: dict[str, Any], path: Path) -> None:
    runs = study["runs"]
    with figure(
        path,
        "optimizer step",
        "validation loss (mean over seeds)",
        "LoRA+ (B side 16x) vs LoRA, MiniLM on fortunes topics",
        size=(6.5, 3.8),
    ) as ax:
        for c in configs(runs):
            for lr in sorted({r["lr"] for r in pick(runs, config=c)}):
                rs = pick(runs, config=c, lr=lr)
                ax.plot(*mean_curve(rs, "history"), marker=".", label=f"{c}, lr {lr:g}")


def loraplus_section(study: dict[str, Any]) -> list[str]:
    runs = study["runs"]
    plot_loraplus(study, ASSETS / "study_loraplus.png")
    penalty = study["steps"] + study["eval_every"]
    lines = header(
        "LoRA+ vs LoRA (Hayou, Ghosh and Yu 2024)",
        study,
        "loraplus",
        f"LoRA r=8 on MiniLM, Debian fortunes topics, {study['steps']} steps (batch "
        f"{study['batch_size']}), validated every {study['eval_every']} steps. LoRA+ is the same "
        f"adapter with the B matrices at {study['lr_ratio']:g} times the learning rate of the A "
        "matrices; 'lr' is the A side's (and plain LoRA's) rate. Each method's tuned rate has "
        "the lowest mean best validation loss; per seed, the target is tuned LoRA's best "
        f"validation loss, and a run that never reaches it counts {penalty} steps.",
    )
    lines += [
        "![validation loss curves](assets/study_loraplus.png)",
        "",
        "| config | lr | best val loss | final val accuracy | seeds |",
        "|---|---|---|---|---|",
    ]
    for c in configs(runs):
        for lr in sorted({r["lr"] for r in pick(runs, config=c)}):
            rs = pick(runs, config=c, lr=lr)
            lines.append(
                f"| {c} | {lr:g} | {with_interval([best_loss(r) for r in rs], 4)} | "
                f"{with_interval([r['val_acc'] for r in rs])} | {len(rs)} |"
            )
    lora, plus = pick(runs, config=LORA), pick(runs, config=PLUS)
    lines += ["", "Claims:", ""]
    if not (lora and plus):
        return lines + [f"- Not compared: the result file lacks {LORA} or {PLUS} runs."]
    lr_l, lr_p = tuned(lora), tuned(plus)
    base = {r["seed"]: r for r in pick(lora, lr=lr_l)}
    fast = {r["seed"]: r for r in pick(plus, lr=lr_p)}
    seeds = sorted(set(base) & set(fast))
    target = {s: best_loss(base[s]) for s in seeds}

    def reach(r: dict[str, Any], s: int) -> float:
        hit = steps_to(r["history"], target[s])
        return float(penalty if hit is None else hit)

    steps_l = {s: reach(base[s], s) for s in seeds}
    steps_p = {s: reach(fast[s], s) for s in seeds}
    never = sum(steps_to(fast[s]["history"], target[s]) is None for s in seeds)
    label_l, label_p = f"tuned LoRA (lr {lr_l:g})", f"tuned LoRA+ (A-side lr {lr_p:g})"
    lines.append(
        verdict_line(
            "LoRA+ reaches tuned LoRA's best validation loss in fewer steps (LoRA+ missed it in "
            f"{never} of {len(seeds)} seeds; mean steps {mean(list(steps_p.values())):.0f} "
            f"against {mean(list(steps_l.values())):.0f})"
            if seeds
            else "LoRA+ reaches tuned LoRA's best validation loss in fewer steps",
            label_p,
            steps_p,
            label_l,
            steps_l,
            "steps to the target",
            "less",
            devices_of=[*base.values(), *fast.values()],
        )
    )
    lines.append(
        verdict_line(
            "LoRA+ ends more accurate than LoRA, both tuned",
            label_p,
            list(fast.values()),
            label_l,
            list(base.values()),
            "test_acc",
            "greater",
        )
    )
    return lines
