"""QLoRA on CPU: this library over a 4-bit NF4 base against PEFT over bitsandbytes' 4-bit base.

    python -m benchmarks.qlora [--rounds 7] [--memory-repeats 3] [--batch 4] [--seq 128]
    python -m benchmarks.qlora --quick       # a smoke run, written to benchmarks/results/quick/
    python -m benchmarks.qlora --render      # only rewrite the docs table from the JSON

SmolLM2-135M (a Llama) as a causal LM, LoRA and DoRA (rank 8, alpha 16, every linear layer but the
tied output head), each library the way its users load a 4-bit model (ours: ``inject(...,
quantize_base=NF4(...))``; PEFT: ``from_pretrained`` with a ``BitsAndBytesConfig``, then
``get_peft_model``): NF4 in blocks of 64 with double quantisation, float32 compute. Measured:

1. base weight bytes: the adapted layers' storage (4-bit codes, absmax, code tables) against the
   same layers in float32;
2. training-step time (forward, backward, AdamW step), CPU time of this process on one thread,
   both libraries' models in ONE process, after ``WARMUP_STEPS`` untimed steps of each, in
   interleaved rounds whose order is shuffled anew each round; the ratio ours / PEFT is taken
   within each round and reported as the mean over rounds with a 95 % t-interval, and a target
   is met only when the interval's upper end is below it;
3. peak training memory: the peak RSS increase over 3 training steps, each variant in
   ``--memory-repeats`` fresh processes in shuffled rounds (``--memory VARIANT`` prints one JSON
   line), as in ``benchmarks.memory``, with the bytes autograd saves for backward as a
   cross-check.

Writes ``benchmarks/results/qlora.json`` (commit, device and versions with the numbers) and the
table in ``docs/how-to/qlora.md`` between its ``qlora-table`` markers.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from benchmarks.provenance import (
    code_since,
    command_line,
    commit_phrase,
    cpu_device,
    provenance,
    versions,
)

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "qlora.json"
QUICK_RESULT = ROOT / "benchmarks" / "results" / "quick" / "qlora.json"
PAGE = ROOT / "docs" / "how-to" / "qlora.md"
METHODS = ("LoRA", "DoRA")
VARIANTS = [f"{m}:{lib}" for m in METHODS for lib in ("ours", "peft")]
RANK, ALPHA = 8, 16.0
CLOCK = time.process_time
#: base weight bytes over float32's, and ours over PEFT's for the step time and the peak memory
TARGETS = {"base_bytes_ratio": 0.3, "step_ours_over_peft": 1.0, "peak_ours_over_peft": 1.0}


def _smollm2_dir() -> Path:
    from lightning_lowrank.demos.models import cache_dir, load_smollm2

    target = cache_dir() / "smollm2-135m-instruct"
    if not (target / "config.json").is_file():
        load_smollm2()  # converts the GGUF file once
    return target


def build(variant: str) -> torch.nn.Module:
    """One model with its adapter, the base in 4-bit NF4."""
    from transformers import AutoModelForCausalLM

    method, lib = variant.split(":")
    path = _smollm2_dir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if lib == "ours":
            from lightning_lowrank import DoRA, LoRA, inject
            from lightning_lowrank.quant import NF4

            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            config = (LoRA if method == "LoRA" else DoRA)(rank=RANK, alpha=ALPHA)
            inject(model, config, quantize_base=NF4(blocksize=64, double_quant=True))
            return model
        from peft import LoraConfig, get_peft_model
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        model = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=quant, device_map="cpu", dtype=torch.float32
        )
        config = LoraConfig(
            r=RANK,
            lora_alpha=ALPHA,
            lora_dropout=0.0,
            target_modules="all-linear",
            use_dora=method == "DoRA",
        )
        return get_peft_model(model, config)


def base_bytes(model: torch.nn.Module) -> dict[str, float]:
    """Bytes of the quantized layers' storage, against the same weights in float32."""
    from lightning_lowrank.quant import quant_format

    stored = dense = 0
    for module in model.modules():
        if quant_format(module) is None:
            continue
        weight = module.weight
        state = weight.quant_state
        stored += weight.numel() * weight.element_size()
        stored += state.absmax.numel() * state.absmax.element_size() + state.code.numel() * 4
        if state.nested:
            stored += state.state2.absmax.numel() * 4 + state.state2.code.numel() * 4
        dense += module.in_features * module.out_features * 4
    return {"quantized_mib": stored / 2**20, "float32_mib": dense / 2**20, "ratio": stored / dense}


class Stepper:
    def __init__(self, model: torch.nn.Module, batch: torch.Tensor) -> None:
        self.model = model.train()
        self.batch = batch
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4)

    def step(self) -> None:
        loss = self.model(input_ids=self.batch, labels=self.batch).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def make_batch(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, 49152, (batch, seq), generator=torch.Generator().manual_seed(0))


def memory(variant: str, batch: int, seq: int, steps: int = 3) -> dict[str, Any]:
    """One reading, meant for a fresh process (``--memory VARIANT``): the peak-RSS increase over
    ``steps`` training steps and the bytes the graph saves for backward (frozen weights, the
    4-bit codes included, left out)."""
    from benchmarks.memory import peak_rss_increase
    from benchmarks.tensor_bytes import saved_tensor_bytes

    torch.set_num_threads(1)
    stepper = Stepper(build(variant), make_batch(batch, seq))
    _, peak = peak_rss_increase(stepper.step, steps)
    frozen = [p for p in stepper.model.parameters() if not p.requires_grad]
    saved = saved_tensor_bytes(
        lambda: stepper.model(input_ids=stepper.batch, labels=stepper.batch).loss, exclude=frozen
    )
    return {"variant": variant, "peak_mib": peak, "saved_mib": saved / 2**20}


def _log(msg: str) -> None:
    print(msg, flush=True)


def run(rounds: int, batch: int, seq: int, memory_repeats: int) -> dict[str, Any]:
    """Time every variant in shuffled interleaved rounds, then read each one's peak memory
    ``memory_repeats`` times in fresh processes; the result file's content."""
    from benchmarks.common import WARMUP_STEPS, Runner, median, time_interleaved
    from benchmarks.memory import measure_all, peak_summary, reading_in_subprocess
    from benchmarks.stats import ratio_block

    torch.set_num_threads(1)
    started = time.perf_counter()
    data = make_batch(batch, seq)
    models = {v: build(v) for v in VARIANTS}
    sizes = {v: base_bytes(m) for v, m in models.items()}
    runners = [Runner(v, m, Stepper(m, data).step) for v, m in models.items()]
    times = time_interleaved(runners, reps=rounds, steps=1, log=_log, clock=CLOCK)
    del runners, models
    readings = measure_all(
        VARIANTS,
        memory_repeats,
        log=_log,
        run_one=lambda v: reading_in_subprocess(
            "benchmarks.qlora", ["--memory", v, "--batch", str(batch), "--seq", str(seq)], v
        ),
    )
    peaks = {v: peak_summary(rs) for v, rs in readings.items()}

    methods = {}
    for m in METHODS:
        ours, peft = f"{m}:ours", f"{m}:peft"
        methods[m] = {
            lib: {"step_s": median(times[v]), "memory": peaks.get(v), **_size(sizes[v])}
            for lib, v in (("ours", ours), ("peft", peft))
        }
        methods[m]["step_ours_over_peft"] = ratio_block(
            [a / b for a, b in zip(times[ours], times[peft], strict=True)]
        )
    import bitsandbytes

    return {
        **provenance(cpu_device()),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": {**versions(), "bitsandbytes": bitsandbytes.__version__},
        "command": command_line("benchmarks.qlora", None),
        "setup": {
            "model": "SmolLM2-135M-Instruct (LlamaForCausalLM), float32 compute",
            "adapter": f"rank {RANK}, alpha {ALPHA:g}, all linear layers but the tied head",
            "quantisation": "NF4, blocks of 64, double quantisation",
            "batch": batch,
            "seq": seq,
            "rounds": rounds,
            "warmup_steps": WARMUP_STEPS,
            "order": "shuffled anew each round (seeded)",
            "memory_repeats": memory_repeats,
            "threads": 1,
            "clock": "process CPU time",
        },
        "targets": TARGETS,
        "methods": methods,
        "rounds": times,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def _size(size: dict[str, float]) -> dict[str, float]:
    return {"base_mib": size["quantized_mib"], "base_ratio": size["ratio"]}


def table(res: dict[str, Any]) -> str:
    """The page's table and the line above it, from :func:`run`'s result."""
    from benchmarks.report_causal import interval_text, memory_met_text, met_text, mib_text

    s, targets = res["setup"], res["targets"]
    lines = [
        f"SmolLM2-135M, batch {s['batch']} x {s['seq']} tokens, {s['adapter']}; "
        f"{s['quantisation']}; {res['device']}; timed by {s['clock']} in {s['rounds']} "
        f"interleaved rounds of one step, the order {s['order']}, after {s['warmup_steps']} "
        "warm-up steps of each; seconds are medians, the step ratio the mean [95 % t-interval] "
        "over rounds of the ratio within a round, met only when the interval's upper end is "
        "below the target; memory is the median (range) of "
        f"{s['memory_repeats']} fresh-process reading{'s' * (s['memory_repeats'] > 1)} of the "
        "peak-RSS increase over 3 training "
        "steps, met only when even our largest reading over PEFT's smallest is below it "
        f"({commit_phrase(res)}, {res['date']}, bitsandbytes "
        f"{res['versions']['bitsandbytes']}, PEFT {res['versions']['peft']}; whole run "
        f"{res['wall_seconds']:.0f} s). " + code_since(res.get("commit")),
        "",
        "| method | library | base weights (MiB) | of float32 | met | step (s) | ours / PEFT step "
        "| met | peak training memory (MiB) | saved for backward (MiB) | ours / PEFT peak "
        "(medians) | met |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    base_target = targets["base_bytes_ratio"]
    for m, r in res["methods"].items():
        for lib in ("ours", "peft"):
            v, ours = r[lib], lib == "ours"
            mem, peft_mem = v["memory"], r["peft"]["memory"]
            base_met = "yes" if v["base_ratio"] <= base_target else "**no**"
            base_met = f"{base_met} (<= {base_target:.2f})" if ours else ""
            saved = f"{mem['saved_mib']:.1f}" if mem and mem.get("saved_mib") is not None else "-"
            cells = [
                m,
                "this library" if ours else "PEFT + bitsandbytes",
                f"{v['base_mib']:.1f}",
                f"{100 * v['base_ratio']:.1f} %",
                base_met,
                f"{v['step_s']:.2f}",
                interval_text(r["step_ours_over_peft"]) if ours else "",
                met_text(r["step_ours_over_peft"], targets["step_ours_over_peft"]) if ours else "",
                mib_text(mem),
                saved,
                f"{mem['median_mib'] / peft_mem['median_mib']:.2f}"
                if ours and mem and peft_mem
                else "",
                memory_met_text(mem, peft_mem, targets["peak_ours_over_peft"]) if ours else "",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(res: dict[str, Any]) -> None:
    from benchmarks.page_table import write_between

    write_between(
        PAGE,
        "qlora-table",
        "python -m benchmarks.qlora (benchmarks/results/qlora.json)",
        table(res),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--memory-repeats", type=int, default=3, help="fresh processes each")
    parser.add_argument(
        "--quick", action="store_true", help="2 rounds, 1 memory reading, written under quick/"
    )
    parser.add_argument("--memory", metavar="VARIANT", choices=VARIANTS)
    parser.add_argument("--render", action="store_true", help="only rewrite the docs table")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.memory:
        print(json.dumps(memory(args.memory, args.batch, args.seq)))
        return
    if args.quick:
        args.rounds, args.memory_repeats = 2, 1
    out = QUICK_RESULT if args.quick else RESULT
    if not args.render:
        res = run(args.rounds, args.batch, args.seq, args.memory_repeats)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")
        print(table(res))
    if not args.quick:  # a smoke run never reaches the page
        render(json.loads(RESULT.read_text()))


if __name__ == "__main__":
    main()
