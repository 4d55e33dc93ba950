"""The tables of the "Choosing a method" page, computed from the benchmark and study result files.

``docs/choosing-a-method.md`` holds the prose and one marker per table (``<!-- table: NAME -->``);
the docs build hook (``mkdocs_hooks.py``) replaces each marker with ``tables()[NAME]``, so the page
always shows the numbers in ``benchmarks/results/`` and nothing is typed in by hand. Standard
library only: the docs build needs neither torch nor matplotlib for it.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
MARKER = re.compile(r"<!-- table: ([a-z-]+) -->")


def _load(results: Path, name: str) -> dict[str, Any]:
    path = results / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the benchmark that writes it")
    return json.loads(path.read_text())


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join([_row(head), _row(["---"] * len(head)), *(_row(r) for r in rows)])


def cost_table(speed: dict[str, Any]) -> str:
    """Trainable parameters, step time, training memory and inference cost, one row per method."""
    training = speed["training"]["methods"]
    memory = speed["memory"]["methods"]
    inference = speed["inference"]["methods"]
    rows = []
    for method, t in training.items():
        ours = t["ours"]
        mem = memory.get(method, {}).get("ours_mib")
        inf = inference.get(method, {})
        rows.append(
            [
                method,
                f"{ours['trainable']:,}",
                f"{ours['ratio']:.2f}",
                "-" if mem is None else f"{mem:.0f}",
                f"{inf['unmerged']['ratio']:.2f}" if "unmerged" in inf else "-",
                f"{inf['merged']['ratio']:.2f}" if "merged" in inf else "-",
            ]
        )
    return _table(
        [
            "method",
            "trainable parameters",
            "training step / frozen floor",
            "peak training memory (MiB)",
            "inference unmerged / base",
            "inference merged / base",
        ],
        rows,
    )


def cost_setting(speed: dict[str, Any]) -> str:
    """One sentence on how ``speed.json`` was measured."""
    meta = speed.get("meta", {})
    floor = speed["training"]["floor_seconds"]
    return (
        f"Measured by `python -m benchmarks.speed` ({meta.get('model', 'all-MiniLM-L6-v2')}, "
        f"CPU, one thread; frozen-model floor {floor:.3f} s per step): see "
        "[Benchmarks](benchmarks.md) for the method and the spreads."
    )


def accuracy_rows(study: dict[str, Any]) -> list[list[str]]:
    """Test accuracy per configuration, at its best learning rate when the study tried several.

    Training time is left out: the studies ran their configurations on different devices; the
    cost table measures every method on one.

    The best learning rate is the one with the highest mean *validation* accuracy over seeds, so
    the test numbers are not used to pick it.
    """
    by_config: dict[str, dict[Any, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for run in study["runs"]:
        by_config[run["config"]][run.get("lr", study.get("lr"))].append(run)
    rows = []
    for config, by_lr in by_config.items():
        lr, runs = max(by_lr.items(), key=lambda kv: statistics.mean(r["val_acc"] for r in kv[1]))
        acc = [r["test_acc"] for r in runs]
        adapter = [r["adapter_parameters"] for r in runs if r.get("adapter_parameters")]
        rows.append(
            [
                config,
                f"{statistics.mean(acc):.3f} ({min(acc):.3f}-{max(acc):.3f})",
                str(len(acc)),
                "-" if lr is None else f"{lr:g}",
                f"{runs[0]['trainable']:,}",
                f"{statistics.mean(adapter):,.0f}" if adapter else "-",
            ]
        )
    return rows


def accuracy_table(studies: list[dict[str, Any]]) -> str:
    """The accuracy rows of several studies, the study's name in the first column."""
    head = [
        "study",
        "configuration",
        "test accuracy, mean (min-max)",
        "seeds",
        "lr",
        "trainable parameters",
        "adapter parameters at the end",
    ]
    rows = [[s["study"], *row] for s in studies for row in accuracy_rows(s)]
    return _table(head, rows)


def accuracy_setting(studies: list[dict[str, Any]]) -> str:
    """One sentence per study on its data and length."""
    parts = [
        f"*{s['study']}*: {s['data']}, {s['steps']} steps of batch {s['batch_size']}, "
        f"on {s.get('device', '?')}"
        for s in studies
    ]
    return "; ".join(parts) + "."


def tables(results: Path = RESULTS) -> dict[str, str]:
    """Every table of the page, by marker name."""
    speed = _load(results, "speed")
    studies = [_load(results, n) for n in ("study_methods", "study_loraplus", "study_singlora")]
    return {
        "cost": cost_table(speed),
        "cost-setting": cost_setting(speed),
        "accuracy": accuracy_table(studies),
        "accuracy-setting": accuracy_setting(studies),
    }


def fill(markdown: str, results: Path = RESULTS) -> str:
    """``markdown`` with each ``<!-- table: NAME -->`` marker replaced by its table.

    Raises:
        KeyError: a marker names no table (the message lists the known ones).
    """
    found = tables(results)

    def sub(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in found:
            raise KeyError(f"no table {name!r}; the tables are {sorted(found)}")
        return found[name]

    return MARKER.sub(sub, markdown)
