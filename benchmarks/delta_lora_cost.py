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

Times are the process's CPU time (torch on one thread by default). Writes
``benchmarks/results/delta_lora_cost.json`` (with the commit, device and library versions) and the
table of ``docs/concepts/delta_lora.md`` between its ``delta-lora-cost`` markers.

Run: ``python -m benchmarks.delta_lora_cost [--reps 10] [--steps 2] [--threads 1]``;
``--render`` only rewrites the table from the JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import TARGET, Runner, load_base, make_batch, time_interleaved
from benchmarks.page_table import publish, write_between
from benchmarks.provenance import code_since, commit_phrase, provenance

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "delta_lora_cost.json"
PAGE = ROOT / "docs" / "concepts" / "delta_lora.md"
CLOCK = time.process_time


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULT, help="write the results as JSON here")
    parser.add_argument("--render", action="store_true", help="only rewrite the docs table")
    args = parser.parse_args(argv)
    if args.render:
        result = json.loads(args.out.read_text())
        render(result)
        return result
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
                t0 = CLOCK()
                s.before_optimizer_step(None, la, step)
                if s.mode == "inplace":
                    hook_times.append(CLOCK() - t0)

            def after(step: int, s=schedule, la=layers) -> None:
                t0 = CLOCK()
                s.after_optimizer_step(None, la, step)
                if s.mode == "inplace":
                    hook_times[-1] += CLOCK() - t0

        model.train()
        runners.append(Runner(name, model, training_step_fn(model, batch, before, after)))

    times = time_interleaved(runners, args.reps, args.steps, clock=CLOCK)
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
        "steps": args.steps,
        "clock": "process CPU time",
        **provenance(f"CPU, torch threads {args.threads}"),
    }
    print(table(result))
    publish(result, args.out, RESULT, render)
    return result


def table(r: dict) -> str:
    """The page's table: the cost of each form per step, against plain LoRA."""
    return "\n".join(
        [
            f"MiniLM, LoRA r=8 on {r['layers']} layers, batch 16 x 64, {r['threads']} CPU "
            f"thread(s), {r.get('clock', 'wall time')}, median of {r['reps']} interleaved rounds of {r.get('steps', '?')} "
            f"steps ({commit_phrase(r)}, torch {r.get('versions', {}).get('torch', '?')}). "
            + code_since(r.get("commit")),
            "",
            "| | per step |",
            "|---|---|",
            f"| plain LoRA training step | {r['lora_step_ms']:.0f} ms |",
            f"| in-place: snapshot + base update hooks | {r['inplace_hooks_ms']:.1f} ms = "
            f"{r['inplace_hooks_fraction']:.1%} of a LoRA step |",
            f"| in-place: whole step vs LoRA | {r['inplace_overhead']:+.1%} |",
            f"| implicit: whole step vs LoRA | {r['implicit_overhead']:+.1%} |",
        ]
    )


def render(result: dict) -> None:
    generator = "python -m benchmarks.delta_lora_cost (benchmarks/results/delta_lora_cost.json)"
    write_between(PAGE, "delta-lora-cost", generator, table(result))


if __name__ == "__main__":
    main()
