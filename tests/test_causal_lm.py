"""The causal-LM guide's code (lightning_lowrank.demos.causal_lm) on a tiny random Llama."""

from __future__ import annotations

import re
import string
from pathlib import Path

import pytest
import torch

from lightning_lowrank import adapter_layers, load_adapter
from lightning_lowrank.demos.causal_lm import (
    LLAMA_TARGETS,
    CausalLM,
    causal_lm_loader,
    finetune_causal_lm,
    generate,
)
from tests.conftest import tiny_llama

ROOT = Path(__file__).parents[1]


def char_tokenizer():
    """A character-level transformers tokenizer whose 64 ids fit tiny_llama's vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_lowercase + string.ascii_uppercase + " .,:\n\t'"
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({c: i + 3 for i, c in enumerate(chars[:61])})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


TEXTS = [
    "Cynic, n.:\n\tOne who looks through rose glasses.",
    "Bore, n.:\n\tA person who talks when you wish him to listen.",
    "Egotist, n.:\n\tA person more interested in himself than in me.",
    "Year, n.:\n\tA period of disappointments.",
]


def test_loader_masks_padding_and_ends_texts_with_eos():
    tok = char_tokenizer()
    batch = next(iter(causal_lm_loader(tok, ["ab", "abcd"], max_length=16, batch_size=2)))
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert tok.pad_token == tok.eos_token  # set by the loader: Llama tokenizers have none
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert ids[0, 2] == ids[1, 4] == tok.eos_token_id
    assert labels[0].tolist()[3:] == [-100, -100] and torch.equal(labels[1], ids[1])


def test_causal_lm_loss_is_the_mean_next_token_cross_entropy_of_real_tokens():
    model = tiny_llama()
    tok = char_tokenizer()
    batch = next(iter(causal_lm_loader(tok, ["ab", "abcde"], max_length=16, batch_size=2)))
    loss = CausalLM(model)._loss(batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits, -1)
    terms = [
        -logp[b, t - 1, batch["input_ids"][b, t]]
        for b in range(2)
        for t in range(1, batch["input_ids"].shape[1])
        if batch["attention_mask"][b, t]
    ]
    assert len(terms) == 2 + 5  # ("ab" + eos) and ("abcde" + eos), minus each first token
    # transformers computes the loss from float32 logits (it casts them), hence float32 tolerance
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-6)


def test_the_guide_pipeline_trains_merges_saves_and_reloads(tmp_path):
    torch.manual_seed(0)
    model, tok = tiny_llama().train(), char_tokenizer()
    result = finetune_causal_lm(
        model,
        tok,
        TEXTS * 4,
        TEXTS,
        prompt="Cynic, n.:",
        output=tmp_path,
        rank=4,
        alpha=8.0,
        lr=5e-2,
        max_steps=20,
        batch_size=4,
        max_length=48,
        max_new_tokens=8,
        verbose=False,
    )
    # every projection of both decoder blocks, and nothing else
    assert result["layers"] == sorted(
        f"model.model.layers.{i}.{kind}.{t}"
        for i in range(2)
        for kind, t in [("self_attn", t) for t in LLAMA_TARGETS[:4]]
        + [("mlp", t) for t in LLAMA_TARGETS[4:]]
    )
    # A (r x in) and B (out x r) of every layer: q, o 16x16; k, v 16x16 (2 kv heads of 8);
    # gate, up 16->32; down 32->16
    assert result["trainable"] == 2 * 4 * (4 * (16 + 16) + 3 * (16 + 32))
    # it learned the texts; the drop is small because tiny_llama's frozen head (std 0.02 over
    # 16 dimensions) keeps every logit near 0: the loss starts near ln 64 and cannot fall far
    assert result["val_loss_before"] == pytest.approx(
        torch.log(torch.tensor(64.0)).item(), abs=0.05
    )
    assert result["val_loss_after"] < result["val_loss_before"] - 0.05
    assert isinstance(result["generated_after"], str)
    # unload left plain layers; the merged checkpoint reloads to the same logits
    assert not adapter_layers(model)
    assert result["max_logit_difference"] < 1e-5
    # the adapter file alone, loaded into a fresh base, gives the merged model's outputs
    fresh = tiny_llama()
    load_adapter(fresh, result["adapter"])
    probe = tok("Bore, n.:", return_tensors="pt")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            fresh(**probe).logits, model(**probe).logits, rtol=1e-4, atol=1e-5
        )


def test_llama_targets_are_the_projections_all_linear_selects():
    from lightning_lowrank.inject import find_targets

    model = tiny_llama()
    named = find_targets(model, LLAMA_TARGETS)
    assert len(named) == 2 * 7 and set(named) == set(find_targets(model, "all-linear"))
    assert not any("lm_head" in n for n in named)


def test_generate_is_greedy_and_restores_train_mode():
    model, tok = tiny_llama().train(), char_tokenizer()
    tok.pad_token = tok.eos_token
    first = generate(model, tok, "Bore, n.:", max_new_tokens=6)
    assert model.training
    assert first == generate(model, tok, "Bore, n.:", max_new_tokens=6)


def test_the_guide_includes_the_module_code_and_is_in_the_nav():
    page = (ROOT / "docs" / "how-to" / "causal-lm.md").read_text()
    source = (ROOT / "lightning_lowrank" / "demos" / "causal_lm.py").read_text()
    included = re.findall(r'--8<-- "lightning_lowrank/demos/causal_lm\.py:(\w+)"', page)
    sections = re.findall(r"# --8<-- \[start:(\w+)\]", source)
    assert sorted(included) == sorted(sections), "every code section is shown, and only those"
    assert "how-to/causal-lm.md" in (ROOT / "mkdocs.yml").read_text()
