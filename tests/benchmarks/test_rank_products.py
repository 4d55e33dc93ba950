"""The rank-r product timing: the two layouts compute the same products, the per-step count
follows the model, and the page's sentence follows the numbers."""

from __future__ import annotations

import pytest
import torch

from benchmarks import rank_products as rp


def test_layouts_compute_the_same_products():
    torch.set_default_dtype(torch.float64)
    try:
        options = rp.layouts(tokens=12, n_in=10, n_out=6, r=3)
    finally:
        torch.set_default_dtype(torch.float32)
    assert set(options) == set(rp.PRODUCTS)
    for product, fns in options.items():
        if len(fns) == 2:
            fused, plain = fns["fused"](), fns["plain"]()
            if product in ("A x", "B^T g"):  # the fused pass keeps these as (r, T)
                fused = fused.t()
            assert fused.shape == plain.shape, product
            torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    shapes = {p: tuple(fns["fused"]().shape) for p, fns in options.items()}
    assert shapes == {
        "A x": (3, 12),  # (r, T): the transpose of x A^T
        "into output": (12, 6),
        "B^T g": (3, 12),
        "into input gradient": (12, 10),
        "gradient of A": (3, 10),
        "gradient of B": (6, 3),
    }


def test_projection_widths_and_per_step_counts():
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=3,
    )  # fmt: skip
    widths = rp.projections(config)
    assert widths["k_proj"] == (64, 32) and widths["down_proj"] == (160, 64)
    projs = rp.measure(config, tokens=8, repeats=1, inner=1)
    assert projs["q_proj"]["count"]["into input gradient"] == 2  # not the first layer's
    assert projs["o_proj"]["count"]["into input gradient"] == 3
    one = {"A x": {"fused": 2.0, "plain": 1.0}, "into output": {"fused": 1.0}}
    fake = {"p": {"seconds": one, "count": {"A x": 3, "into output": 2}}}
    assert rp.per_step(fake) == pytest.approx(3 * 1.0 + 2 * 1.0)  # the faster layout
    assert rp.per_step(fake, "fused") == pytest.approx(3 * 2.0 + 2 * 1.0)


@pytest.mark.parametrize(
    "products, verdict", [(0.8, "can meet"), (0.45, "about all of it"), (0.2, "to spare")]
)
def test_sentence_follows_the_numbers(products, verdict):
    one = {p: {"fused": products / 6} for p in rp.PRODUCTS}
    res = {
        "meta": {"model": "m", "layers": 1, "batch": 1, "seq_len": 1, "rank": 8, "repeats": 1,
                 "commit": "abcdef123456", "dirty": False, "date": "d"},
        "floor_step_s": 10.0,
        "projections": {"q_proj": {"in": 4, "out": 4, "seconds": one, "count": dict.fromkeys(one, 1)}},
        "per_step_s": {"best": products, "fused": products},
    }  # fmt: skip
    text = "\n".join(rp.markdown_section(res))
    assert f"{products / 10:.1%} of the floor" in text
    assert "leaves 0.50 s" in text  # 1.05 floors of a 10 s floor
    assert verdict in text
    assert ("to spare" in text) == (products < 0.4)  # 1.05 floors of 10 s, less 20 %


def test_products_in_a_step_are_compared_only_at_the_same_commit():
    one = {p: {"fused": 0.05} for p in rp.PRODUCTS}
    meta = {"model": "m", "layers": 1, "batch": 4, "seq_len": 256, "rank": 8, "repeats": 1,
            "commit": "abc", "dirty": False, "date": "d"}  # fmt: skip
    res = {
        "meta": meta,
        "floor_step_s": 10.0,
        "projections": {"q_proj": {"in": 4, "out": 4, "seconds": one, "count": dict.fromkeys(one, 1)}},
        "per_step_s": {"best": 0.3, "fused": 0.3},
    }  # fmt: skip
    lora = {"step_s": 2.0, "profiled_s": {"rank-r products": 0.6, "full-width products": 1.4}}
    profile = {"meta": dict(meta), "variants": {"LoRA:ours": lora}}
    text = "\n".join(rp.markdown_section(res, profile))
    assert "take 0.60 s, 2.0 times their time alone" in text
    profile["meta"]["commit"] = "def"
    assert "profiled LoRA step" not in "\n".join(rp.markdown_section(res, profile))


def _timed(commit: str, ours: float, peft: float) -> dict:
    """A causal-LM result with LoRA's step means over the floor (no checkpointing)."""
    return {
        "meta": {"commit": commit, "dirty": False, "batch": 4, "seq_len": 256},
        "targets": {"ours_over_peft": {"LoRA": 0.92}},
        "modes": {"off": {"training": {"ratios": {
            "LoRA:ours": {"over_floor": {"mean": ours}},
            "LoRA:peft": {"over_floor": {"mean": peft}},
        }}}},
    }  # fmt: skip


@pytest.mark.parametrize(
    "products, in_step, verdict",
    [
        (1.6, None, "more than the target leaves, before any other cost"),
        (0.3, 0.05, "to spare, but as they run inside a step they take more"),
        (0.3, 0.02, "that leaves 7.2% of the floor for the rest"),
    ],
)
def test_peft_target_sentence_follows_the_numbers(products, in_step, verdict):
    meta = {"commit": "abc", "dirty": False, "batch": 4, "seq_len": 256, "rank": 8}
    res = {"meta": meta, "floor_step_s": 10.0, "per_step_s": {"best": products}}
    # PEFT at 1.25 floors: 0.92 of it is 1.15 floors, leaving 15.0 % of the floor to LoRA
    timed = _timed("abc", 1.2, 1.25)
    profile = None
    if in_step is not None:
        lora = {"step_s": 1.0, "profiled_s": {"rank-r products": in_step * 8, "other": 8.0}}
        profile = {"meta": dict(meta), "variants": {"floor": {"step_s": 0.25}, "LoRA:ours": lora}}
    (text, _) = rp.peft_target_lines(res, timed, profile)
    assert "leaves 15.0% of the floor for everything LoRA adds; ours adds 20.0%" in text
    assert f"alone take {products / 10:.1%} of the floor" in text
    assert verdict in text
    assert "PEFT's own cost over the floor, 25.0% in that run" in text
    if in_step == 0.02:  # the rank-r share of a 1 s step, 0.02 / 1.02 s, over a 0.25 s floor
        assert "7.8% inside the profiled step" in text and "where ours spends 12.2%" in text


def test_peft_target_sentence_needs_the_same_commit():
    meta = {"commit": "abc", "dirty": False, "batch": 4, "seq_len": 256, "rank": 8}
    res = {"meta": meta, "floor_step_s": 10.0, "per_step_s": {"best": 0.3}}
    assert rp.peft_target_lines(res, _timed("def", 1.2, 1.25)) == []
    dirty = _timed("abc", 1.2, 1.25)
    dirty["meta"]["dirty"] = True
    assert rp.peft_target_lines(res, dirty) == []
    assert rp.peft_target_lines(res, _timed("abc", 1.2, 1.25)) != []
