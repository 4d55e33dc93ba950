"""What an adapter did to a weight: intruder dimensions and the effective rank of its update.

Intruder dimensions (Shuttleworth et al. 2024, arXiv 2410.21228). Let ``W0`` be a pre-trained weight
and ``W`` the fine-tuned one, both ``(out, in)``, with left singular vectors ``U0`` and ``U`` (thin
SVD, columns sorted by decreasing singular value). For each of the top ``k`` columns ``u_j`` of
``U`` the similarity is its largest absolute cosine with any column of ``U0``:

    sim_j = max_i |<u_j, U0[:, i]>|

and ``u_j`` is an *intruder* when ``sim_j < epsilon``: a high-ranking direction of the fine-tuned
weight that resembles none of the pre-trained ones. The paper finds LoRA creates them and full
fine-tuning does not.

Effective rank (Roy & Vetterli 2007, "The effective rank: a measure of effective
dimensionality"): with singular values ``sigma_i`` of a matrix and ``p_i = sigma_i / sum(sigma)``,

    erank = exp(-sum_i p_i log p_i),

a real number between 1 (one direction carries everything) and the rank (a flat spectrum).

The model-level functions use only the adapter protocol: ``W0`` is the base layer's weight in
``(out, in)`` orientation (``weight_oi``) and
``W = W0 + delta_weight()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_lowrank.inject import adapter_layers
from lightning_lowrank.methods.base import AdapterLayer
from lightning_lowrank.methods.layers import dense_weight_oi


@dataclass
class IntruderResult:
    """Intruder dimensions of one fine-tuned weight.

    Attributes:
        count: how many of the top ``k`` singular vectors of ``W`` are intruders.
        similarities: ``(k,)`` max absolute cosine of each top singular vector of ``W`` with the
            singular vectors of ``W0``, in order of decreasing singular value of ``W``.
        indices: positions (0 = largest singular value of ``W``) of the intruders.
        singular_values: ``(k,)`` the top singular values of ``W``.
        epsilon: the similarity threshold used.
    """

    count: int
    similarities: Tensor
    indices: list[int] = field(default_factory=list)
    singular_values: Tensor | None = None
    epsilon: float = 0.5


def left_singular_vectors(w: Tensor, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Thin SVD's ``U`` and singular values of ``w``, computed in ``dtype`` (float64 by default,
    so near-equal singular values do not swap between runs)."""
    u, s, _ = torch.linalg.svd(w.detach().to(dtype), full_matrices=False)
    return u, s


def top_left_singular_vectors(w: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The top ``k`` left singular vectors and singular values of ``w``, in float64 (``k`` may be
    ``min(w.shape)``: all of them).

    Through the eigendecomposition of the smaller Gram matrix (``W W^T`` or ``W^T W``, then
    ``u = W v / sigma``) instead of a full SVD: about ten times faster on MiniLM's layers, which
    matters when a callback measures every layer during training. The top directions are the
    well-conditioned ones (errors scale with ``eps * sigma_1^2 / sigma_j^2``); if one of the ``k``
    singular values is too close to zero for that, the exact SVD is used instead.
    """
    w = w.detach().to(torch.float64)
    out_f, in_f = w.shape
    k = min(k, out_f, in_f)
    if out_f <= in_f:
        evals, evecs = torch.linalg.eigh(w @ w.T)
        s = evals.flip(0)[:k].clamp_min(0).sqrt()
        return evecs.flip(1)[:, :k], s
    evals, evecs = torch.linalg.eigh(w.T @ w)
    s = evals.flip(0)[:k].clamp_min(0).sqrt()
    if s[-1] <= 1e-6 * s[0]:
        u, s_full = left_singular_vectors(w)
        return u[:, :k], s_full[:k]
    return (w @ evecs.flip(1)[:, :k]) / s, s


def intruder_similarities(u0: Tensor, w: Tensor, k: int = 10) -> tuple[Tensor, Tensor]:
    """Max ``|cosine|`` of each of the top ``k`` left singular vectors of ``w`` with the columns
    of ``u0``, and those top singular values. ``u0`` may be cached across calls (it depends on the
    pre-trained weight only)."""
    u, s = top_left_singular_vectors(w, k)
    # columns of u and u0 are unit vectors, so the inner products are the cosines
    sims = (u.T @ u0.to(u.dtype)).abs().amax(dim=1)
    return sims, s


def intruder_dimensions(w0: Tensor, w: Tensor, k: int = 10, epsilon: float = 0.5) -> IntruderResult:
    """Count the intruder dimensions of a fine-tuned weight ``w`` relative to ``w0``.

    ``sim_j = max_i |<u_j, u0_i>|`` for the top ``k`` left singular vectors ``u_j`` of ``w`` and
    all left singular vectors ``u0_i`` of ``w0``; ``u_j`` is an intruder when ``sim_j < epsilon``.

    Args:
        w0: the pre-trained weight, ``(out, in)``.
        w: the fine-tuned weight, same shape.
        k: how many of the top singular vectors of ``w`` to test (10 in the paper).
        epsilon: the similarity threshold (0.5 in the paper, which also sweeps it).

    Returns:
        An [`IntruderResult`][lightning_lowrank.analysis.IntruderResult].
    """
    if w0.shape != w.shape or w0.dim() != 2:
        raise ValueError(
            f"w0 and w must be matrices of the same shape, got {tuple(w0.shape)} and "
            f"{tuple(w.shape)}: pass the weights in (out, in) orientation (see weight_oi)"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not 0.0 < epsilon <= 1.0:
        raise ValueError(f"epsilon must be in (0, 1], got {epsilon}")
    u0, _ = top_left_singular_vectors(w0, min(w0.shape))
    sims, top = intruder_similarities(u0, w, k)
    return classify_intruders(sims, top, epsilon)


def classify_intruders(sims: Tensor, top: Tensor, epsilon: float) -> IntruderResult:
    """An [`IntruderResult`][lightning_lowrank.analysis.IntruderResult] from the similarities of [`intruder_similarities`][lightning_lowrank.analysis.intruder_similarities]."""
    hits = (sims < epsilon).nonzero().flatten().tolist()
    return IntruderResult(len(hits), sims, hits, top, epsilon)


def effective_rank(matrix: Tensor, eps: float = 1e-12) -> float:
    """Roy & Vetterli's effective rank ``exp(H(p))``, ``p_i = sigma_i / sum_j sigma_j``.

    Returns 0.0 for a zero matrix (e.g. a LoRA delta at initialisation, where ``B = 0``).
    """
    m = matrix.detach().to(torch.float64)
    # singular values from the smaller Gram matrix: cheap, and the tiny ones it gets wrong carry
    # almost no weight in the entropy
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    s = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
    total = s.sum()
    if total <= eps:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def adapted_weights(layer: AdapterLayer) -> tuple[Tensor, Tensor]:
    """``(W0, W)`` of one adapter layer in ``(out, in)`` orientation, merged or not."""
    with torch.no_grad():
        base = dense_weight_oi(layer.base).detach()  # dequantized if quantized
        delta = layer.delta_weight().detach().to(base.dtype)
        if layer.merged:  # the base weight already holds W0 + delta
            return base - delta, base.clone()
        return base.clone(), base + delta


def model_intruder_dimensions(
    model: nn.Module, k: int = 10, epsilon: float = 0.5
) -> dict[str, IntruderResult]:
    """[`intruder_dimensions`][lightning_lowrank.analysis.intruder_dimensions] for every adapter layer of ``model``, keyed by layer name.

    ``W0`` is the base layer's weight and ``W = W0 + delta_weight()``. (Under Delta-LoRA the base
    weight itself moves; use [`AdapterMonitor`][lightning_lowrank.AdapterMonitor], which keeps the
    pre-trained spectrum from the start of training.)
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("the model has no adapters: call inject(model, method, ...) first")
    out = {}
    for name, layer in layers.items():
        w0, w = adapted_weights(layer)
        out[name] = intruder_dimensions(w0, w, k=k, epsilon=epsilon)
    return out


def delta_effective_ranks(model: nn.Module) -> dict[str, float]:
    """Effective rank of every adapter layer's ``delta_weight()``, keyed by layer name."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("the model has no adapters: call inject(model, method, ...) first")
    with torch.no_grad():
        return {name: effective_rank(layer.delta_weight()) for name, layer in layers.items()}


def rank_allocation_matrix(source: Any) -> tuple[list[str], list[int], Tensor]:
    """AdaLoRA's rank per layer at every optimizer step, as a ``(layers, steps + 1)`` matrix.

    Args:
        source: a ``LowRankCallback`` running AdaLoRA, its ``RankAllocator``, or the dict from
            ``RankAllocator.rank_history()``.

    Returns:
        ``(layer names, steps 0..t, ranks)``; the allocator records a row whenever the masks
        change, and the rank between two records is that of the earlier one.
    """
    history = _rank_history(source)
    steps, rows = history["steps"], history["ranks"]
    last = max(steps[-1] if steps else 0, history.get("step", 0))
    matrix = torch.zeros(len(history["layers"]), last + 1, dtype=torch.long)
    for i, (step, ranks) in enumerate(zip(steps, rows, strict=True)):
        end = steps[i + 1] if i + 1 < len(steps) else last + 1
        matrix[:, step:end] = torch.tensor(ranks, dtype=torch.long).unsqueeze(1)
    return list(history["layers"]), list(range(last + 1)), matrix


def _rank_history(source: Any) -> dict[str, Any]:
    if isinstance(source, dict):
        return source
    for candidate in [source, *getattr(source, "schedules", [])]:
        if callable(getattr(candidate, "rank_history", None)):
            return candidate.rank_history()
    raise TypeError("expected a LowRankCallback running AdaLoRA, a RankAllocator or its history")


def plot_rank_allocation(source: Any, ax: Any = None, total_steps: int | None = None) -> Any:
    """Draw AdaLoRA's rank allocation as a heat-map: layers (rows) x optimizer steps (columns).

    Args:
        source: as for [`rank_allocation_matrix`][lightning_lowrank.analysis.rank_allocation_matrix].
        ax: a matplotlib ``Axes`` to draw on; a new figure is made when ``None``.
        total_steps: extend the last recorded pattern up to this step (the pattern is fixed in
            AdaLoRA's final phase, so the record ends early).

    Returns:
        The ``Axes``.
    """
    import matplotlib.pyplot as plt  # lazily: plotting is optional

    names, steps, matrix = rank_allocation_matrix(source)
    if total_steps is not None and total_steps > steps[-1]:
        pad = matrix[:, -1:].expand(-1, total_steps - steps[-1])
        matrix = torch.cat([matrix, pad], dim=1)
    if ax is None:
        _, ax = plt.subplots(figsize=(8, max(2.0, 0.22 * len(names) + 1)))
    image = ax.imshow(matrix.numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_yticks(range(len(names)), labels=names, fontsize=7)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("adapted layer")
    ax.figure.colorbar(image, ax=ax, label="rank")
    return ax
