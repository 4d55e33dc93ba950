"""Shared pieces of the Reproduction-study page: where results and docs live, how a spread over
seeds is written, the verdict comparison, and the figure and section-header helpers."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


def compare(a: Sequence[float], b: Sequence[float], higher_is_better: bool = True) -> str:
    """How ``a`` compares with ``b`` given the seeds: "better"/"worse" only when the two ranges
    of values do not overlap, else "within the seed spread"."""
    if min(a) > max(b):
        return "better than" if higher_is_better else "worse than"
    if max(a) < min(b):
        return "worse than" if higher_is_better else "better than"
    return "within the seed spread of"


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
    return json.loads(path.read_text()) if path.exists() else None


def header(title: str, study: dict[str, Any], name: str, setting: str) -> list[str]:
    return [
        f"## {title}",
        "",
        setting,
        f"Ran on {devices(study)}; re-run with {rerun(name)}.",
        "",
    ]
