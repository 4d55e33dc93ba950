"""Peak training memory of one variant, measured in a fresh process.

``python -m benchmarks.memory <variant>`` prints one JSON line. ``<variant>`` is ``floor``,
``<Method>:ours`` or ``<Method>:peft``.

Method: the model is loaded and the adapter built; then the resident set size (RSS) is read and the
kernel's peak-RSS counter is reset (``/proc/self/clear_refs``); three training steps run (forward,
backward, AdamW step: activations, gradients and optimizer state); the result is the peak RSS
during those steps minus the RSS before them. Each variant runs in its own process so that one
variant's freed memory cannot hide another's peak. Linux only.
"""

from __future__ import annotations

import ctypes
import gc
import json
import sys

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


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1])))
