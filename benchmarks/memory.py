"""Peak training memory of one variant, measured in a fresh process.

``python -m benchmarks.memory <variant>`` prints one JSON line. ``<variant>`` is ``floor``,
``<Method>:ours`` or ``<Method>:peft``. ``python -m benchmarks.memory --all --jobs 3`` measures every
variant (each still in its own process, ``jobs`` of them at a time: a process's RSS is its own)
and writes the memory table of ``benchmarks/results/speed.json`` and ``speed.md`` anew;
``--from FILE`` takes the JSON lines of earlier single-variant runs instead of measuring.

Method: the model is loaded and the adapter built; then the resident set size (RSS) is read and the
kernel's peak-RSS counter is reset (``/proc/self/clear_refs``); three training steps run (forward,
backward, AdamW step: activations, gradients and optimizer state); the result is the peak RSS
during those steps minus the RSS before them. Each variant runs in its own process so that one
variant's freed memory cannot hide another's peak. Linux only.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _settle() -> None:
    gc.collect()
    try:  # hand freed heap pages back to the kernel, so the baseline RSS is what is live
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def measure(variant: str, steps: int = 3) -> dict[str, float]:
    from benchmarks.common import Runner, floor_step_fn, fresh_copy, load_base, make_batch
    from benchmarks.methods import ENTRIES, build_ours, build_peft

    torch.set_num_threads(1)
    base = load_base()
    batch = make_batch()
    if variant == "floor":
        runner = Runner("floor", base, floor_step_fn(base, batch))
    else:
        name, lib = variant.split(":")
        entry = next(e for e in ENTRIES if e.name == name)
        build = build_ours if lib == "ours" else build_peft
        runner = build(entry, fresh_copy(base), batch)
        del base
    _settle()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (the peak RSS) to the current RSS
    for _ in range(steps):
        runner.step()
    peak = _status_kib("VmHWM")
    return {"variant": variant, "peak_mib": (peak - before) / 1024, "rss_before_mib": before / 1024}


def variants() -> list[str]:
    from benchmarks.methods import ENTRIES

    out = ["floor"]
    for e in ENTRIES:
        if e.available() is None:
            out.append(f"{e.name}:ours")
            if e.peft is not None:
                out.append(f"{e.name}:peft")
    return out


def _run_variant(variant: str) -> dict[str, float] | None:
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", variant],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        print(f"{variant}: failed\n{proc.stderr[-2000:]}", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_block(raw: dict[str, float]) -> dict:
    """The ``memory`` entry of ``speed.json`` from ``{variant: peak MiB}``."""
    from benchmarks.methods import ENTRIES

    out: dict = {
        "how": "peak RSS increase during 3 training steps over the RSS after building the model, "
        "in a fresh process per variant (Linux VmHWM reset through /proc/self/clear_refs)",
        "floor_mib": raw.get("floor"),
        "methods": {},
    }
    for e in ENTRIES:
        if f"{e.name}:ours" not in raw:
            continue
        out["methods"][e.name] = {"ours_mib": raw.get(f"{e.name}:ours")}
        if e.peft is not None:
            out["methods"][e.name]["peft_mib"] = raw.get(f"{e.name}:peft")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", nargs="?", help="floor, <Method>:ours or <Method>:peft")
    parser.add_argument("--all", action="store_true", help="every variant; update speed.json")
    parser.add_argument("--jobs", type=int, default=1, help="variants measured at a time")
    parser.add_argument("--from", dest="source", type=Path, help="JSON lines of earlier runs")
    args = parser.parse_args(argv)
    if not args.all:
        print(json.dumps(measure(args.variant)))
        return
    if args.source is not None:
        lines = [json.loads(line) for line in args.source.read_text().splitlines() if line.strip()]
        raw = {r["variant"]: r["peak_mib"] for r in lines}
    else:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            results = list(pool.map(_run_variant, variants()))
        raw = {r["variant"]: r["peak_mib"] for r in results if r is not None}
    from benchmarks.report import markdown_report

    path = Path(__file__).parent / "results" / "speed.json"
    res = json.loads(path.read_text())
    res["memory"] = memory_block(raw)
    res["memory"]["separate_run"] = (
        "measured apart from the timing run, by `python -m benchmarks.memory --all`"
    )
    path.write_text(json.dumps(res, indent=2) + "\n")
    (path.parent / "speed.md").write_text(markdown_report(res) + "\n")
    print(markdown_report(res))


if __name__ == "__main__":
    main()
