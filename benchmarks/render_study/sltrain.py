"""The SLTrain pre-training section (Han et al. 2024) and its plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.render_study.common import (
    ASSETS,
    compare,
    configs,
    figure,
    header,
    knobs,
    mean,
    mean_curve,
    pick,
    spread,
)


def plot_sltrain(study: dict[str, Any], path: Path) -> None:
    runs = study["runs"]
    with figure(
        path,
        "optimizer step",
        "held-out loss (nats per byte)",
        "Byte-level Llama pre-trained on BBC News text",
    ) as ax:
        for c in configs(runs):
            rs = pick(runs, config=c)
            label = f"{c} ({rs[0]['trainable'] / 1e6:.2f}M trained)"
            ax.plot(*mean_curve(rs, "curve"), marker=".", label=label)


def sltrain_section(study: dict[str, Any]) -> list[str]:
    runs = study["runs"]
    plot_sltrain(study, ASSETS / "study_sltrain.png")
    m = study["model"]
    lines = header(
        "SLTrain vs low-rank vs full-rank pre-training (Han et al. 2024)",
        study,
        "sltrain",
        f"A byte-level Llama ({m['layers']} layers, width {m['width']}, {m['heads']} heads, "
        f"sequences of {m['seq']} bytes) pre-trained from scratch on the BBC News articles "
        f"(90 % of the articles; the held-out 10 % give the perplexity), {study['steps']} steps "
        f"of batch {study['batch_size']}, AdamW with warm-up and cosine decay. Rank "
        f"{study['rank']}, sparse density {study['density']}, learning rates: "
        f"{knobs(study['learning_rates'])}. Peak memory is the GPU allocator's peak over the run "
        "(model, gradients, AdamW state, activations).",
    )
    lines += [
        "![held-out loss curves](assets/study_sltrain.png)",
        "",
        "| variant | trained parameters | held-out perplexity per byte | bits per byte | "
        "peak GPU MiB |",
        "|---|---|---|---|---|",
    ]
    ppl: dict[str, list[float]] = {}
    peak: dict[str, list[float]] = {}
    for c in configs(runs):
        rs = pick(runs, config=c)
        ppl[c] = [r["val_ppl"] for r in rs]
        peak[c] = [r["peak_mib"] for r in rs if "peak_mib" in r]
        lines.append(
            f"| {c} | {rs[0]['trainable']:,} | {spread(ppl[c], 4)} | "
            f"{spread([r['bits_per_byte'] for r in rs], 4)} | "
            f"{spread(peak[c], 5) if peak[c] else '-'} |"
        )
    full, low, sl = ppl.get("full rank"), ppl.get("low-rank"), ppl.get("SLTrain")
    lines += ["", "Claims, and what these runs show:", ""]
    if full and low and sl:
        gap_sl = mean(sl) / mean(full) - 1
        gap_low = mean(low) / mean(full) - 1
        lines.append(
            f"- SLTrain comes close to full rank and clearly beats pure low-rank: SLTrain's "
            f"perplexity is {gap_sl:.1%} above full rank's, low-rank's {gap_low:.1%} above "
            f"(SLTrain is {compare(sl, low, higher_is_better=False)} low-rank): "
            f"**{'reproduced' if gap_sl < gap_low / 2 and compare(sl, low, False) == 'better than' else 'not reproduced'}** "
            "(rule: SLTrain's gap under half of low-rank's, and better on every seed)."
        )
    if peak.get("full rank") and peak.get("SLTrain"):
        ratio = mean(peak["SLTrain"]) / mean(peak["full rank"])
        lines.append(
            f"- Less memory than full rank: SLTrain peaks at {ratio:.2f} times full rank's "
            f"memory here: **{'reproduced' if ratio < 1 else 'not reproduced'}**. At this size the "
            "peak is dominated by activations (and the dense temporaries SLTrain builds for each "
            "sparse matmul), not by weights and optimizer state, which is where SLTrain saves "
            f"({mean([r['trainable'] for r in pick(runs, config='SLTrain')]) / 1e6:.2f}M vs "
            f"{mean([r['trainable'] for r in pick(runs, config='full rank')]) / 1e6:.2f}M trained "
            "parameters); the paper's savings are on 350M-7B models."
        )
    seeds = {c: len(v) for c, v in ppl.items()}
    if len(set(seeds.values())) > 1:
        lines.append(
            "- Seeds per variant: "
            + ", ".join(f"{c} {n}" for c, n in seeds.items())
            + " (a run that did not finish in its time slot is missing; re-running resumes)."
        )
    return lines
