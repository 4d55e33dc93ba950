"""Intruder dimensions and effective rank on matrices where the answer is known, and the monitor."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_lowrank import AdapterMonitor, LoRA, LowRankCallback, inject, merge
from lightning_lowrank.analysis import (
    delta_effective_ranks,
    effective_rank,
    intruder_dimensions,
    model_intruder_dimensions,
    top_left_singular_vectors,
)

from .conftest import MLP


def _with_spectrum(out: int, inp: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A float64 matrix with well separated singular values 1, 1/2, 1/3, ... and its U."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out, out, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inp, inp, generator=g, dtype=torch.float64))
    n = min(out, inp)
    s = 1.0 / torch.arange(1, n + 1, dtype=torch.float64)
    return u[:, :n] @ torch.diag(s) @ v[:, :n].T, u[:, :n]


def _rotate_into_tail(w0: torch.Tensor, u0: torch.Tensor, j: int, tail: int) -> torch.Tensor:
    """Rotate W0's j-th left singular vector onto an even mix of its ``tail`` last ones.

    ``Q = I + S (R - I) S^T`` with ``S = U0[:, [j] + tail columns]`` and an orthogonal ``R`` whose
    first column is ``1 / sqrt(m)``: ``Q`` is orthogonal, so ``Q W0`` has W0's singular values and
    left singular vectors ``Q U0``; its j-th one has cosine ``1 / sqrt(m)`` with every column of
    ``U0`` it touches and 0 with the others: an intruder at exactly position j.
    """
    n = u0.shape[1]
    idx = [j, *range(n - tail, n)]
    m = len(idx)
    s = u0[:, idx]
    first = torch.full((m, 1), 1.0 / math.sqrt(m), dtype=torch.float64)
    basis = torch.cat([first, torch.randn(m, m - 1, dtype=torch.float64)], dim=1)
    r, _ = torch.linalg.qr(basis)
    r = r * torch.sign(r[0, 0])  # QR may flip the first column's sign
    q = (
        torch.eye(u0.shape[0], dtype=torch.float64)
        + s @ (r - torch.eye(m, dtype=torch.float64)) @ s.T
    )
    return q @ w0


@pytest.mark.parametrize(
    ("shape", "j"), [((48, 48), 0), ((48, 48), 3), ((64, 32), 7), ((32, 64), 5)]
)
def test_rotation_at_chosen_singular_value_is_the_only_intruder(shape, j):
    torch.manual_seed(1)
    w0, u0 = _with_spectrum(*shape)
    w = _rotate_into_tail(w0, u0, j, tail=15)
    result = intruder_dimensions(w0, w, k=10, epsilon=0.5)
    assert result.count == 1
    assert result.indices == [j]
    assert result.similarities[j] == pytest.approx(1 / 4, abs=1e-9)  # 1 / sqrt(16)
    others = torch.cat([result.similarities[:j], result.similarities[j + 1 :]])
    assert torch.allclose(others, torch.ones_like(others), atol=1e-9)
    # the rotation keeps the spectrum
    assert torch.allclose(result.singular_values, 1.0 / torch.arange(1, 11, dtype=torch.float64))


def test_small_perturbation_has_no_intruders():
    w0, _ = _with_spectrum(40, 30, seed=2)
    g = torch.Generator().manual_seed(3)
    w = w0 + 1e-4 * torch.randn(40, 30, generator=g, dtype=torch.float64)
    result = intruder_dimensions(w0, w)
    assert result.count == 0
    assert result.indices == []
    assert result.similarities.shape == (10,)
    assert bool((result.similarities > 0.99).all())


def test_low_rank_update_off_the_spectrum_is_a_top_intruder():
    # a LoRA-like rank-1 update, larger than W0's top singular value, along a direction spread
    # evenly over W0's singular vectors: it becomes W's first singular vector and an intruder
    w0, u0 = _with_spectrum(36, 36, seed=4)
    u = u0.sum(dim=1) / 6.0  # unit vector, cosine 1/6 with every column of U0
    v = torch.zeros(36, dtype=torch.float64)
    v[0] = 1.0
    w = w0 + 5.0 * torch.outer(u, v)
    result = intruder_dimensions(w0, w, k=5, epsilon=0.5)
    assert 0 in result.indices
    # an update that only rescales W0's own top direction adds no intruder
    w_aligned = w0 + 5.0 * torch.outer(u0[:, 0], v)
    assert intruder_dimensions(w0, w_aligned, k=5).count == 0


def test_epsilon_is_the_threshold():
    w0, u0 = _with_spectrum(48, 48)
    w = _rotate_into_tail(w0, u0, 2, tail=15)  # similarity exactly 0.25 at position 2
    assert intruder_dimensions(w0, w, epsilon=0.26).count == 1
    assert intruder_dimensions(w0, w, epsilon=0.24).count == 0


def test_intruder_dimensions_rejects_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        intruder_dimensions(torch.zeros(3, 4), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="epsilon"):
        intruder_dimensions(torch.eye(3), torch.eye(3), epsilon=0.0)


@pytest.mark.parametrize("shape", [(30, 50), (50, 30)])
def test_fast_top_singular_vectors_match_the_svd(shape):
    w, _ = _with_spectrum(*shape, seed=5)
    u, s = top_left_singular_vectors(w.float(), 10)
    u_ref, s_ref, _ = torch.linalg.svd(w.float().double(), full_matrices=False)
    assert torch.allclose(s, s_ref[:10], rtol=1e-10)
    # same directions up to sign: |cos| = 1 column by column
    assert torch.allclose((u * u_ref[:, :10]).sum(0).abs(), torch.ones(10, dtype=torch.float64))


def test_effective_rank_known_values():
    assert effective_rank(torch.eye(7, dtype=torch.float64)) == pytest.approx(7.0)
    assert effective_rank(torch.outer(torch.arange(1.0, 5.0), torch.ones(3))) == pytest.approx(1.0)
    assert effective_rank(torch.zeros(4, 5)) == 0.0
    # sigma = (2, 1, 1): p = (1/2, 1/4, 1/4), H = 1.5 log 2, erank = 2 ** 1.5
    assert effective_rank(torch.diag(torch.tensor([2.0, 1.0, 1.0]))) == pytest.approx(2**1.5)


def _lora_mlp() -> MLP:
    torch.manual_seed(0)
    model = MLP().double()
    inject(model, LoRA(rank=2, alpha=2.0), target_modules=["fc1", "fc2"])
    return model


def test_model_level_functions_over_adapter_layers():
    model = _lora_mlp()
    # B = 0 at init: W = W0, no intruders, zero deltas
    counts = model_intruder_dimensions(model, k=5)
    assert set(counts) == {"fc1", "fc2"}
    assert all(r.count == 0 for r in counts.values())
    assert delta_effective_ranks(model) == {"fc1": 0.0, "fc2": 0.0}
    with torch.no_grad():
        model.fc1.lora_B.copy_(10.0 * torch.randn_like(model.fc1.lora_B))
    ranks = delta_effective_ranks(model)
    assert 1.0 <= ranks["fc1"] <= 2.0 and ranks["fc2"] == 0.0
    before = model_intruder_dimensions(model, k=5)
    merge(model)  # merged layers hold W in the base weight: same answer
    after = model_intruder_dimensions(model, k=5)
    for name in before:
        assert after[name].indices == before[name].indices
        assert torch.allclose(after[name].similarities, before[name].similarities, atol=1e-6)


def test_model_level_functions_need_adapters():
    with pytest.raises(ValueError, match="inject"):
        model_intruder_dimensions(MLP())


class _Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = MLP()

    def training_step(self, batch, batch_idx):
        ids, y = batch
        return torch.nn.functional.cross_entropy(self.net(ids), y)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=0.05)


def test_monitor_logs_every_n_optimizer_steps(tmp_path):
    torch.manual_seed(0)
    data = TensorDataset(torch.randint(0, 20, (32, 5)), torch.randint(0, 3, (32,)))
    monitor = AdapterMonitor(every_n_steps=2, k=4, per_layer=True)
    trainer = pl.Trainer(
        max_steps=4,
        accumulate_grad_batches=2,  # 8 batches, 4 optimizer steps: logs at steps 2 and 4 only
        callbacks=[LowRankCallback(LoRA(rank=2), target_modules=["fc1", "fc2"]), monitor],
        logger=pl.loggers.CSVLogger(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(_Classifier(), DataLoader(data, batch_size=4))
    assert [h["step"] for h in monitor.history] == [2, 4]
    assert set(monitor.history[-1]["intruders"]) == {"net.fc1", "net.fc2"}
    assert monitor.history[-1]["effective_rank"]["net.fc1"] > 0.0  # B has moved off zero
    logged = trainer.logged_metrics
    assert "adapter/intruders" in logged and "adapter/effective_rank" in logged
    assert "adapter/intruders/net.fc2" in logged


def test_monitor_without_adapters_says_what_to_add():
    trainer = pl.Trainer(
        max_steps=1,
        callbacks=[AdapterMonitor()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    data = TensorDataset(torch.randint(0, 20, (4, 5)), torch.randint(0, 3, (4,)))
    with pytest.raises(ValueError, match="LowRankCallback"):
        trainer.fit(_Classifier(), DataLoader(data, batch_size=4))
