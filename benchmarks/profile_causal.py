"""Where the time of a causal-LM training step goes: the floor against LoRA, by phase and by kind
of operation (SmolLM2-135M, CPU, one thread).

    python -m benchmarks.profile_causal [--variants floor LoRA:ours LoRA:peft] [--steps 3]
    python -m benchmarks.profile_causal --tiny     # a tiny random Llama: a smoke run

For each variant (built as in ``benchmarks.causal_lm``, on the same batch, all in one process, in
interleaved rounds shuffled anew each round): the process CPU time of the forward (with the
causal-LM loss), the backward and the optimizer step (AdamW step and zero_grad; the floor has
none), median over ``--steps`` rounds after two untimed steps; then ``--profiled`` rounds under
``torch.profiler``, whose operators' own CPU time is summed by kind (median over those rounds):

- ``rank-r products``: matrix products with an operand of the adapter's rank (8) as a dimension;
- ``full-width products``: every other matrix product (the frozen layers, attention, the head);
- ``elementwise``: additions, multiplications, copies, activations, normalisation pieces;
- ``other``: everything else (attention kernels, the loss, indexing, allocation).

Writes ``benchmarks/results/causal_profile.json`` (``--tiny``: under ``results/quick/``);
``python -m benchmarks.render`` adds it to the Benchmarks page, after the causal-LM tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import causal_lm
from benchmarks.provenance import code_since, commit_phrase

RANK = 8  # the rank of every method in benchmarks.methods
PHASES = ("forward", "backward", "optimizer")
PRODUCTS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"}
ELEMENTWISE = (
    "add",
    "sub",
    "mul",
    "div",
    "copy_",
    "silu",
    "neg",
    "pow",
    "rsqrt",
    "mean",
    "sum",
    "addcmul",
    "addcdiv",
    "sqrt",
    "lerp",
    "fill_",
    "zero_",
    "cat",
    "clone",
    "contiguous",
)


def kind(name: str, shapes: list[list[int]]) -> str:
    """The kind of work an operator does (see the description of ``benchmarks.profile_causal``)."""
    if name in PRODUCTS:
        return "rank-r products" if any(RANK in s for s in shapes) else "full-width products"
    base = name.removeprefix("aten::").rstrip("_")
    if name.startswith("aten::") and any(base == e.rstrip("_") for e in ELEMENTWISE):
        return "elementwise"
    return "other"


def _phased_step(variant: str, model: torch.nn.Module, batch: dict) -> Any:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if variant != "floor" and params else None
    clock = time.process_time

    def step() -> dict[str, float]:
        t0 = clock()
        loss = model(**batch).loss
        t1 = clock()
        loss.backward()
        t2 = clock()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        t3 = clock()
        return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2}

    return step


def _kinds(prof: Any, others: dict[str, float], weight: float) -> dict[str, float]:
    kinds: dict[str, float] = {}
    for event in prof.key_averages(group_by_input_shape=True):
        shapes = [list(s) for s in (event.input_shapes or []) if isinstance(s, list | tuple)]
        k = kind(event.key, shapes)
        seconds = event.self_cpu_time_total / 1e6
        kinds[k] = kinds.get(k, 0.0) + seconds
        if k == "other":
            others[event.key] = others.get(event.key, 0.0) + seconds * weight
    return kinds


def measure(
    variants: list[str], base: torch.nn.Module, batch: dict, steps: int, profiled: int = 3
) -> dict[str, dict[str, Any]]:
    """Every variant's phases and kinds, in interleaved rounds (each round runs every variant
    once, in an order shuffled anew each round), so a slow phase of a shared machine touches
    them alike: ``steps`` timed rounds, then ``profiled`` profiled ones."""
    from benchmarks.common import round_order

    stepper = {}
    for v in variants:
        runner = causal_lm.build(v, base, batch, checkpointing=False)
        stepper[v] = _phased_step(v, runner.model, batch)
        for _ in range(2):  # warm-up
            stepper[v]()
    phases: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    for rep in range(steps):
        for v in round_order(variants, rep):
            phases[v].append(stepper[v]())
    per_step: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    others: dict[str, dict[str, float]] = {v: {} for v in variants}
    for rep in range(profiled):
        for v in round_order(variants, steps + rep):
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                stepper[v]()
            per_step[v].append(_kinds(prof, others[v], 1 / profiled))
    out: dict[str, dict[str, Any]] = {}
    for v in variants:
        med = {k: statistics.median(p[k] for p in phases[v]) for k in PHASES}
        names = sorted({k for d in per_step[v] for k in d})
        out[v] = {
            "phases_s": med,
            "step_s": sum(med.values()),
            # the median per kind resists one slow step
            "profiled_s": {k: statistics.median(d.get(k, 0.0) for d in per_step[v]) for k in names},
            # what "other" holds, largest first: the page can name it
            "other_top_s": dict(sorted(others[v].items(), key=lambda kv: -kv[1])[:8]),
        }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["floor", "LoRA:ours", "LoRA:peft"])
    parser.add_argument("--steps", type=int, default=5, help="timed rounds")
    parser.add_argument("--profiled", type=int, default=3, help="profiled steps per variant")
    parser.add_argument("--batch", type=int, default=causal_lm.BATCH)
    parser.add_argument("--seq", type=int, default=causal_lm.SEQ)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    if args.tiny:
        args.batch, args.seq, args.steps, args.profiled = 2, 16, 1, 1
    started = time.perf_counter()
    base, batch = causal_lm.one_thread_setup(args.tiny, args.batch, args.seq)
    res: dict[str, Any] = {
        "meta": {
            **causal_lm.script_meta("profile_causal", argv, args.tiny, args.batch, args.seq),
            "steps": args.steps,
            "profiled_steps": args.profiled,
            "rank": RANK,
            "clock": "process CPU time, torch on 1 thread; kinds: operators' own CPU time "
            "(torch.profiler) in one step",
        },
        "variants": {},
    }
    res["variants"] = measure(args.variants, base, batch, args.steps, args.profiled)
    for v, d in res["variants"].items():
        print(v, json.dumps(d), flush=True)
    res["meta"]["wall_seconds"] = round(time.perf_counter() - started, 1)
    causal_lm.write_result(res, "causal_profile", args.tiny)
    return res


def estimated_kinds(d: dict[str, Any]) -> dict[str, float]:
    """Seconds of an unprofiled step by kind: each kind's share of the profiled operator time
    times the measured step time (the profiler's own overhead then cancels, if it is spread
    alike over the operators)."""
    total = sum(d["profiled_s"].values()) or 1.0
    return {k: d["step_s"] * v / total for k, v in d["profiled_s"].items()}


def markdown_section(res: dict[str, Any]) -> list[str]:
    """The page's section: each variant's time by phase and by kind, and its extra time over
    the floor split the same ways."""
    meta, vs = res["meta"], res["variants"]
    if "floor" not in vs:
        return []
    kinds = ["full-width products", "rank-r products", "elementwise", "other"]
    lines = [
        "### Where the time goes",
        "",
        f"`python -m benchmarks.profile_causal` ({meta['model']}, batch {meta['batch']} x "
        f"{meta['seq_len']}, no checkpointing, {commit_phrase(meta)}"
        f", {meta['date']}): seconds per step by phase (median of {meta['steps']} interleaved rounds, process "
        "CPU time), and the step split by kind of operator: matrix products with a "
        f"rank-{meta['rank']} operand, other matrix products, elementwise operations and the "
        "rest, each its share of the operators' own CPU time under `torch.profiler` (median "
        f"over {meta.get('profiled_steps', 1)} profiled steps) times the measured step. The "
        "difference rows are a variant minus the floor. A single run on a shared machine: "
        "differences of a few hundredths of a second are noise. " + code_since(meta.get("commit")),
        "",
        "| variant | forward | backward | optimizer | step | " + " | ".join(kinds) + " |",
        "|---|---|---|---|---|" + "---|" * len(kinds),
    ]
    est = {name: estimated_kinds(d) for name, d in vs.items()}

    def row(label: str, name: str, minus: str | None = None) -> str:
        d, m = vs[name], vs[minus] if minus else None

        def fmt(x: float) -> str:
            return f"{x:+.2f}" if minus else f"{x:.2f}"

        phases = [d["phases_s"][k] - (m["phases_s"][k] if m else 0.0) for k in PHASES]
        step = d["step_s"] - (m["step_s"] if m else 0.0)
        parts = [est[name].get(k, 0.0) - (est[minus].get(k, 0.0) if minus else 0.0) for k in kinds]
        return f"| {label} | " + " | ".join(fmt(x) for x in [*phases, step, *parts]) + " |"

    for name in vs:
        lines.append(row(name, name))
    for name in vs:
        if name != "floor":
            lines.append(row(f"{name} - floor", name, "floor"))
    return [*lines, ""]


if __name__ == "__main__":
    main()
