"""Delta-LoRA: base updates after the warm-up, the two forms, checkpoints and adapter files."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_lowrank import (
    DeltaLoRA,
    LoRA,
    LowRankCallback,
    SingLoRA,
    adapter_layers,
    inject,
    load_adapter,
    merge,
    save_adapter,
    unload,
    unmerge,
)
from lightning_lowrank.methods.base import weight_oi
from lightning_lowrank.methods.lora import LoRALayer
from lightning_lowrank.schedules import delta_lora
from lightning_lowrank.schedules.delta_lora import DeltaLoRABase
from tests.conftest import MLP

TARGETS = ["embed", "fc1", "fc2"]  # an embedding and both orientations of a non-square linear


@pytest.fixture(autouse=True)
def one_thread():
    # tiny matrices: a second intra-op thread only adds spin-waiting on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(method, dtype=torch.float64):
    torch.manual_seed(0)
    model = MLP().to(dtype)
    inject(model, method, target_modules=TARGETS)
    return model


def batches(n: int = 60):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randint(0, 20, (4, 5), generator=g), torch.randint(0, 3, (4,), generator=g))
        for _ in range(n)
    ]


def train(model, schedule, steps: int, lr: float = 0.05):
    """A plain training loop that calls the schedule's hooks as the callback does."""
    layers = adapter_layers(model)
    schedule.setup(model, layers, steps)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    snapshots = {}
    for step, (ids, y) in enumerate(batches(steps)):
        snapshots[step] = {n: weight_oi(la.base).detach().clone() for n, la in layers.items()}
        opt.zero_grad()
        F.cross_entropy(model(ids), y).backward()
        schedule.before_optimizer_step(model, layers, step)
        opt.step()
        for layer in layers.values():
            layer.set_step(step + 1)
        schedule.after_optimizer_step(model, layers, step + 1)
    snapshots[steps] = {n: weight_oi(la.base).detach().clone() for n, la in layers.items()}
    return snapshots


METHODS = [
    pytest.param(LoRA(rank=2, alpha=4), id="lora"),
    pytest.param(SingLoRA(rank=2, alpha=4, ramp_steps=5), id="singlora"),
]


@pytest.mark.parametrize("method", METHODS)
def test_base_untouched_before_k_then_telescopes(method):
    k, steps, lam = 4, 12, 2.0
    model = make_model(method)
    w0 = {n: weight_oi(la.base).detach().clone() for n, la in adapter_layers(model).items()}
    deltas = {}
    schedule = DeltaLoRA(scale=lam, start_step=k)
    layers = adapter_layers(model)
    schedule.setup(model, layers, steps)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for step, (ids, y) in enumerate(batches(steps)):
        deltas[step] = {n: la.delta_weight().detach().clone() for n, la in layers.items()}
        if step <= k:
            for n, la in layers.items():  # bit-identical, not merely close
                assert torch.equal(weight_oi(la.base), w0[n]), (step, n)
        opt.zero_grad()
        F.cross_entropy(model(ids), y).backward()
        schedule.before_optimizer_step(model, layers, step)
        opt.step()
        for layer in layers.values():
            layer.set_step(step + 1)
        schedule.after_optimizer_step(model, layers, step + 1)
    for n, la in layers.items():
        d_t = la.delta_weight().detach()
        assert (d_t - deltas[k][n]).abs().max() > 1e-3  # the adapter moved after K
        expected = lam * (d_t - deltas[k][n])
        torch.testing.assert_close(weight_oi(la.base) - w0[n], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_inplace_and_implicit_agree_over_50_steps(method):
    # float64: the two forms agree to 1e-9 after 50 Adam steps (they differ only in rounding)
    inplace, implicit = make_model(method), make_model(method)
    train(inplace, DeltaLoRA(start_step=5, mode="inplace"), 50)
    train(implicit, DeltaLoRA(start_step=5, mode="implicit"), 50)
    ids = torch.randint(0, 20, (6, 5), generator=torch.Generator().manual_seed(3))
    out_a, out_b = inplace(ids), implicit(ids)
    torch.testing.assert_close(out_a, out_b, rtol=1e-9, atol=1e-9)
    ref = make_model(method)
    assert (out_a - ref(ids)).abs().max() > 1e-2  # training did something
    pairs = list(
        zip(adapter_layers(inplace).items(), adapter_layers(implicit).values(), strict=True)
    )
    for (n, a), b in pairs:
        torch.testing.assert_close(a.lora_A, b.lora_A, rtol=1e-9, atol=1e-9)
        # the implicit form's base never moves
        assert torch.equal(weight_oi(b.base), weight_oi(adapter_layers(ref)[n].base))
    # merging folds the implicit term in: the merged bases agree too
    merge(inplace)
    merge(implicit)
    for (_, a), b in pairs:
        torch.testing.assert_close(weight_oi(a.base), weight_oi(b.base), rtol=1e-9, atol=1e-9)


def test_forms_agree_in_float32():
    # float32: stated tolerance 1e-4 on the outputs after 50 steps
    inplace = make_model(LoRA(rank=2, alpha=4), torch.float32)
    implicit = make_model(LoRA(rank=2, alpha=4), torch.float32)
    train(inplace, DeltaLoRA(start_step=5, mode="inplace"), 50)
    train(implicit, DeltaLoRA(start_step=5, mode="implicit"), 50)
    ids = torch.randint(0, 20, (6, 5), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(inplace(ids), implicit(ids), rtol=1e-4, atol=1e-4)


class DenseLoRALayer(LoRALayer):
    """LoRA without low-rank factors: exercises the dense fallback."""

    def low_rank_factors(self):
        return None


@pytest.mark.parametrize("mode", ["inplace", "implicit"])
def test_dense_fallback_matches_factored(mode, monkeypatch):
    factored = make_model(LoRA(rank=2, alpha=4))
    monkeypatch.setattr(LoRA, "layer_cls", DenseLoRALayer)
    dense = make_model(LoRA(rank=2, alpha=4))
    assert all(isinstance(la, DenseLoRALayer) for la in adapter_layers(dense).values())
    train(factored, DeltaLoRA(start_step=3, mode=mode), 15)
    train(dense, DeltaLoRA(start_step=3, mode=mode), 15)
    assert all(la.extension.rank is None for la in adapter_layers(dense).values())
    ids = torch.randint(0, 20, (6, 5), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(factored(ids), dense(ids), rtol=1e-9, atol=1e-9)


def test_inplace_update_builds_no_dense_delta(monkeypatch):
    model = make_model(LoRA(rank=2, alpha=4))

    def forbidden(self):
        raise AssertionError("the factored update must not build the dense delta")

    schedule = DeltaLoRA(start_step=1)
    train(model, schedule, 2)  # warm the extension up with the normal delta_weight
    monkeypatch.setattr(LoRALayer, "delta_weight", forbidden)
    layers = adapter_layers(model)
    before = {n: delta_lora.delta_snapshot(la) for n, la in layers.items()}
    assert all(isinstance(s, tuple) for s in before.values())
    for n, la in layers.items():
        delta_lora.apply_base_update(la, before[n], 2.0)


def test_dropout_is_refused():
    model = make_model(LoRA(rank=2, alpha=4, dropout=0.1))
    with pytest.raises(ValueError, match="dropout=0.0"):
        DeltaLoRA().setup(model, adapter_layers(model), 100)


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        DeltaLoRA(mode="lazy")
    with pytest.raises(ValueError, match="start_step"):
        DeltaLoRA(start_step=-1)
    with pytest.raises(ValueError, match="scale"):
        DeltaLoRA(scale=float("nan"))


def test_start_step_beyond_run_warns():
    model = make_model(LoRA(rank=2, alpha=4))
    with pytest.warns(UserWarning, match="never starts"):
        DeltaLoRA(start_step=500).setup(model, adapter_layers(model), 100)


@pytest.mark.parametrize("mode", ["inplace", "implicit"])
def test_save_load_on_fresh_base_and_unload(mode, tmp_path):
    model = make_model(LoRA(rank=2, alpha=4))
    train(model, DeltaLoRA(start_step=3, mode=mode), 12)
    ids = torch.randint(0, 20, (6, 5), generator=torch.Generator().manual_seed(3))
    expected = model(ids).detach()
    path = save_adapter(model, tmp_path / "delta.safetensors")

    torch.manual_seed(0)
    fresh = MLP().double()  # the original base
    load_adapter(fresh, path)
    ext = adapter_layers(fresh)["fc1"].extension
    assert isinstance(ext, DeltaLoRABase) and ext.active and ext.implicit
    torch.testing.assert_close(fresh(ids), expected, rtol=1e-12, atol=1e-12)
    merge(fresh)
    torch.testing.assert_close(fresh(ids), expected, rtol=1e-10, atol=1e-10)
    unmerge(fresh)
    torch.testing.assert_close(fresh(ids), expected, rtol=1e-10, atol=1e-10)
    plain = unload(copy.deepcopy(fresh))
    assert not adapter_layers(plain)
    torch.testing.assert_close(plain(ids), expected, rtol=1e-10, atol=1e-10)
    # loading into a model whose bases were already moved in place would count the update twice
    if mode == "inplace":
        with pytest.raises(ValueError, match="fresh base model"):
            load_adapter(model, path)


def test_adapter_file_before_k_is_plain_lora(tmp_path):
    model = make_model(LoRA(rank=2, alpha=4))
    train(model, DeltaLoRA(start_step=50), 5)
    path = save_adapter(model, tmp_path / "early.safetensors")
    torch.manual_seed(0)
    fresh = MLP().double()
    load_adapter(fresh, path)
    assert not adapter_layers(fresh)["fc1"].extension.active
    ids = torch.randint(0, 20, (6, 5))
    torch.testing.assert_close(fresh(ids), model(ids))


# --- through the Trainer ----------------------------------------------------------------------
class Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = MLP()

    def forward(self, ids):
        return self.net(ids)

    def training_step(self, batch, batch_idx):
        ids, y = batch
        return F.cross_entropy(self(ids), y)

    def validation_step(self, batch, batch_idx):
        ids, y = batch
        self.log("val_loss", F.cross_entropy(self(ids), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


def loader(n: int = 12, repeat: bool = False):
    """``n`` batches of 4, in a fixed order (``repeat``: the same batch ``n`` times)."""
    ids, y = zip(*(batches(1) * n if repeat else batches(n)), strict=True)
    return DataLoader(TensorDataset(torch.cat(ids), torch.cat(y)), batch_size=4)


def trainer(**kwargs):
    defaults = dict(
        accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    return L.Trainer(**{**defaults, **kwargs})


def test_once_per_optimizer_step_under_accumulation(monkeypatch):
    calls = []
    real = delta_lora.apply_base_update
    monkeypatch.setattr(delta_lora, "apply_base_update", lambda *a: (calls.append(a[0]), real(*a)))
    module = Module()
    schedule = DeltaLoRA(start_step=2)
    cb = LowRankCallback(LoRA(rank=2, alpha=4), target_modules=TARGETS, schedules=[schedule])
    t = trainer(max_steps=6, accumulate_grad_batches=3, val_check_interval=2,
                num_sanity_val_steps=1, limit_val_batches=2, callbacks=[cb])  # fmt: skip
    t.fit(module, loader(48), loader(8))
    assert t.global_step == 6
    # steps 3..6 update each of the 3 layers once: 12 updates, not 36 (micro-batches)
    assert len(calls) == 4 * 3
    original = Module()
    for name, layer in cb.layers.items():
        w0 = weight_oi(original.get_submodule(name))
        expected = 2.0 * (layer.delta_weight() - layer.extension.reference_delta())
        torch.testing.assert_close(weight_oi(layer.base) - w0, expected.detach())


@pytest.mark.parametrize("mode", ["inplace", "implicit"])
def test_resume_after_k_continues_exactly(mode, tmp_path):
    def callback():
        schedule = DeltaLoRA(start_step=2, mode=mode)
        return LowRankCallback(LoRA(rank=2, alpha=4), target_modules=TARGETS, schedules=[schedule])

    first = Module()
    t = trainer(max_epochs=1, callbacks=[callback()])
    # one batch repeated: Lightning restarts an epoch-end checkpoint at batch index 4, and the
    # comparison must not depend on which batch comes first
    t.fit(first, loader(4, repeat=True))
    ckpt = tmp_path / "half.ckpt"
    t.save_checkpoint(ckpt)
    keys = torch.load(ckpt, weights_only=False)["state_dict"].keys()
    assert ("net.fc1.base.weight" in keys) == (mode == "inplace")  # implicit stays adapter-only
    assert "net.fc1.extension.ref_B" in keys

    uninterrupted = Module()
    trainer(max_steps=8, callbacks=[callback()]).fit(uninterrupted, loader(4, repeat=True))
    resumed = Module()
    resumed_trainer = trainer(max_steps=8, callbacks=[callback()])
    resumed_trainer.fit(resumed, loader(4, repeat=True), ckpt_path=ckpt)
    ids = torch.randint(0, 20, (6, 5))
    torch.testing.assert_close(resumed(ids), uninterrupted(ids), rtol=0, atol=1e-6)
    assert (resumed(ids) - Module()(ids)).abs().max() > 1e-3


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_bases_identical_across_ranks(tmp_path):
    # the in-place form is the one that moves the bases (the implicit form never touches them)
    mode = "inplace"
    from tests.ddp_utils import run_ddp

    results = run_ddp(
        tmp_path,
        f"""
        from lightning_lowrank import DeltaLoRA, LoRA, LowRankCallback
        from lightning_lowrank.methods.base import weight_oi
        from tests.schedules.test_delta_lora import TARGETS, Module, loader

        module = Module()
        w0 = {{n: weight_oi(m).detach().clone() for n, m in module.net.named_children()}}
        schedule = DeltaLoRA(start_step=2, mode={mode!r})
        cb = LowRankCallback(LoRA(rank=2, alpha=4), target_modules=TARGETS, schedules=[schedule])
        ddp_trainer(max_steps=6, callbacks=[cb]).fit(module, loader(24))
        ids = torch.arange(20).reshape(4, 5)
        save_rank_result({{
            "bases": {{n: weight_oi(la.base).detach().clone() for n, la in cb.layers.items()}},
            "w0": w0,
            "out": module(ids).detach(),
        }})
        """,
    )
    a, b = results
    for name in a["bases"]:
        torch.testing.assert_close(a["bases"][name], b["bases"][name], rtol=0, atol=0)
        moved = (a["bases"][name] - a["w0"][name.removeprefix("net.")]).abs().max()
        assert moved > 0
    torch.testing.assert_close(a["out"], b["out"], rtol=0, atol=0)
