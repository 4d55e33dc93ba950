"""Memory-efficient pre-training from scratch with SLTrain's sparse plus low-rank weights."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lightning_lowrank.inject import adapter_layers, inject
from lightning_lowrank.methods.base import Scaling
from lightning_lowrank.methods.sltrain import SLTrain


def sltrain_pretrain(
    model: nn.Module,
    rank: int = 128,
    alpha: float = 32.0,
    density: float = 0.03,
    seed: int = 0,
    target_modules: str | Sequence[str] = "all-linear",
    exclude_modules: str | Sequence[str] | None = None,
    scaling: Scaling = "standard",
) -> list[str]:
    """Re-parametrise ``model``'s linear layers as ``W = s * B @ A + S`` for pre-training.

    The dense weights of the selected layers are removed (their memory is freed); every other
    parameter of the model (embeddings, norms, output head, the adapted layers' biases) stays
    trainable, as in the paper's pre-training runs.

    Args:
        model: a freshly initialised model (any ``nn.Module``).
        rank: r of every low-rank part (the paper pairs r = 128 with 60M-130M models).
        alpha: the numerator of the scale ``s``.
        density: the fraction of each weight's entries that form the sparse part.
        seed: seed of the sparse supports.
        target_modules: which layers to re-parametrise (default: every linear layer except the
            output head).
        exclude_modules: layers to leave dense.
        scaling: ``"standard"`` (``s = alpha / r``) or ``"rslora"`` (``s = alpha / sqrt(r)``).

    Returns:
        The re-parametrised module names.
    """
    config = SLTrain(
        rank=rank, alpha=alpha, density=density, seed=seed, scaling=scaling, mode="pretrain"
    )
    names = inject(model, config, target_modules=target_modules, exclude_modules=exclude_modules)
    inside = {id(p) for layer in adapter_layers(model).values() for p in layer.parameters()}
    for p in model.parameters():
        if id(p) not in inside:
            p.requires_grad_(True)
    return names
