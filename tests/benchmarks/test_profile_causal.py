"""The causal-LM profile: operators sorted into kinds, and the page's section from a result."""

from __future__ import annotations

from benchmarks import profile_causal as pc


def test_products_with_a_rank_operand_are_told_from_full_width_ones():
    assert pc.kind("aten::mm", [[1024, 576], [576, 8]]) == "rank-r products"
    assert pc.kind("aten::addmm_", [[1024, 576], [1024, 8], [8, 576]]) == "rank-r products"
    assert pc.kind("aten::mm", [[1024, 576], [576, 1536]]) == "full-width products"
    assert pc.kind("aten::add_", [[4, 256, 576], [4, 256, 576]]) == "elementwise"
    assert pc.kind("aten::mul", []) == "elementwise"
    assert pc.kind("aten::_scaled_dot_product_flash_attention_for_cpu", []) == "other"
    assert pc.kind("LowRankLinearBackward", []) == "other"


def test_section_shows_each_variant_and_its_difference_from_the_floor():
    def variant(fwd: float, bwd: float, opt: float, rank_r: float) -> dict:
        # profiled operator time twice the step (the profiler's overhead): shares still hold
        step = fwd + bwd + opt
        return {
            "phases_s": {"forward": fwd, "backward": bwd, "optimizer": opt},
            "step_s": step,
            "profiled_s": {
                "full-width products": 2 * (step - rank_r),
                "rank-r products": 2 * rank_r,
            },
        }

    res = {
        "meta": {
            "model": "m",
            "batch": 4,
            "seq_len": 256,
            "steps": 3,
            "rank": 8,
            "profiled_steps": 3,
            "commit": "abcdef123456",
            "date": "d",
        },
        "variants": {
            "floor": variant(2.0, 4.0, 0.0, 0.0),
            "LoRA:ours": variant(2.5, 4.75, 0.25, 0.5),
        },
    }
    assert pc.estimated_kinds(res["variants"]["LoRA:ours"]) == {
        "full-width products": 7.0,
        "rank-r products": 0.5,
    }
    text = "\n".join(pc.markdown_section(res))
    assert "| floor | 2.00 | 4.00 | 0.00 | 6.00 | 6.00 | 0.00 | 0.00 | 0.00 |" in text
    assert (
        "| LoRA:ours - floor | +0.50 | +0.75 | +0.25 | +1.50 | +1.00 | +0.50 | +0.00 | +0.00 |"
        in text
    )
    assert "`abcdef1234`" in text
    assert pc.markdown_section({"meta": res["meta"], "variants": {}}) == []
