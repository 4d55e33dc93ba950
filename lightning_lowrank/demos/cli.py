"""LightningCLI entry point for the MiniLM + BBC News demo: configure a run from YAML.

    python -m lightning_lowrank.demos.cli fit --config config.yaml

The model's number of labels is linked to the data module's number of classes, so a config only
chooses the Trainer (with its ``LowRankCallback``), the optimizer settings and the data sizes.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from lightning_lowrank.demos.classifier import TextClassifier
from lightning_lowrank.demos.data import BBCNewsDataModule
from lightning_lowrank.demos.models import load_minilm_classifier
from lightning_lowrank.demos.quiet import quiet_lightning


class MiniLMClassifier(TextClassifier):
    """[`TextClassifier`][lightning_lowrank.demos.TextClassifier] over the pretrained MiniLM, built from plain (YAML) arguments.

    Args:
        num_labels: number of classes (linked to the data module's ``num_classes`` by the CLI).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay of matrices.
        warmup_steps: linear learning-rate warm-up steps.
        seed: seeds the new classification head.
    """

    def __init__(
        self,
        num_labels: int = 5,
        lr: float = 5e-4,
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
        seed: int = 0,
    ) -> None:
        model, _ = load_minilm_classifier(num_labels, seed=seed)
        super().__init__(model, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps)


class DemoCLI(LightningCLI):
    """``LightningCLI`` for ``MiniLMClassifier`` on [`BBCNewsDataModule`][lightning_lowrank.demos.BBCNewsDataModule]."""

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_labels", apply_on="instantiate")


def main(args: list[str] | None = None, run: bool = True) -> DemoCLI:
    """Build (and with ``run=True`` run) the CLI; ``args`` defaults to ``sys.argv[1:]``."""
    quiet_lightning()
    return DemoCLI(
        MiniLMClassifier,
        BBCNewsDataModule,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
