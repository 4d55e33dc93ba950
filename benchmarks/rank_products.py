"""What LoRA's rank-r matrix products cost by themselves on this CPU, against the floor's step.

    python -m benchmarks.rank_products            # SmolLM2-135M shapes, batch 4 x 256, rank 8
    python -m benchmarks.rank_products --tiny     # a tiny random Llama: a smoke run

A LoRA layer adds six matrix products to a training step, each with the rank r as one
dimension: in forward ``A x`` and its product with ``B`` into the output; in backward ``B^T g``,
its product with ``A`` into the input's gradient, and the gradients of ``A`` and ``B``. For each
adapted projection of the model (q, k, v, o, gate, up, down, their widths from the model's
config, T = batch x sequence tokens), each product is timed alone on warm operands (process CPU
time, torch on one thread, the median of several repeats), in the layout the fused pass uses
(``lightning_lowrank/methods/fused.py``) and in the plain layout of the textbook formula, and
the faster one is kept. Summed over the layers (the input gradient of the first layer's q, k and
v is not needed and not counted), that is what the products cost per step, whatever runs them
as separate products: ours and PEFT's LoRA both do. The floor's step (the frozen model's
forward and backward) is measured in the same process, so the two are comparable.

Writes ``benchmarks/results/rank_products.json`` (``--tiny``: under ``results/quick/``);
``python -m benchmarks.render`` adds it to the Benchmarks page after the profile.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks import causal_lm
from benchmarks.provenance import code_since, commit_phrase

RANK = 8
CLOCK = time.process_time
#: the products a LoRA layer adds, in the order of a step
PRODUCTS = ("A x", "into output", "B^T g", "into input gradient", "gradient of A", "gradient of B")
#: within this fraction of the target's budget the products "take about all of it": the
#: per-step sum and the floor are single medians, a few percent apart from run to run
NEAR = 0.2
#: the LoRA target over the floor (benchmarks.causal_lm.TARGETS)
TARGET = causal_lm.TARGETS["step_over_floor"]["LoRA"]


def projections(config: Any) -> dict[str, tuple[int, int]]:
    """``{name: (in_features, out_features)}`` of the adapted projections of a Llama config."""
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    return {
        "q_proj": (hidden, config.num_attention_heads * head_dim),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (config.num_attention_heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def _seconds(fn: Callable[[], Any], repeats: int, inner: int) -> float:
    for _ in range(3):  # warm-up: the operands in cache, the kernels chosen
        fn()
    times = []
    for _ in range(repeats):
        t0 = CLOCK()
        for _ in range(inner):
            fn()
        times.append((CLOCK() - t0) / inner)
    return statistics.median(times)


def layouts(tokens: int, n_in: int, n_out: int, r: int) -> dict[str, dict[str, Callable[[], Any]]]:
    """For each product, ``{"fused": fn, "plain": fn}`` on random operands of these shapes (the
    two products accumulated in place have one layout)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.01

    x, grad, a, b = rand(tokens, n_in), rand(tokens, n_out), rand(r, n_in), rand(n_out, r)
    z, gx = rand(tokens, n_out), rand(tokens, n_in)
    u_t, gh_t = a @ x.t(), b.t().contiguous() @ grad.t()  # (r, T), as the fused pass keeps them
    u, gh = u_t.t().contiguous(), gh_t.t().contiguous()  # (T, r), as plain autograd keeps them
    return {
        "A x": {"fused": lambda: a @ x.t(), "plain": lambda: x @ a.t()},
        "into output": {"fused": lambda: z.addmm_(u_t.t(), b.t())},
        "B^T g": {"fused": lambda: b.t().contiguous() @ grad.t(), "plain": lambda: grad @ b},
        "into input gradient": {"fused": lambda: gx.addmm_(gh_t.t(), a)},
        "gradient of A": {"fused": lambda: gh_t @ x, "plain": lambda: gh.t() @ x},
        "gradient of B": {"fused": lambda: (u_t @ grad).t(), "plain": lambda: grad.t() @ u},
    }


def measure(config: Any, tokens: int, repeats: int, inner: int) -> dict[str, Any]:
    """Every projection's products, timed; ``count`` is how many layers run each."""
    layers = config.num_hidden_layers
    out: dict[str, Any] = {}
    for name, (n_in, n_out) in projections(config).items():
        timed = {
            product: {k: _seconds(fn, repeats, inner) for k, fn in options.items()}
            for product, options in layouts(tokens, n_in, n_out, RANK).items()
        }
        # the first layer's input needs no gradient: its q, k and v skip that product
        first = name in ("q_proj", "k_proj", "v_proj")
        counts = {p: layers - (1 if first and p == "into input gradient" else 0) for p in timed}
        out[name] = {"in": n_in, "out": n_out, "seconds": timed, "count": counts}
    return out


def per_step(projs: dict[str, Any], layout: str | None = None) -> float:
    """Seconds of one step's rank-r products: in ``layout`` ("fused"), or the faster of the two
    layouts of each product (``None``)."""
    total = 0.0
    for d in projs.values():
        for product, options in d["seconds"].items():
            s = options.get(layout, options["fused"]) if layout else min(options.values())
            total += s * d["count"][product]
    return total


def floor_step(base: torch.nn.Module, batch: dict, steps: int) -> float:
    """The frozen model's step (forward with the loss, backward), median of ``steps``."""
    from benchmarks.profile_causal import _phased_step

    runner = causal_lm.build("floor", base, batch, checkpointing=False)
    step = _phased_step("floor", runner.model, batch)
    for _ in range(2):
        step()
    return statistics.median(sum(step().values()) for _ in range(steps))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=causal_lm.BATCH)
    parser.add_argument("--seq", type=int, default=causal_lm.SEQ)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--inner", type=int, default=10, help="calls per timed repeat")
    parser.add_argument("--floor-steps", type=int, default=5)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    if args.tiny:
        args.batch, args.seq, args.repeats, args.inner, args.floor_steps = 2, 16, 2, 2, 1
    started = time.perf_counter()
    base, batch = causal_lm.one_thread_setup(args.tiny, args.batch, args.seq)
    floor = floor_step(base, batch, args.floor_steps)
    projs = measure(base.config, args.batch * args.seq, args.repeats, args.inner)
    res = {
        "meta": {
            **causal_lm.script_meta("rank_products", argv, args.tiny, args.batch, args.seq),
            "rank": RANK,
            "layers": base.config.num_hidden_layers,
            "repeats": args.repeats,
            "inner": args.inner,
            "clock": "process CPU time, torch on 1 thread",
        },
        "floor_step_s": floor,
        "projections": projs,
        "per_step_s": {"best": per_step(projs), "fused": per_step(projs, "fused")},
    }
    res["meta"]["wall_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps({k: res[k] for k in ("floor_step_s", "per_step_s")}), flush=True)
    causal_lm.write_result(res, "rank_products", args.tiny)
    return res


def markdown_section(res: dict[str, Any], profile: dict[str, Any] | None = None) -> list[str]:
    """The page's section: the products per projection, their sum per step against the floor,
    and what that leaves of the LoRA target (the sentence follows the numbers). With a
    ``profile`` (``causal_profile.json``) of the same commit and shapes, the products' time
    inside a real step is set beside their time alone."""
    meta, projs, floor = res["meta"], res["projections"], res["floor_step_s"]
    best, fused = res["per_step_s"]["best"], res["per_step_s"]["fused"]
    lines = [
        "### The rank-r products alone",
        "",
        f"`python -m benchmarks.rank_products` ({meta['model']}, {meta['layers']} layers, "
        f"batch {meta['batch']} x {meta['seq_len']}, rank {meta['rank']}, {commit_phrase(meta)}, "
        f"{meta['date']}): each of the six products a LoRA layer adds to a step, timed alone "
        "on warm operands (process CPU time, one thread, median of "
        f"{meta['repeats']} repeats), the faster of the fused pass's layout and the plain one; "
        "milliseconds per call, then seconds per step over all layers. "
        + code_since(meta.get("commit")),
        "",
        "| projection | in x out | " + " | ".join(PRODUCTS) + " | per step (s) |",
        "|---|---|" + "---|" * len(PRODUCTS) + "---|",
    ]
    for name, d in projs.items():
        cells = [min(d["seconds"][p].values()) * 1e3 for p in PRODUCTS]
        step = sum(min(d["seconds"][p].values()) * d["count"][p] for p in PRODUCTS)
        lines.append(
            f"| {name} | {d['in']} x {d['out']} | "
            + " | ".join(f"{c:.3f}" for c in cells)
            + f" | {step:.3f} |"
        )
    budget = (TARGET - 1.0) * floor
    share = best / floor
    lines += [
        "",
        f"Per step the products take {best:.2f} s (in the fused pass's layouts {fused:.2f} s), "
        f"{share:.1%} of the floor's step of {floor:.2f} s measured in the same process. The "
        f"LoRA target of {TARGET:g} floors leaves {budget:.2f} s for everything LoRA adds.",
    ]
    if best > (1 + NEAR) * budget:
        lines.append(
            f"The products alone exceed it by {best - budget:.2f} s, so on this machine no "
            "implementation that runs them as separate matrix products (ours and PEFT's both do) "
            f"can meet the target: LoRA's step is at least {1 + share:.2f} floors before any "
            "other cost. Meeting it would take the adapter's products folded into the frozen "
            "layer's own pass over the same activations, which PyTorch's CPU kernels do not offer."
        )
    elif best >= (1 - NEAR) * budget:
        lines.append(
            f"The products alone take about all of it (within {NEAR:.0%}): the target leaves "
            "nothing for the rest of what LoRA adds to a step (the optimizer, the adapter's "
            "elementwise work, its operands coming from memory rather than cache), so on this "
            "machine it cannot be met by running these products as separate matrix products, as "
            "ours and PEFT's LoRA both do."
        )
    else:
        lines.append(
            f"The products fit in it with {budget - best:.2f} s to spare: the rest of LoRA's "
            "extra time over the floor is not the adapter's arithmetic."
        )
    lines += _in_step(res, profile)
    return [*lines, ""]


def _same_setup(*metas: dict[str, Any]) -> bool:
    """Whether results measured the same clean commit at the same batch, sequence and rank (a
    field a result does not record is not compared)."""
    first = metas[0]
    for meta in metas:
        if meta.get("dirty") or meta.get("commit") is None:
            return False
        for key in ("commit", "batch", "seq_len", "rank"):
            if key in meta and key in first and meta[key] != first[key]:
                return False
    return True


def peft_target_lines(
    res: dict[str, Any], timed: dict[str, Any], profile: dict[str, Any] | None = None
) -> list[str]:
    """What LoRA's target against PEFT leaves for everything LoRA adds to a step, beside what
    ours adds and what the rank-r products take, from ``timed`` (a ``causal_lm`` result, without
    checkpointing), ``res`` and the ``profile``. Each figure is a fraction of the floor measured
    in the same process as it, so results of separate runs compare; nothing unless they all
    measured the same commit and shapes."""
    block = timed.get("modes", {}).get("off", {}).get("training") or {}
    ratios = block.get("ratios", {})
    limit = timed.get("targets", {}).get("ours_over_peft", {}).get("LoRA")
    ours, peft = ratios.get("LoRA:ours"), ratios.get("LoRA:peft")
    if limit is None or not ours or not peft or not _same_setup(res["meta"], timed["meta"]):
        return []
    ours_f, peft_f = ours["over_floor"]["mean"], peft["over_floor"]["mean"]
    allowed = limit * peft_f - 1.0
    alone = res["per_step_s"]["best"] / res["floor_step_s"]
    text = (
        f"Against PEFT (the causal-LM run of {commit_phrase(timed['meta'])}, no checkpointing, "
        f"means over rounds): PEFT's LoRA step is {peft_f:.3f} floors, so the target of at most "
        f"{limit:.2f} of it is {limit * peft_f:.3f} floors, which leaves {allowed:.1%} of the "
        f"floor for everything LoRA adds; ours adds {ours_f - 1:.1%}. The rank-r products "
        f"alone take {alone:.1%} of the floor (above)"
    )
    variants = (profile or {}).get("variants", {})
    inside = None
    if (
        profile
        and {"LoRA:ours", "floor"} <= set(variants)
        and _same_setup(res["meta"], profile["meta"])
    ):
        from benchmarks.profile_causal import estimated_kinds

        rank_r = estimated_kinds(variants["LoRA:ours"]).get("rank-r products", 0.0)
        inside = rank_r / variants["floor"]["step_s"]
        text += f" and {inside:.1%} inside the profiled step"
    if alone >= allowed:
        text += ": more than the target leaves, before any other cost of LoRA."
    elif inside is not None and inside >= allowed:
        text += (
            f": alone they fit in it with {allowed - alone:.1%} of the floor to spare, but as "
            "they run inside a step they take more than it leaves, before any other cost of LoRA."
        )
    else:
        worst = alone if inside is None else inside
        text += (
            f": that leaves {allowed - worst:.1%} of the floor for the rest of what LoRA adds "
            f"(the optimizer, the adapter's elementwise work), where ours spends "
            f"{ours_f - 1 - worst:.1%}."
        )
    text += f" The target moves with PEFT's own cost over the floor, {peft_f - 1:.1%} in that run."
    return [text, ""]


def _in_step(res: dict[str, Any], profile: dict[str, Any] | None) -> list[str]:
    """One sentence comparing the products alone with their share of a profiled LoRA step, when
    the profile measured the same commit and shapes (else nothing: the two would not compare)."""
    if profile is None or "LoRA:ours" not in profile.get("variants", {}):
        return []
    if not _same_setup(res["meta"], profile["meta"]):
        return []
    from benchmarks.profile_causal import estimated_kinds

    inside = estimated_kinds(profile["variants"]["LoRA:ours"]).get("rank-r products", 0.0)
    alone = res["per_step_s"]["best"]
    return [
        f"Inside a profiled LoRA step of the same commit (above) the same products take "
        f"{inside:.2f} s, {inside / alone:.1f} times their time alone: in the step their "
        "operands are not all in cache when they run."
        if inside > alone
        else f"Inside a profiled LoRA step of the same commit (above) the same products take "
        f"{inside:.2f} s, no more than alone."
    ]


if __name__ == "__main__":
    main()
