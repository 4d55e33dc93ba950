"""Shared fixtures: tiny randomly initialised models, built from configs (nothing is downloaded)."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# tiny models: one intra-op thread is fastest and keeps tests independent of the machine
torch.set_num_threads(1)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every state-dict entry of ``model`` (for checking that a refusal changed
    nothing)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(
    model: nn.Module, before: dict[str, torch.Tensor], equal_nan: bool = False
) -> None:
    """``model`` holds exactly the entries of ``before``, bit for bit (``equal_nan``: a NaN
    equals a NaN, for models holding deliberately poisoned values)."""
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, equal_nan=equal_nan, msg=key)


class MLP(nn.Module):
    """A plain model with two linear layers, an embedding and a head."""

    def __init__(self, vocab: int = 20, d: int = 12, hidden: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        self.classifier = nn.Linear(d, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.classifier(h.mean(dim=1))


@pytest.fixture
def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP()


def tiny_bert(num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config).eval()


def tiny_llama(hidden_size: int = 16, intermediate_size: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def bert():
    return tiny_bert()


@pytest.fixture
def gpt2():
    return tiny_gpt2()


@pytest.fixture
def llama():
    return tiny_llama()
