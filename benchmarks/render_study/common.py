"""Shared pieces of the Reproduction-study page: where results and docs live, how a mean over
seeds is written, the paired verdict sentence, and the figure and section-header helpers."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.provenance import describe
from benchmarks.stats import CONFIDENCE, MIN_SEEDS, Claim, paired_verdict, t_interval

ROOT = Path(__file__).resolve().parent.parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"
ASSETS = DOCS / "assets"
Runs = list[dict[str, Any]]


def mean(xs: Sequence[float]) -> float:
    return statistics.mean(xs)


def spread(xs: Sequence[float], digits: int = 3) -> str:
    """``mean (min-max, n seeds)``."""
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}g} (1 seed)"
    return f"{mean(xs):.{digits}g} ({min(xs):.{digits}g}-{max(xs):.{digits}g}, {len(xs)} seeds)"


def spread_int(xs: Sequence[int]) -> str:
    if not xs:
        return "-"
    if min(xs) == max(xs):
        return f"{xs[0]:,} ({len(xs)} seed{'s' if len(xs) > 1 else ''})"
    return f"{mean(xs):,.0f} ({min(xs):,}-{max(xs):,}, {len(xs)} seeds)"


def with_interval(xs: Sequence[float], digits: int = 3) -> str:
    """``mean +/- half-width (n seeds)``: the mean and its 95 % t-interval over seeds."""
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}g} (1 seed)"
    m, low, _ = t_interval(list(xs))
    return f"{m:.{digits}g} +/- {m - low:.{digits}g} ({len(xs)} seeds)"


def by_seed(runs: Runs, metric: str) -> dict[int, float]:
    """``{seed: run[metric]}`` of ``runs`` (one run per seed)."""
    return {r["seed"]: float(r[metric]) for r in runs if r.get(metric) is not None}


def run_devices(runs: Runs) -> list[str]:
    return sorted({str(r.get("device")) for r in runs})


def verdict_line(
    claim: str,
    label_a: str,
    a: Runs | dict[int, float],
    label_b: str,
    b: Runs | dict[int, float],
    metric: str,
    side: Claim,
    margin: float | None = None,
    devices_of: Runs | None = None,
) -> str:
    """One bullet: the claim, the paired difference ``a - b`` of ``metric`` with its interval and
    the verdict, every part of it from the values. ``a`` and ``b`` are runs (``metric`` is read
    from them) or ``{seed: value}`` already derived from runs listed in ``devices_of``.

    A comparison whose runs come from more than one device is refused (the line says so)."""
    runs = devices_of if devices_of is not None else [*a, *b]  # type: ignore[list-item]
    where = run_devices(runs) if runs else []
    va = a if isinstance(a, dict) else by_seed(a, metric)
    vb = b if isinstance(b, dict) else by_seed(b, metric)
    refused = device_refusal(claim, label_a, label_b, runs)
    if refused:
        return refused
    v = paired_verdict(va, vb, side, margin)
    if v.n == 0:
        return f"- {claim}: not compared: no seed ran both {label_a} and {label_b}."
    interval = "" if v.n < 2 else f", {CONFIDENCE:.0%} interval [{v.low:+.4g}, {v.high:+.4g}]"
    return (
        f"- {claim}: {label_a} minus {label_b} in {metric}: mean {v.mean:+.4g}{interval} over "
        f"{v.n} paired seeds on {where[0] if where else '?'}: **{v.label}**"
        + ("." if v.n < MIN_SEEDS else f" ({v.reason}).")
    )


def device_refusal(claim: str, label_a: str, label_b: str, runs: Runs) -> str | None:
    """The line refusing a comparison whose ``runs`` come from more than one device, else
    ``None``."""
    where = run_devices(runs)
    if len(where) <= 1:
        return None
    return (
        f"- {claim}: not compared: the runs of {label_a} and {label_b} ran on "
        f"{len(where)} devices ({'; '.join(where)}); a comparison needs one device."
    )


def method_lines() -> list[str]:
    """The verdict rule, from the constants of :mod:`benchmarks.stats`."""
    return [
        "## Method",
        "",
        "Every claim is tested by a paired comparison: two configs run with the same seeds (a "
        "seed fixes the data split, the batch order and the initial weights), the difference "
        "a - b of the stated metric is taken per seed, and the page reports its mean with a "
        f"{CONFIDENCE:.0%} Student-t interval over the seeds (mean +/- t(0.975, n - 1) s / "
        "sqrt(n)). Verdicts: **reproduced** when the interval lies entirely on the side the claim "
        "names (for an equivalence claim: entirely inside a margin stated in the study's code "
        "before the runs); **not reproduced** when it lies entirely on the other side (outside "
        "the margin); **inconclusive** otherwise, and always with fewer than "
        f"{MIN_SEEDS} seeds. A comparison whose runs come from more than one device is not "
        "made. Where a method's learning rate is tuned, the rate is chosen on the validation "
        "metric (mean over seeds) and the comparison uses the test metric where there is one. "
        "Every run records the commit it ran from (with a flag for uncommitted changes), the "
        "device and the library versions; sections whose runs lack them predate this method.",
        "",
        "Re-run: `python -m benchmarks.study --studies NAME [NAME ...] --jobs 4` (resumable: "
        "finished runs are kept; the default seeds are "
        f"0-{MIN_SEEDS - 1}; `--only FIELD=VALUE` runs part of a study, say one comparison: "
        "`--only 'config=LoRA r=2' 'config=AdaLoRA 3 -> 2'`), then `python -m benchmarks.render`; "
        "`python -m benchmarks.study --quick --seeds 0` checks that every study runs (its "
        "results go to `benchmarks/results/quick/`, never to the page).",
        "",
    ]


def best_rate(runs: Runs, metric: str, higher: bool) -> float | None:
    """The learning rate of ``runs`` (one config) with the best mean ``metric`` over seeds."""
    rates = sorted({r["lr"] for r in runs if r.get(metric) is not None})
    if not rates:
        return None
    score = {lr: mean([r[metric] for r in runs if r["lr"] == lr]) for lr in rates}
    return max(rates, key=lambda lr: score[lr] if higher else -score[lr])


def configs(runs: Runs) -> list[str]:
    return list(dict.fromkeys(r["config"] for r in runs))


def pick(runs: Runs, **where: Any) -> Runs:
    return [r for r in runs if all(r.get(k) == v for k, v in where.items())]


def devices(study: dict[str, Any]) -> str:
    found = sorted({r.get("device") or study.get("device", "?") for r in study["runs"]})
    return " and ".join(found)


def knobs(d: dict[str, Any]) -> str:
    """``{"rank": 8, "lr": 0.001}`` as ``rank 8, lr 0.001``."""
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items())


def rerun(name: str) -> str:
    return f"`python -m benchmarks.study --studies {name} --jobs 4`"


@contextmanager
def figure(
    path: Path, xlabel: str, ylabel: str, title: str, size: tuple[float, float] = (6, 3.6)
) -> Iterator[Any]:
    """An axes to draw on; labelled, given a legend and saved to ``path`` on leaving."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    try:
        yield ax
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def mean_curve(runs: Runs, curve: str) -> tuple[list[int], list[float]]:
    """The steps of ``runs[i][curve]`` and the validation loss at each, averaged over runs."""
    steps = [p["step"] for p in runs[0][curve]]
    return steps, [mean([r[curve][i]["val_loss"] for r in runs]) for i in range(len(steps))]


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"study_{name}.json"
    return normalise(json.loads(path.read_text())) if path.exists() else None


def progress(name: str, runs: Runs) -> str:
    """How much of the study's plan (its tasks for the default seeds) the file holds under the
    verdict method (records with a commit), and how long one of those runs trained (the
    median): what finishing it would take."""
    from benchmarks.study_common import DEFAULT_SEEDS, load_study

    study = load_study(name)
    planned = {study.ident(t) for t in study.tasks(DEFAULT_SEEDS)}
    current = [r for r in runs if r.get("commit")]  # records that predate the method do not count
    done = planned & {study.ident(r) for r in current}
    seeds = f"seeds {DEFAULT_SEEDS[0]}-{DEFAULT_SEEDS[-1]}"
    text = f"{len(done)} of the {len(planned)} planned runs ({seeds}) have run under this method"
    seconds = [r["train_seconds"] for r in current if r.get("train_seconds") is not None]
    if seconds:
        median = statistics.median(seconds)
        text += f"; a run trained for {median:.0f} s (median)"
        left = len(planned) - len(done)
        if left:
            text += f", so the {left} left take about {left * median / 3600:.1f} h one at a time"
    return text + "."


def header(title: str, study: dict[str, Any], name: str, setting: str) -> list[str]:
    return [
        f"## {title}",
        "",
        setting,
        f"Ran on {devices(study)}; re-run with {rerun(name)}. {describe(study['runs'])} "
        + progress(name, study["runs"]),
        "",
    ]


def normalise(study: dict[str, Any]) -> dict[str, Any]:
    """Runs from before the method's fields carry them from the file: the learning rate when the
    study had one for all, and the device."""
    for r in study["runs"]:
        if "lr" not in r and "lr" in study:
            r["lr"] = study["lr"]
        r.setdefault("device", study.get("device"))
    return study
