"""The demo hides exactly two start-up messages of its stack, and nothing else."""

from __future__ import annotations

import logging
import warnings

import pytest

from lightning_lowrank.demos.quiet import quiet_lightning

pytree = pytest.importorskip("lightning.pytorch.utilities._pytree")


def _flatten_warnings() -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_lightning()
        pytree._tree_flatten(1)  # Lightning instantiates torch's deprecated LeafSpec here
        warnings.warn("an unrelated future warning", FutureWarning, stacklevel=1)
    return [str(w.message) for w in caught]


def test_leafspec_warning_is_hidden_and_others_are_not():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pytree._tree_flatten(1)
    if not any("LeafSpec" in str(w.message) for w in caught):
        pytest.skip("this torch/Lightning pair does not warn about LeafSpec")
    assert _flatten_warnings() == ["an unrelated future warning"]


def test_litlogger_tip_is_dropped_and_other_records_pass(caplog):
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    quiet_lightning()
    quiet_lightning()  # idempotent: one filter
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    assert sum(type(f).__name__ == "_DropLitLoggerTip" for f in logger.filters) == 1
    with caplog.at_level(logging.INFO, logger=logger.name):
        rank_zero_info("💡 Tip: For seamless cloud logging, try installing [litlogger](x)")
        rank_zero_info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]
