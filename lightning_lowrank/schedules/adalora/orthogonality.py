"""AdaLoRA's orthogonality regulariser on P and Q, as a loss and as a closed-form gradient.

    R = gamma * mean over matrices of ||Q Q^T - I||_F and ||P^T P - I||_F

Inside a Trainer the rank allocator adds the gradient of ``R`` after the gradients are complete
(and DDP-synced), before the optimizer step, so it acts whatever the user's ``training_step``
returns and is identical on every rank (parameters are).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor

from lightning_lowrank.methods.adalora import AdaLoRALayer
from lightning_lowrank.methods.base import AdapterLayer
from lightning_lowrank.shard import full_tensor, shard_like


def adalora_layers(layers: dict[str, AdapterLayer]) -> dict[str, AdaLoRALayer]:
    """The same mapping, checked to hold only AdaLoRA layers.

    Raises:
        TypeError: a layer is not an ``AdaLoRALayer``, naming up to three of them.
    """
    wrong = [n for n, layer in layers.items() if not isinstance(layer, AdaLoRALayer)]
    if wrong:
        raise TypeError(f"the rank allocator needs AdaLoRA layers; these are not: {wrong[:3]}")
    # the same dict, every value now known to be an AdaLoRALayer (mypy cannot narrow a dict)
    return cast("dict[str, AdaLoRALayer]", layers)


def _factors(layers: dict[str, AdaLoRALayer]) -> list[tuple[Tensor, bool]]:
    """``(matrix, rows_orthonormal)`` for every Q (rows) and P (columns) with at least one slot."""
    mats: list[tuple[Tensor, bool]] = []
    for layer in layers.values():
        if layer.rank > 0:
            mats += [(layer.lora_A, True), (layer.lora_B, False)]
    return mats


def orthogonality_loss(layers: dict[str, AdapterLayer], gamma: float) -> Tensor:
    """``gamma * mean over matrices of ||Q Q^T - I||_F and ||P^T P - I||_F``, differentiable.

    For plain training loops; inside a Trainer the allocator adds the gradient of this term itself
    (``add_orthogonality_grad``), so do not add it to the loss there as well.
    """
    mats = _factors(adalora_layers(layers))
    if not mats:
        raise ValueError("no AdaLoRA layer has a rank slot: nothing to regularise")
    terms = []
    for m, rows in mats:
        gram = m @ m.T if rows else m.T @ m
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        terms.append(torch.linalg.matrix_norm(gram - eye))
    return gamma * torch.stack(terms).mean()


@torch.no_grad()
def add_orthogonality_grad(layers: dict[str, AdapterLayer], gamma: float) -> None:
    """Add the gradient of ``orthogonality_loss`` to the ``.grad`` of every P and Q.

    For ``G = Q Q^T - I`` the gradient of ``||G||_F`` with respect to ``Q`` is ``2 G Q / ||G||_F``
    (``2 P G / ||G||_F`` with ``G = P^T P - I`` for P); each is scaled by ``gamma / n``, ``n`` the
    number of matrices. Only ``(r, r)`` Gram matrices are formed, and matrices of equal shape are
    handled together in batched matmuls (a handful of kernels for a whole model).
    """
    mats = _factors(adalora_layers(layers))
    if not mats or gamma == 0:
        return
    coef = 2.0 * gamma / len(mats)
    groups: dict[tuple, list[Tensor]] = {}
    for m, rows in mats:
        if m.requires_grad:
            groups.setdefault((tuple(m.shape), rows, m.dtype, m.device), []).append(m)
    for (_, rows, _, _), members in groups.items():
        # sharded factors (FSDP2) are gathered: the Gram matrices need every rank slot
        stacked = torch.stack([full_tensor(m.detach()) for m in members])
        # P (out, r) is handled as P^T (r, out): then both are "rows" of shape (k, r, d)
        x = stacked if rows else stacked.transpose(1, 2)
        gram = torch.bmm(x, x.transpose(1, 2))
        gram.diagonal(dim1=1, dim2=2).sub_(1.0)
        # a tensor norm, not .item(): no device synchronisation
        norm = torch.linalg.matrix_norm(gram).clamp_min(torch.finfo(gram.dtype).tiny)
        grad = torch.bmm(gram, x).mul_((coef / norm)[:, None, None])
        if not rows:
            grad = grad.transpose(1, 2)  # (G P^T)^T = P G, G being symmetric
        existing, additions = [], []
        for m, g in zip(members, grad.unbind(0), strict=True):
            g = shard_like(g.contiguous(), m)  # this rank's part of a sharded factor's gradient
            if m.grad is None:
                m.grad = g.clone(memory_format=torch.contiguous_format)
            else:
                existing.append(m.grad)
                additions.append(g)
        if existing:
            torch._foreach_add_(existing, additions)
