"""FSDP2 through Lightning's ModelParallelStrategy, against one process.

One pair of gloo processes runs every case (``tests/shard/run_cases.py``, started once per test
session); the references run here, on one process, with the same global batches. Refusals and
block selection run without spawning.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lightning_lowrank import LoRA, LowRankCallback, adapter_layers, inject, read_adapter, unload
from lightning_lowrank.shard import (
    block_modules,
    check_shardable,
    check_strategy,
    merged_state_dict,
)
from tests.conftest import MLP, tiny_llama
from tests.shard import common, extra_cases

ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-5  # float32: 8 AdamW steps, gradients reduced in another order than one process
# int8 layers (bitsandbytes' Linear8bitLt) round their inputs per token to 1/127 of its absmax:
# a last-bit difference from the reduction order can move one input a whole int8 step
ATOL_INT8 = 5e-5


def _atol(case: str) -> float:
    return ATOL_INT8 if case == "bnb_lora" else ATOL


# --- the 2-rank run, shared by every test below ----------------------------------------------
@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("fsdp_ranks")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.shard.run_cases", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    ranks = []
    for r in range(common.WORLD):
        path = out / f"rank{r}.pt"
        if not path.exists():
            raise AssertionError(f"rank {r} wrote nothing:\n{proc.stderr[-5000:]}")
        ranks.append(torch.load(path, weights_only=False))
    return out, ranks


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fsdp_single")


def _result(sharded, case: str) -> list:
    _, ranks = sharded
    for r, rank in enumerate(ranks):
        assert case not in rank["errors"], f"rank {r}:\n{rank['errors'][case]}"
    return [rank["results"][case] for rank in ranks]


pytestmark = [pytest.mark.ddp, pytest.mark.slow]

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="quantized bases need bitsandbytes")


def _cases(names) -> list:
    return [pytest.param(n, marks=needs_bnb) if n in common.QUANT_CASES else n for n in names]


# --- every method and schedule equals one process ---------------------------------------------
@pytest.mark.parametrize("case", _cases(common.CASES))
def test_two_ranks_equal_one_process(sharded, single, case):
    out, _ = sharded
    facts = _result(sharded, case)
    reference_facts = _reference(single, case)
    got, meta = read_adapter(out / f"{case}.safetensors")
    want, want_meta = read_adapter(single / f"{case}.safetensors")
    assert meta == want_meta
    assert set(got) == set(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=_atol(case), msg=key)
    trained = [k for k in want if "lora_B" in k or "lambda_b" in k or "sparse_values" in k]
    # the merged weights (Delta-LoRA's in-place base updates included)
    got_merged = load_file(out / f"{case}_merged.safetensors")
    want_merged = load_file(single / f"{case}_merged.safetensors")
    assert set(got_merged) == set(want_merged)
    for key, value in want_merged.items():
        torch.testing.assert_close(got_merged[key], value, rtol=0, atol=_atol(case), msg=key)
    if trained:  # the adapters moved (SingLoRA has no zero-initialised factor to check)
        assert any(want[k].abs().max() > 1e-3 for k in trained)
    # schedule state (AdaLoRA's masks, LoRA-drop's selections): identical on every rank and
    # equal to one process
    assert _same(facts[0], facts[1])
    assert _same(facts[0], reference_facts, atol=_atol(case))
    if "masks" in reference_facts:  # AdaLoRA pruned some slots (not a trivial all-ones pattern)
        assert any((m == 0).any() for m in reference_facts["masks"].values())


_REFERENCES: dict[str, dict] = {}


def _reference(single: Path, case: str) -> dict:
    """One process's run of ``case`` (once per session: several tests compare with it)."""
    if case not in _REFERENCES:
        _REFERENCES[case] = common.run(case, single, None)
    return _REFERENCES[case]


# --- over a quantized base ------------------------------------------------------------------
@pytest.mark.parametrize("case", _cases(common.QUANT_CASES))
def test_quantized_base_stays_whole_and_its_file_reloads_exactly(sharded, single, case):
    from lightning_lowrank import load_adapter
    from lightning_lowrank.methods.layers import is_quantized

    out, _ = sharded
    facts = _result(sharded, case)
    reference = _reference(single, case)
    for rank in facts:
        # every quantized weight is a whole bitsandbytes parameter on every rank (not a DTensor),
        # the very bytes of one process (compared exactly by the test above as well)
        kinds = set(rank["storage_types"].values())
        assert kinds == ({"Params4bit", "Int8Params"} if case == "bnb_lora" else {"Params4bit"})
        assert all(torch.equal(rank["storage"][n], t) for n, t in reference["storage"].items())
        # merge into a 4-bit weight is refused as on one process, and changes nothing
        assert "unload(model, dtype=" in rank["merge_refused"] and rank["unchanged"]
    # the 2-rank file records how each base is stored ...
    _, meta = read_adapter(out / f"{case}.safetensors")
    recorded = {facts["format"] for facts in meta["quantization"].values()}
    assert recorded == ({"nf4", "int8"} if case == "bnb_lora" else {"nf4"})
    assert len(meta["quantization"]) == 14  # 7 linear layers in each of the 2 blocks
    # ... and loads onto a fresh model (dense: quantized the same way as it loads; or one that
    # comes quantized), which then computes the logits of the model trained on one process
    fresh = common.TinyLM(base=common.QUANT_CASES[case])
    fresh.configure_model()
    load_adapter(fresh, out / f"{case}.safetensors")
    assert all(is_quantized(la.base) for la in adapter_layers(fresh).values())
    got = common.probe_logits(fresh)
    torch.testing.assert_close(got, reference["logits"], rtol=0, atol=_atol(case))
    assert reference["logits"].abs().max() > 0.1  # not a degenerate output


@needs_bnb
def test_quantized_replicas_come_from_rank_zero(sharded):
    rank0, rank1 = _result(sharded, "quantized_replicas")
    # the ranks quantized different weights; after sharding both hold rank 0's storage
    assert set(rank0["storage"]) == set(rank1["storage"]) and rank0["storage"]
    for name, value in rank0["storage"].items():
        assert torch.equal(rank1["storage"][name], value), name
    assert any(not torch.equal(rank1["own"][n], rank0["storage"][n]) for n in rank0["storage"]), (
        "the ranks built the same weights: nothing was broadcast"
    )
    assert all(kind == "Params4bit" for kind in rank1["types"].values())
    for message in (rank0["refused"], rank1["refused"]):
        assert "ignored_params=lightning_lowrank.quant.fsdp.quantized_storage" in message


def _same(a, b, atol: float = 0.0) -> bool:
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape:
            return False
        if a.dtype.is_floating_point:
            return bool(torch.allclose(a, b, rtol=0, atol=atol))
        return bool(torch.equal(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(_same(a[k], b[k], atol) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y, atol) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return abs(a - b) <= atol
    return a == b


# --- files from a sharded model -------------------------------------------------------------
def test_files_from_sharded_model_equal_one_process(sharded, single):
    out, _ = sharded
    facts = _result(sharded, "save_files")
    assert all(f == {"sharded": True, "still_sharded": True} for f in facts)
    extra_cases.save_files(single, None)
    # an adapter file: the same tensors, bit for bit, and the same metadata (safetensors writes
    # metadata entries in a per-process hash order, so the bytes of the header may differ)
    got, got_meta = read_adapter(out / "save_sharded.safetensors")
    want, want_meta = read_adapter(single / "save_single.safetensors")
    assert got_meta == want_meta and set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    merged = out / "merged_sharded.safetensors"
    assert merged.read_bytes() == (single / "merged_single.safetensors").read_bytes()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        a, b = out / "peft_sharded" / name, single / "peft_single" / name
        assert a.read_bytes() == b.read_bytes(), name


def test_merged_state_dict_is_unloads_and_leaves_the_model(llama):
    inject(llama, LoRA(rank=2), target_modules="all-linear")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in adapter_layers(llama).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen))
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    merged = merged_state_dict(llama)
    want = unload(copy.deepcopy(llama)).state_dict()
    assert set(merged) == set(want)
    for key, value in want.items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=1e-6)
    for key, value in llama.state_dict().items():
        assert torch.equal(value, before[key])


@needs_bnb
def test_merged_state_dict_over_a_quantized_base_is_unloads():
    from tests.quant.helpers import quantized, randomise

    model = quantized("dora")
    randomise(model)
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    merged = merged_state_dict(model)
    want = unload(copy.deepcopy(model)).state_dict()  # plain layers: dequantize(W0) + dW
    assert set(merged) == set(want)
    assert not any("absmax" in k or "quant" in k for k in merged)
    for key, value in want.items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=1e-6)
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, before[key]), key


# --- checkpoints ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["resume_file", "resume_dcp"])
def test_resume_from_adapter_only_checkpoint(sharded, case):
    for facts in _result(sharded, case):
        assert facts["stored_keys"], "no model keys in the checkpoint"
        frozen = [k for k in facts["stored_keys"] if "lora_" not in k]
        assert not frozen, f"frozen weights in an adapter-only checkpoint: {frozen[:3]}"
        straight, resumed = facts["straight"], facts["resumed"]
        assert set(straight) == set(resumed)
        for key, value in straight.items():
            torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6, msg=key)


# --- meta-device models -----------------------------------------------------------------------
def test_meta_device_adapters_materialise_with_their_init(sharded):
    from lightning_lowrank.methods.sltrain import sparse_support
    from lightning_lowrank.methods.vera import SharedProjection

    for facts in _result(sharded, "meta_init"):
        lora = facts["lora"]["adapter"]
        for key, value in lora.items():
            if key.endswith("lora_B"):
                assert torch.equal(value, torch.zeros_like(value)), key
            else:  # Kaiming-uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))
                bound = 1 / value.shape[1] ** 0.5
                assert value.abs().max() <= bound and value.std() > bound / 4, key
        dora = facts["dora"]
        for key, value in dora["adapter"].items():
            if key.endswith("magnitude"):
                w0 = dora["state"][key.replace("magnitude", "base.weight")]
                torch.testing.assert_close(value, torch.linalg.vector_norm(w0, dim=1))
        vera = facts["vera"]
        for key, value in vera["adapter"].items():
            if key.endswith("vera_lambda_b"):
                assert torch.equal(value, torch.zeros_like(value))
            if key.endswith("vera_lambda_d"):
                assert torch.equal(value, torch.full_like(value, 0.1))
        layer_buffers = next(iter(vera["buffers"].values()))
        a, b = SharedProjection.draw(
            8, layer_buffers["shared.A"].shape[1], layer_buffers["shared.B"].shape[0], 0
        )
        assert torch.equal(layer_buffers["shared.A"], a) and torch.equal(
            layer_buffers["shared.B"], b
        )
        for name, buffers in facts["sltrain"]["buffers"].items():
            index = buffers["sparse_index"]
            w = facts["sltrain"]["state"][f"{name}.base.weight"]
            seeded = facts["sltrain"]["seeded"][name]
            want = sparse_support(w.shape[0], w.shape[1], 0.05, 0, seeded)
            assert torch.equal(index, want), name


# --- refusals (no processes) ------------------------------------------------------------------
class _Built(common.TinyLM):
    pass


def _fake_trainer(strategy):
    return SimpleNamespace(strategy=strategy)


def test_fsdp1_is_refused_with_the_strategy_to_use():
    from lightning.pytorch.strategies import FSDPStrategy

    module = common.TinyLM()
    cb = LowRankCallback(LoRA(rank=2))
    with pytest.raises(ValueError, match=r"ModelParallelStrategy\(data_parallel_size=N"):
        cb.setup(_fake_trainer(FSDPStrategy()), module, "fit")
    assert module.model is None  # nothing was built or injected


@pytest.mark.parametrize("tp", [2, "auto"])
def test_tensor_parallel_is_refused(tp):
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=tp)
    with pytest.raises(ValueError, match="tensor_parallel_size=1"):
        check_strategy(strategy)
    module = common.TinyLM()
    with pytest.raises(ValueError, match="tensor parallelism"):
        LowRankCallback(LoRA(rank=2)).setup(_fake_trainer(strategy), module, "fit")
    assert module.model is None


def test_parameters_on_the_lightning_module_itself_are_refused():
    module = nn.Module()
    module.scale = nn.Parameter(torch.ones(1))
    module.net = MLP()
    with pytest.raises(ValueError, match="move them into a submodule"):
        check_shardable(module)
    check_shardable(module, parallelize=lambda m, mesh: None)  # the user shards it


def test_already_sharded_model_is_refused(sharded):
    for message in _result(sharded, "refuse_sharded"):
        assert "already sharded" in message and "configure_model" in message


# --- which blocks ---------------------------------------------------------------------------
def test_blocks_default_to_no_split_modules():
    model = tiny_llama()
    blocks = block_modules(model)
    assert [type(b).__name__ for b in blocks] == ["LlamaDecoderLayer"] * 2


def test_blocks_by_class_or_name_and_the_module_list_rule():
    model = tiny_llama()
    mlps = block_modules(model, blocks=["LlamaMLP"])
    assert len(mlps) == 2 and all(type(m).__name__ == "LlamaMLP" for m in mlps)
    assert block_modules(model, blocks=[type(model.model.layers[0])]) == list(model.model.layers)
    stack = nn.Sequential(nn.Linear(2, 2), nn.ModuleList([nn.Linear(2, 2) for _ in range(3)]))
    stack.short = nn.ModuleList([nn.Linear(2, 2)])
    assert block_modules(stack) == list(stack[1])  # the longest ModuleList
    assert block_modules(MLP()) == []  # no repeated stack: the roots take everything
