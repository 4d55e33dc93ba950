"""The SLTrain pre-training section (Han et al. 2024) and its plot."""

from __future__ import annotations

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
    mean_curve,
    pick,
    verdict_line,
    with_interval,
)


def _training(runs: Runs) -> Runs:
    return [r for r in runs if r.get("kind", "train") == "train"]


def plot_sltrain(study: dict[str, Any], path: Path) -> None:
    runs = _training(study["runs"])
    with figure(
        path,
        "optimizer step",
        "held-out loss (nats per byte)",
        "Byte-level Llama pre-trained on BBC News text (each variant at its best rate)",
    ) as ax:
        for c in configs(runs):
            rs = pick(runs, config=c)
            rs = pick(rs, lr=best_rate(rs, "val_loss", False))
            label = f"{c}, lr {rs[0]['lr']:g} ({rs[0]['trainable'] / 1e6:.2f}M trained)"
            ax.plot(*mean_curve(rs, "curve"), marker=".", label=label)


def _memory_lines(runs: Runs) -> list[str]:
    mem = [r for r in runs if r.get("kind") == "memory"]
    if not mem:
        return ["", "Memory on a weight-dominated configuration: not measured yet."]
    m = mem[0]["memory_model"]
    lines = [
        "",
        f"Memory on a weight-dominated configuration ({m['layers']} layers of width "
        f"{m['width']}, rank {m['rank']}, batch {m['batch']} x {m['seq']} bytes), counted from the "
        "tensors (weights, gradients, AdamW state, bytes saved for backward) and measured "
        f"({mem[0]['peak_source']}), MiB:",
        "",
        "| variant | weights | gradients | optimizer state | static total | saved for backward "
        "| measured peak | device |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in mem:
        lines.append(
            f"| {r['config']} | {r['weights_mib']:.1f} | {r['gradients_mib']:.1f} | "
            f"{r['optimizer_state_mib']:.1f} | {r['static_mib']:.1f} | "
            f"{r['saved_for_backward_mib']:.1f} | {r['peak_mib']:.1f} | {r.get('device')} |"
        )
    full = next((r for r in mem if r["config"] == "full rank"), None)
    if full is not None:
        lines.append("")
        for r in mem:
            if r is full:
                continue
            lines.append(
                f"- {r['config']} against full rank: static memory "
                f"{r['static_mib'] / full['static_mib']:.2f}x, measured peak "
                f"{r['peak_mib'] / full['peak_mib']:.2f}x; the static part is "
                f"{r['static_mib'] / r['peak_mib']:.0%} of its peak."
            )
    return lines


def sltrain_section(study: dict[str, Any]) -> list[str]:
    runs = study["runs"]
    train = _training(runs)
    plot = ASSETS / "study_sltrain.png"
    m = study["model"]
    grids = study["learning_rates"]
    grid_text = "; ".join(
        f"{k} {', '.join(f'{x:g}' for x in (v if isinstance(v, list) else [v]))}"
        for k, v in grids.items()
    )
    lines = header(
        "SLTrain vs low-rank vs full-rank pre-training (Han et al. 2024)",
        study,
        "sltrain",
        f"A byte-level Llama ({m['layers']} layers, width {m['width']}, {m['heads']} heads, "
        f"sequences of {m['seq']} bytes) pre-trained from scratch on the BBC News articles "
        f"(90 % of the articles; the held-out 10 % give the perplexity), {study['steps']} steps "
        f"of batch {study['batch_size']}, AdamW with warm-up and cosine decay. Rank "
        f"{study['rank']}, sparse density {study['density']}, learning rates: {grid_text}. Each "
        "variant's best rate has the lowest mean held-out loss.",
    )
    if not train:  # the memory tasks ran, the pre-training runs not yet: nothing to plot or judge
        plot.unlink(missing_ok=True)
        return (
            lines
            + [
                "No pre-training runs yet, so nothing is claimed about perplexity "
                "(`python -m benchmarks.study --studies sltrain --only kind=train`)."
            ]
            + _memory_lines(runs)
        )
    plot_sltrain(study, plot)
    lines += [
        "![held-out loss curves](assets/study_sltrain.png)",
        "",
        "| variant | lr | trained parameters | held-out perplexity per byte | bits per byte "
        "| peak GPU MiB |",
        "|---|---|---|---|---|---|",
    ]
    for c in configs(train):
        for lr in sorted({r["lr"] for r in pick(train, config=c)}):
            rs = pick(train, config=c, lr=lr)
            peak = [r["peak_mib"] for r in rs if "peak_mib" in r]
            lines.append(
                f"| {c} | {lr:g} | {rs[0]['trainable']:,} | "
                f"{with_interval([r['val_ppl'] for r in rs], 4)} | "
                f"{with_interval([r['bits_per_byte'] for r in rs], 4)} | "
                f"{with_interval(peak, 5) if peak else '-'} |"
            )
    best = {c: pick(train, config=c) for c in configs(train)}
    best = {c: pick(rs, lr=best_rate(rs, "val_loss", False)) for c, rs in best.items()}
    lines += ["", "Claims (held-out loss in nats per byte, each variant at its best rate):", ""]
    sl, low, full = best.get("SLTrain"), best.get("low-rank"), best.get("full rank")
    if sl and low:
        lines.append(
            verdict_line(
                "SLTrain pre-trains better than its low-rank part alone",
                f"SLTrain (lr {sl[0]['lr']:g})",
                sl,
                f"low-rank (lr {low[0]['lr']:g})",
                low,
                "val_loss",
                "less",
            )
        )
    margin = study.get("close_margin")
    if sl and full:
        if margin is None:
            lines.append(
                "- SLTrain comes close to full rank: not judged, the study states no margin "
                "for this file."
            )
        else:
            lines.append(
                verdict_line(
                    f"SLTrain comes within +/-{margin:g} nats per byte of full rank",
                    f"SLTrain (lr {sl[0]['lr']:g})",
                    sl,
                    f"full rank (lr {full[0]['lr']:g})",
                    full,
                    "val_loss",
                    "equivalent",
                    margin=margin,
                )
            )
    seeds = {c: len(rs) for c, rs in best.items()}
    lines.append(
        "- Seeds per variant at its best rate: "
        + ", ".join(f"{c} {n}" for c, n in seeds.items())
        + " (mean held-out loss: "
        + ", ".join(f"{c} {mean([r['val_loss'] for r in rs]):.4g}" for c, rs in best.items())
        + ")."
    )
    return lines + _memory_lines(runs)
