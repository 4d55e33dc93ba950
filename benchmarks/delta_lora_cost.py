"""Delta-LoRA's cost per optimizer step, as a fraction of a MiniLM LoRA training step.

One process, the setting of ``benchmarks.common`` (MiniLM, 36 adapted layers, LoRA r=8, a batch of
16 x 64 tokens, AdamW, CPU). Three variants run in interleaved rounds:

- ``lora``: plain LoRA;
- ``inplace``: LoRA plus ``DeltaLoRA(mode="inplace")`` driving the base updates (snapshot of the
  factors before the step, one rank-16 ``addmm_`` per layer after it); its hooks are also timed on
  their own;
- ``implicit``: LoRA plus ``DeltaLoRA(mode="implicit")`` (the extra low-rank term in every forward).

Delta-LoRA is active from the first step (``start_step=0``). Each variant's overhead is the median
over rounds of its step time over the LoRA step time of the same round, minus one.

Run: ``python -m benchmarks.delta_lora_cost [--reps 10] [--steps 2] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import TARGET, Runner, load_base, make_batch, time_interleaved


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from benchmarks.common import training_step_fn
    from lightning_lowrank import DeltaLoRA, LoRA, adapter_layers, inject

    batch = make_batch()
    base = load_base()
    hook_times: list[float] = []
    runners = []
    for name in ("lora", "inplace", "implicit"):
        torch.manual_seed(0)
        model = load_base() if runners else base
        inject(model, LoRA(rank=8, alpha=16), target_modules=TARGET)
        layers = adapter_layers(model)
        before = after = None
        if name != "lora":
            schedule = DeltaLoRA(scale=2.0, start_step=0, mode=name)
            schedule.setup(model, layers, None)

            def before(step: int, s=schedule, la=layers) -> None:
                t0 = time.perf_counter()
                s.before_optimizer_step(None, la, step)
                if s.mode == "inplace":
                    hook_times.append(time.perf_counter() - t0)

            def after(step: int, s=schedule, la=layers) -> None:
                t0 = time.perf_counter()
                s.after_optimizer_step(None, la, step)
                if s.mode == "inplace":
                    hook_times[-1] += time.perf_counter() - t0

        model.train()
        runners.append(Runner(name, model, training_step_fn(model, batch, before, after)))

    times = time_interleaved(runners, args.reps, args.steps)
    lora = times["lora"]
    ratio = {
        n: statistics.median(t / ref for t, ref in zip(times[n], lora, strict=True))
        for n in ("inplace", "implicit")
    }
    step_s = statistics.median(lora)
    hooks_s = statistics.median(hook_times[1:])  # the first call also records dW_K
    result = {
        "lora_step_ms": 1000 * step_s,
        "inplace_step_ms": 1000 * statistics.median(times["inplace"]),
        "implicit_step_ms": 1000 * statistics.median(times["implicit"]),
        "inplace_hooks_ms": 1000 * hooks_s,
        "inplace_hooks_fraction": hooks_s / step_s,
        "inplace_overhead": ratio["inplace"] - 1,
        "implicit_overhead": ratio["implicit"] - 1,
        "layers": len(adapter_layers(runners[0].model)),
        "threads": args.threads,
        "reps": args.reps,
    }
    print(
        f"MiniLM, LoRA r=8 on {result['layers']} layers, batch 16x64, {args.threads} thread(s), "
        f"median of {args.reps} rounds x {args.steps} steps:"
    )
    print(f"  LoRA training step {result['lora_step_ms']:.0f} ms")
    print(
        f"  in-place: hooks {result['inplace_hooks_ms']:.2f} ms = "
        f"{result['inplace_hooks_fraction']:.1%} of a step; whole step "
        f"{result['inplace_overhead']:+.1%} vs LoRA"
    )
    print(f"  implicit: whole step {result['implicit_overhead']:+.1%} vs LoRA")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
