"""The Reproduction-study page (``docs/study.md``) and its plots, from ``results/study_*.json``.

Every number and every verdict on the page is computed from the result files by the paired rule of
:mod:`benchmarks.stats` (stated on the page by :func:`common.method_lines`); the page holds no
fixed verdict text. One module per study (``intruders``, ``singlora``, ``loraplus``,
``methods``, ``sltrain``, next to ``benchmarks/study_<name>.py`` that runs it), the shared helpers
in ``common``. Called by ``python -m benchmarks.render``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from benchmarks.render_study.common import ASSETS, DOCS, load, method_lines, rerun
from benchmarks.render_study.intruders import intruder_section
from benchmarks.render_study.loraplus import loraplus_section
from benchmarks.render_study.methods import methods_section
from benchmarks.render_study.singlora import singlora_section
from benchmarks.render_study.sltrain import sltrain_section

SECTIONS: list[tuple[str, Callable[[dict[str, Any]], list[str]]]] = [
    ("intruders", intruder_section),
    ("singlora", singlora_section),
    ("loraplus", loraplus_section),
    ("methods", methods_section),
    ("sltrain", sltrain_section),
]


def render_study(generated_note: str) -> str:
    ASSETS.mkdir(parents=True, exist_ok=True)
    lines = [
        generated_note,
        "# Reproduction study",
        "",
        "Claims from the papers (see [the methods' concept pages](concepts/index.md)) checked at small "
        "scale on the offline model and data, with several seeds. Each section says how it ran, "
        "what it ran with and how to re-run it; every verdict follows the rule below. The whole "
        "study runs with `python -m benchmarks.study --jobs 4` (each run in its own process; "
        "results are merged into `benchmarks/results/study_*.json` as runs finish, and an "
        "interrupted study resumes where it stopped), then `python -m benchmarks.render` "
        "rebuilds this page. It is not part of CI.",
        "",
        *method_lines(),
    ]
    missing = []
    for name, section in SECTIONS:
        study = load(name)
        if study is None or not study["runs"]:
            missing.append(name)
            continue
        lines += section(study) + [""]
    if missing:
        lines += [
            "## Not run",
            "",
            "No results yet, so nothing is claimed, for: "
            + ", ".join(f"`{n}` ({rerun(n)})" for n in missing)
            + ".",
        ]
    page = "\n".join(lines).rstrip() + "\n"
    (DOCS / "study.md").write_text(page)
    return page
