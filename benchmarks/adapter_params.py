"""Trainable parameter counts of every method on an all-MiniLM-L6-v2-shaped BERT, by injection.

The model is built from a config with MiniLM's shape (6 layers, hidden 384, intermediate 1536,
12 heads), randomly initialised: parameter counts do not depend on the weights. Run with
``python -m benchmarks.adapter_params``.
"""

from __future__ import annotations

import torch
from transformers import BertConfig, BertModel

from lightning_lowrank import (
    DoRA,
    LoRA,
    SingLoRA,
    SLTrain,
    VeRA,
    adapter_layers,
    inject,
    trainable_parameter_count,
)

METHODS = {
    "LoRA": LoRA(rank=8),
    "LoRA-FA": LoRA(rank=8, train_a=False),
    "DoRA": DoRA(rank=8),
    "VeRA": VeRA(rank=8),
    "SingLoRA": SingLoRA(rank=8),
    "SLTrain (density 0.03)": SLTrain(rank=8, density=0.03),
}


def minilm_shaped() -> BertModel:
    config = BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
    )
    return BertModel(config, add_pooling_layer=True)


def counts(exclude_pooler: bool) -> dict[str, tuple[int, int]]:
    """``{method: (adapted layers, trainable parameters)}`` for every linear layer."""
    out = {}
    for name, method in METHODS.items():
        torch.manual_seed(0)
        model = minilm_shaped()
        inject(
            model,
            method,
            "all-linear",
            exclude_modules=["pooler.dense"] if exclude_pooler else None,
        )
        out[name] = (len(adapter_layers(model)), trainable_parameter_count(model))
    return out


def main() -> None:
    torch.set_num_threads(1)
    total = sum(p.numel() for p in minilm_shaped().parameters())
    print(f"MiniLM-shaped BERT: {total:,} parameters")
    for exclude_pooler in (True, False):
        label = "36 encoder linear layers" if exclude_pooler else "encoder + pooler (37 layers)"
        print(f"\nr = 8, {label}:")
        print(f"{'method':<24}{'layers':>7}{'trainable':>12}{'% of model':>12}")
        for name, (layers, n) in counts(exclude_pooler).items():
            print(f"{name:<24}{layers:>7}{n:>12,}{100 * n / total:>11.3f}%")


if __name__ == "__main__":
    main()
