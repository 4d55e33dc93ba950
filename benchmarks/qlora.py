"""QLoRA on CPU: this library over a 4-bit NF4 base against PEFT over bitsandbytes' 4-bit base.

    python -m benchmarks.qlora [--rounds 5] [--batch 4] [--seq 128]
    python -m benchmarks.qlora --render      # only rewrite the docs table from the JSON

SmolLM2-135M (a Llama) as a causal LM, LoRA and DoRA (rank 8, alpha 16, every linear layer but the
tied output head), the same configuration on both sides: NF4 in blocks of 64 with double
quantisation, float32 compute. Measured:

1. base weight bytes: the adapted layers' storage (4-bit codes, absmax, code tables) against the
   same layers in float32;
2. training-step time (forward, backward, AdamW step), CPU time of this process on one thread,
   both libraries' models in ONE process, in interleaved rounds (median over rounds; the ratio
   ours / PEFT is the median of the per-round ratios, so a slow phase of a shared machine cancels);
3. peak training memory: the peak RSS increase over 3 training steps, each variant in a fresh
   process (``--memory VARIANT`` prints one JSON line), as in ``benchmarks.memory``.

Writes ``benchmarks/results/qlora.json`` (with the commit hash) and the table in
``docs/how-to/qlora.md`` between its ``qlora-table`` markers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from benchmarks.provenance import code_since, commit_phrase, cpu_device, provenance, versions

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "qlora.json"
PAGE = ROOT / "docs" / "how-to" / "qlora.md"
METHODS = ("LoRA", "DoRA")
VARIANTS = [f"{m}:{lib}" for m in METHODS for lib in ("ours", "peft")]
RANK, ALPHA = 8, 16.0
CLOCK = time.process_time


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
    from benchmarks.memory import _settle, _status_kib

    torch.set_num_threads(1)
    stepper = Stepper(build(variant), make_batch(batch, seq))
    _settle()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS to the current RSS
    for _ in range(steps):
        stepper.step()
    peak = _status_kib("VmHWM")
    return {"variant": variant, "peak_mib": (peak - before) / 1024}


def _memory_subprocess(variant: str, batch: int, seq: int) -> float | None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "benchmarks.qlora", "--memory", variant]
    cmd += ["--batch", str(batch), "--seq", str(seq)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        print(f"{variant}: memory run failed\n{proc.stderr[-2000:]}", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"]


def run(rounds: int, batch: int, seq: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    data = make_batch(batch, seq)
    models = {v: build(v) for v in VARIANTS}
    sizes = {v: base_bytes(m) for v, m in models.items()}
    steppers = {v: Stepper(m, data) for v, m in models.items()}
    for s in steppers.values():  # warm-up: allocator, optimizer state
        s.step()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(rounds):
        for v, s in steppers.items():
            start = CLOCK()
            s.step()
            times[v].append(CLOCK() - start)
    del steppers, models
    peaks = {v: _memory_subprocess(v, batch, seq) for v in VARIANTS}

    def median(xs: list[float]) -> float:
        xs = sorted(xs)
        n = len(xs)
        return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])

    methods = {}
    for m in METHODS:
        ours, peft = f"{m}:ours", f"{m}:peft"
        ratio = median([a / b for a, b in zip(times[ours], times[peft], strict=True)])
        methods[m] = {
            "ours": {"step_s": median(times[ours]), "peak_mib": peaks[ours], **_size(sizes[ours])},
            "peft": {"step_s": median(times[peft]), "peak_mib": peaks[peft], **_size(sizes[peft])},
            "step_ours_over_peft": ratio,
            "peak_ours_over_peft": (peaks[ours] / peaks[peft])
            if peaks[ours] and peaks[peft]
            else None,
        }
    import bitsandbytes
    import peft

    return {
        **provenance(cpu_device()),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": {**versions(), "bitsandbytes": bitsandbytes.__version__},
        "setup": {
            "model": "SmolLM2-135M-Instruct (LlamaForCausalLM), float32 compute",
            "adapter": f"rank {RANK}, alpha {ALPHA:g}, all linear layers but the tied head",
            "quantisation": "NF4, blocks of 64, double quantisation",
            "batch": batch,
            "seq": seq,
            "rounds": rounds,
            "threads": 1,
            "clock": "process CPU time",
        },
        "targets": {
            "base_bytes_ratio": 0.3,
            "step_ours_over_peft": 1.0,
            "peak_ours_over_peft": 1.0,
        },
        "methods": methods,
    }


def _size(size: dict[str, float]) -> dict[str, float]:
    return {"base_mib": size["quantized_mib"], "base_ratio": size["ratio"]}


def table(res: dict[str, Any]) -> str:
    s = res["setup"]
    lines = [
        f"SmolLM2-135M, batch {s['batch']} x {s['seq']} tokens, {s['adapter']}; "
        f"{s['quantisation']}; {res.get('device', 'one CPU thread')}, median of {s['rounds']} "
        "interleaved rounds "
        f"({commit_phrase(res)}, {res['date']}, bitsandbytes "
        f"{res['versions']['bitsandbytes']}, PEFT {res['versions']['peft']}). "
        + code_since(res.get("commit")),
        "",
        "| method | library | base weights (MiB) | of float32 | step (s) | ours / PEFT step "
        "| peak training memory (MiB) | ours / PEFT peak |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m, r in res["methods"].items():
        for lib in ("ours", "peft"):
            v = r[lib]
            peak = f"{v['peak_mib']:.0f}" if v["peak_mib"] is not None else "-"
            ratio = f"{r['step_ours_over_peft']:.2f}" if lib == "ours" else ""
            pratio = (
                f"{r['peak_ours_over_peft']:.2f}"
                if lib == "ours" and r["peak_ours_over_peft"]
                else ""
            )
            name = "this library" if lib == "ours" else "PEFT + bitsandbytes"
            lines.append(
                f"| {m} | {name} | {v['base_mib']:.1f} | {100 * v['base_ratio']:.1f} % "
                f"| {v['step_s']:.2f} | {ratio} | {peak} | {pratio} |"
            )
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
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--memory", metavar="VARIANT", choices=VARIANTS)
    parser.add_argument("--render", action="store_true", help="only rewrite the docs table")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.memory:
        print(json.dumps(memory(args.memory, args.batch, args.seq)))
        return
    if not args.render:
        res = run(args.rounds, args.batch, args.seq)
        RESULT.write_text(json.dumps(res, indent=2) + "\n")
        print(table(res))
    render(json.loads(RESULT.read_text()))


if __name__ == "__main__":
    main()
