"""Peak training memory of one variant, measured in a fresh process.

``python -m benchmarks.memory <variant>`` prints one JSON line. ``<variant>`` is ``floor``,
``<Method>:ours`` or ``<Method>:peft``. ``python -m benchmarks.memory --all --jobs 3`` measures every
variant (each still in its own process, ``jobs`` of them at a time: a process's RSS is its own)
and writes the memory table of ``benchmarks/results/speed.json`` and ``speed.md`` anew;
``--from FILE`` takes the JSON lines of earlier single-variant runs instead of measuring.

Method: the model is loaded and copied (every variant, the floor too, trains a deep copy whose
weights are resident before the baseline is read), the adapter built and the original freed;
then the resident set size (RSS) is read and the kernel's peak-RSS counter is reset
(``/proc/self/clear_refs``); three training steps run (forward, backward, AdamW step: activations,
gradients and optimizer state); the result is the peak RSS during those steps minus the RSS before
them. Each variant runs in its own process so that one variant's freed memory cannot hide
another's peak, several times in a shuffled order (``measure_all``). Linux only.

Why every variant trains a copy: the loaded weights are memory-mapped from the safetensors file
and become resident only when first read. A variant that trains the loaded model itself (the
floor did, before) pages its ~85 MiB of weights in during the measured steps and reads that much
higher: that is how the floor once read above LoRA. A copy reads every weight before the
baseline, so the same bytes are outside every variant's reading.

Cross-check, independent of the allocator: the bytes autograd saves for backward during one
forward (``benchmarks.tensor_bytes.saved_tensor_bytes``, distinct storages, frozen weights
excluded) and the gradients and optimizer state counted from the tensors.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

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


def build_variant(variant: str, batch: dict) -> object:
    """The runner of ``variant`` on a deep copy of the loaded model (see the module docstring)."""
    from benchmarks.common import Runner, floor_step_fn, fresh_copy, load_base
    from benchmarks.methods import ENTRIES, build_ours, build_peft

    base = load_base()
    model = fresh_copy(base)
    del base  # the mapped file pages go with it
    if variant == "floor":
        return Runner("floor", model, floor_step_fn(model, batch))
    name, lib = variant.split(":")
    entry = next(e for e in ENTRIES if e.name == name)
    build = build_ours if lib == "ours" else build_peft
    return build(entry, model, batch)


def cross_check(runner: object, batch: dict) -> dict[str, float]:
    """Saved-for-backward bytes of one forward, and gradient and optimizer-state bytes, in MiB."""
    from benchmarks.common import loss_of
    from benchmarks.tensor_bytes import saved_tensor_bytes

    model = runner.model  # type: ignore[attr-defined]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    saved = saved_tensor_bytes(lambda: loss_of(model, batch), exclude=frozen)
    grads = sum(
        p.numel() * p.element_size() for p in model.parameters() if p.requires_grad
    )  # a gradient per trainable tensor during backward
    mib = 2**20
    return {
        "saved_mib": saved / mib,
        "grads_mib": grads / mib,
        "adamw_state_mib": 2 * grads / mib,  # exp_avg and exp_avg_sq
    }


def peak_rss_increase(step: Callable[[], object], steps: int = 3) -> tuple[float, float]:
    """``(rss_before_mib, peak_increase_mib)``: this process's RSS once freed memory is handed
    back, and how far its peak RSS rises above it over ``steps`` calls of ``step`` (the kernel's
    VmHWM counter, reset through ``/proc/self/clear_refs``; Linux only)."""
    _settle()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (the peak RSS) to the current RSS
    for _ in range(steps):
        step()
    return before / 1024, (_status_kib("VmHWM") - before) / 1024


def reading_in_subprocess(module: str, args: list[str], label: str) -> dict[str, Any] | None:
    """The JSON line ``python -m module ARGS`` prints last, run in a fresh process with this
    checkout on its path; ``None`` (and the end of its stderr printed) when it fails."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        print(f"  {label}: memory run failed\n{proc.stderr[-2000:]}", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(variant: str, steps: int = 3) -> dict[str, float]:
    from benchmarks.common import make_batch

    torch.set_num_threads(1)
    batch = make_batch()
    runner = build_variant(variant, batch)
    before, peak = peak_rss_increase(runner.step, steps)  # type: ignore[attr-defined]
    return {
        "variant": variant,
        "peak_mib": peak,
        "rss_before_mib": before,
        **cross_check(runner, batch),
    }


def measure_all(
    variants: list[str],
    repeats: int,
    log: Callable[[str], object] = print,
    seed: int = 0,
    run_one: Callable[[str], dict[str, Any] | None] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """``repeats`` readings of every variant, each in a fresh process, in rounds whose order is
    shuffled anew (so no variant always follows the same one). ``run_one(variant)`` takes one
    reading (a dict with ``peak_mib``) or returns ``None`` when the process failed; by default
    it runs ``python -m benchmarks.memory VARIANT``."""
    from benchmarks.common import round_order

    out: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for rep in range(repeats):
        for v in round_order(variants, rep, seed):
            result = (run_one or _run_variant)(v)
            if result is not None:
                out[v].append(result)
                log(f"  {v} (reading {rep + 1}/{repeats}): {result['peak_mib']:.0f} MiB")
    return {v: rs for v, rs in out.items() if rs}


def variants() -> list[str]:
    from benchmarks.methods import ENTRIES

    out = ["floor"]
    for e in ENTRIES:
        if e.available() is None:
            out.append(f"{e.name}:ours")
            if e.peft is not None:
                out.append(f"{e.name}:peft")
    return out


def _run_variant(variant: str) -> dict[str, Any] | None:
    return reading_in_subprocess("benchmarks.memory", [variant], variant)


def _reading(readings: list[dict[str, float]] | None, key: str = "peak_mib") -> dict | None:
    if not readings:
        return None
    values = [r[key] for r in readings]
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "all": values,
    }


def peak_summary(readings: list[dict[str, Any]]) -> dict[str, Any]:
    """The peak-RSS readings of one variant as the causal-LM and QLoRA result files store them:
    median, range and every reading, with the bytes saved for backward (the same in every
    reading: a count, not a measurement)."""
    peaks = [r["peak_mib"] for r in readings]
    return {
        "median_mib": statistics.median(peaks),
        "min_mib": min(peaks),
        "max_mib": max(peaks),
        "readings_mib": peaks,
        "saved_mib": readings[0].get("saved_mib"),
    }


def _detail(readings: list[dict[str, float]]) -> dict:
    """The RSS readings and the tensor counts (the same in every reading) of one variant."""
    counts = ("saved_mib", "grads_mib", "adamw_state_mib")
    return {"rss": _reading(readings), **{k: readings[0][k] for k in counts if k in readings[0]}}


def memory_block(raw: dict[str, list[dict[str, float]]]) -> dict:
    """The ``memory`` entry of ``speed.json`` from ``{variant: [readings of measure()]}``."""
    from benchmarks.methods import ENTRIES

    floor = raw.get("floor")
    out: dict = {
        "how": "peak RSS increase during 3 training steps over the RSS after building the model "
        "(every variant on a deep copy whose weights are resident before the baseline), in fresh "
        "processes, several readings per variant in a shuffled order (Linux VmHWM reset through "
        "/proc/self/clear_refs); cross-checked by the bytes autograd saves for backward "
        "(saved_tensors_hooks, distinct storages, frozen weights excluded)",
        "floor_mib": _reading(floor)["median"] if floor else None,
        "floor": _detail(floor) if floor else None,
        "methods": {},
    }
    for e in ENTRIES:
        ours = raw.get(f"{e.name}:ours")
        if not ours:
            continue
        row: dict = {"ours_mib": _reading(ours)["median"], "ours": _detail(ours)}
        peft = raw.get(f"{e.name}:peft")
        if e.peft is not None and peft:
            row["peft_mib"] = _reading(peft)["median"]
            row["peft"] = _detail(peft)
        out["methods"][e.name] = row
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", nargs="?", help="floor, <Method>:ours or <Method>:peft")
    parser.add_argument("--all", action="store_true", help="every variant; update speed.json")
    parser.add_argument("--jobs", type=int, default=1, help="variants measured at a time")
    parser.add_argument("--repeats", type=int, default=3, help="readings per variant")
    parser.add_argument("--from", dest="source", type=Path, help="JSON lines of earlier runs")
    args = parser.parse_args(argv)
    if not args.all:
        print(json.dumps(measure(args.variant)))
        return
    if args.source is not None:
        lines = [json.loads(line) for line in args.source.read_text().splitlines() if line.strip()]
        raw: dict[str, list[dict[str, float]]] = {}
        for r in lines:
            raw.setdefault(r["variant"], []).append(r)
    else:
        todo = [v for _ in range(args.repeats) for v in variants()]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            results = list(pool.map(_run_variant, todo))
        raw = {}
        for r in results:
            if r is not None:
                raw.setdefault(r["variant"], []).append(r)
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
