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
#: what the benchmarks write, which a run never reads: their result files and the pages and plots
#: they render (``make bench`` renders one script's table before the next script runs)
OUTPUTS = (RESULTS, "docs")


#: the library's own code, whose changes since a result's commit the pages point out
LIBRARY = "lightning_lowrank"


def _git(root: Path, *args: str) -> str | None:
    """``git ARGS``'s output in ``root``, or ``None`` when git fails (no checkout, a bad
    revision)."""
    try:
        out = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_commit(root: Path = ROOT) -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the checkout at ``root``.

    ``dirty`` is ``True`` when tracked files other than the benchmarks' outputs (``OUTPUTS``:
    the result files and the documentation they render into) differ from the commit (the result
    may not be reproducible from the commit alone). Outside a git checkout both are ``None``.
    """
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    # the outputs are what runs write, not what they run: a resumed study's own result file,
    # changed by its first runs, or a page rendered by the script before, does not make the
    # later ones "dirty"
    excluded = [f":(exclude){path}" for path in OUTPUTS]
    status = _git(root, "status", "--porcelain", "--untracked-files=no", "--", ".", *excluded)
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
    note = runs_code_note([r["commit"] for r in records if r.get("commit")])
    text = "; ".join(parts) + "." if parts else ""
    return " ".join(x for x in (text, note) if x)


def library_changes(commit: str | None, root: Path = ROOT) -> list[str] | None:
    """The commits after ``commit`` up to ``root``'s HEAD that change the library's code
    (``lightning_lowrank/``), oldest first, as 10-character hashes.

    ``None`` when git cannot tell: no commit given, no checkout, or ``commit`` not an ancestor
    of HEAD (say, a commit rewritten since the run).
    """
    if not commit or _git(root, "merge-base", "--is-ancestor", commit, "HEAD") is None:
        return None
    out = _git(root, "rev-list", "--reverse", f"{commit}..HEAD", "--", LIBRARY)
    return None if out is None else [line[:10] for line in out.splitlines()]


def code_since(commit: str | None, root: Path = ROOT, shown: int = 4) -> str:
    """One sentence on whether the library's code changed between a result's ``commit`` and
    the checkout the page is rendered from (its HEAD), naming up to ``shown`` of the commits
    that changed it; empty when there is no commit or no checkout to ask."""
    head = _git(root, "rev-parse", "HEAD")
    if not commit or head is None:
        return ""
    changes = library_changes(commit, root)
    if changes is None:
        return (
            f"Commit `{commit[:10]}` is not in the history of `{head[:10]}`, the commit this "
            "page was rendered from (a commit rewritten or never merged), so whether the library's "
            "code changed since cannot be told."
        )
    at = f"`{head[:10]}`, the commit this page was rendered from"
    if not changes:
        return f"The library's code (`{LIBRARY}/`) is the same at {at}."
    return (
        f"Since then the library's code (`{LIBRARY}/`) has changed in {_named(changes, shown)} "
        f"up to {at}: these numbers describe the code as it was at the run's commit."
    )


def _named(changes: list[str], shown: int = 4) -> str:
    """``3 commits (`a`, `b`, `c`)``, naming at most ``shown`` of them."""
    n = len(changes)
    named = ", ".join(f"`{c}`" for c in changes[:shown])
    more = f" and {n - shown} more" if n > shown else ""
    return f"{n} commit{'s' * (n > 1)} ({named}{more})"


def runs_code_note(commits: list[str], root: Path = ROOT) -> str:
    """:func:`code_since` for a set of runs made from several ``commits``: measured from the
    newest of them, plus a sentence when the library's code differs between the oldest and the
    newest (runs compared with each other then ran different code)."""
    known = {c: library_changes(c, root) for c in set(commits)}
    if not known or any(v is None for v in known.values()):
        return code_since(commits[0], root) if len(set(commits)) == 1 else ""
    # every commit is an ancestor of HEAD: the more commits lead to one, the newer it is
    depth = {c: int(_git(root, "rev-list", "--count", c) or 0) for c in known}
    order = sorted(known, key=lambda c: (depth[c], c))
    oldest, newest = order[0], order[-1]
    note = code_since(newest, root)
    later = set(known[newest] or ())  # never None here: checked above
    between = [c for c in known[oldest] or () if c not in later]
    if between:
        note += (
            " The runs did not all run the same library code: "
            f"{_named(between)} changed it between the runs' oldest commit `{oldest[:10]}` and "
            f"`{newest[:10]}`."
        )
    return note
