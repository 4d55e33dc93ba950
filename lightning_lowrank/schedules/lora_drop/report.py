"""LoRA-drop's selection as a text table and as a bar chart.

The schedule only builds these; the callback logs the table (on rank zero), so this package
never imports Lightning. matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def normalised(importance: Mapping[str, float]) -> dict[str, float]:
    """``I_i = g_i / sum_j g_j`` per layer (zeros while nothing was measured)."""
    total = math.fsum(importance.values())
    return {n: (g / total if total > 0 else 0.0) for n, g in importance.items()}


def roles(selected: Sequence[str], groups: Sequence[Sequence[str]], mode: str) -> dict[str, str]:
    """Each layer's role after the switch: ``"kept"``, ``"shared #k (n layers)"`` or
    ``"dropped"``."""
    out = dict.fromkeys(selected, "kept")
    for index, group in enumerate(groups):
        for name in group:
            out[name] = "dropped" if mode == "drop" else f"shared #{index} ({len(group)} layers)"
    return out


def report_table(
    importance: Mapping[str, float],
    role: Mapping[str, str],
    header: str,
) -> str:
    """Layers by importance (descending): normalised importance, cumulative share and role."""
    norm = normalised(importance)
    order = sorted(norm, key=lambda n: -norm[n])
    width = max(len(n) for n in order)
    lines = [header, f"{'layer':<{width}}  importance  cumulative  role"]
    cumulative = 0.0
    for name in order:
        cumulative += norm[name]
        lines.append(
            f"{name:<{width}}  {norm[name]:>10.4f}  {cumulative:>10.4f}  {role.get(name, '-')}"
        )
    return "\n".join(lines)


def plot_importance(
    importance: Mapping[str, float],
    selected: Sequence[str] = (),
    threshold: float | None = None,
    ax: Any = None,
) -> Any:
    """Draw the normalised importance of each layer (model order), kept layers highlighted, with a
    dashed line at the cut-off (the smallest kept importance). Returns the matplotlib Axes."""
    import matplotlib.pyplot as plt  # lazily: plotting is optional

    if ax is None:
        _, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(importance)), 3.5))
    names = list(importance)
    total = math.fsum(importance.values()) or 1.0
    values = [importance[n] / total for n in names]
    kept = set(selected)
    colors = ["tab:blue" if n in kept else "tab:gray" for n in names]
    ax.bar(range(len(names)), values, color=colors)
    prefix = _common_prefix(names)
    ax.set_xticks(range(len(names)), [n[len(prefix) :] for n in names], rotation=90, fontsize=7)
    ax.set_ylabel("normalised importance $I_i$")
    if kept:
        cut = min(v for n, v in zip(names, values, strict=True) if n in kept)
        label = "cut-off" + (f" (cumulative {threshold:g})" if threshold is not None else "")
        ax.axhline(cut, color="tab:red", linestyle="--", linewidth=1, label=label)
        ax.legend(loc="upper right")
    ax.set_title(f"LoRA-drop: {len(kept)} of {len(names)} layers kept (blue)")
    ax.figure.tight_layout()
    return ax


def _common_prefix(names: Sequence[str]) -> str:
    if len(names) < 2:
        return ""
    parts = [n.split(".") for n in names]
    common: list[str] = []
    for pieces in zip(*parts, strict=False):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    common = common[: min(len(p) for p in parts) - 1]
    return ".".join(common) + "." if common else ""
