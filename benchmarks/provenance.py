"""What a result was measured with: the commit, the device and the library versions.

Every study record and every benchmark result file stores :func:`provenance`; the renderers
refuse to compare results from different devices and say when a file predates these fields.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: where the benchmarks write their results, relative to ROOT
RESULTS = "benchmarks/results"


def git_commit(root: Path = ROOT) -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the checkout at ``root``.

    ``dirty`` is ``True`` when tracked files other than the result files
    (``benchmarks/results/``) differ from the commit (the result may not be reproducible from
    the commit alone). Outside a git checkout both are ``None``.
    """

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=30
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    # the result files are what runs write, not what they run: a resumed study's own result
    # file, changed by its first runs, does not make the later ones "dirty"
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", f":(exclude){RESULTS}")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def versions() -> dict[str, str | None]:
    """The versions of the libraries a result depends on (``None`` for one not installed)."""
    import importlib.metadata as md

    out: dict[str, str | None] = {}
    for name in ("torch", "lightning", "transformers", "peft"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    return out


def cpu_device(threads: int = 1) -> str:
    """This machine's CPU as the result files name it, say ``CPU (x86_64, 2 CPUs), torch threads
    1``."""
    return f"CPU ({platform.machine()}, {os.cpu_count()} CPUs), torch threads {threads}"


def command_line(module: str, argv: list[str] | None) -> str:
    """``python -m module ARGS`` (``argv``, or this process's own arguments when ``None``) as it
    would be typed in a shell: an argument with spaces, say ``--only 'config=LoRA r=2'``, is
    quoted."""
    return f"python -m {module} " + shlex.join(sys.argv[1:] if argv is None else argv)


def provenance(device: str) -> dict[str, Any]:
    """``{"commit", "dirty", "device", "versions"}`` for a result measured on ``device``."""
    return {**git_commit(), "device": device, "versions": versions()}


def commit_phrase(result: dict[str, Any]) -> str:
    """``commit `abcdef1234``` (plus " with uncommitted changes" when the checkout was dirty) for
    a result holding ``provenance``'s fields."""
    dirty = " with uncommitted changes" if result.get("dirty") else ""
    return f"commit `{(result.get('commit') or 'unknown')[:10]}`{dirty}"


def describe(records: list[dict[str, Any]]) -> str:
    """One sentence on what ``records`` were measured with, from their own fields."""
    commits = sorted({r["commit"][:10] for r in records if r.get("commit")})
    missing = sum(1 for r in records if not r.get("commit"))
    dirty = sum(1 for r in records if r.get("dirty"))
    parts = []
    if commits:
        parts.append(f"commit{'s' if len(commits) > 1 else ''} {', '.join(commits)}")
        if dirty:
            parts.append(f"{dirty} of {len(records)} from a checkout with uncommitted changes")
    if missing:
        parts.append(
            f"{missing} of {len(records)} records store no commit: they predate the method "
            "below and may describe older code"
        )
    vers = sorted(
        {
            ", ".join(f"{k} {v}" for k, v in r["versions"].items() if v)
            for r in records
            if r.get("versions")
        }
    )
    if vers:
        parts.append("versions: " + "; ".join(vers))
    return "; ".join(parts) + "." if parts else ""
