"""LoRA-drop's table and plot (``schedules/lora_drop/report.py``) and how they reach the log."""

from __future__ import annotations

import logging

import pytest

from lightning_lowrank import LoRA, LoRADrop, inject
from tests.schedules.lora_drop.helpers import (
    TARGETS,
    Stack,
    StackModule,
    callback,
    switched,
    trainer,
)


def test_report_table_and_plot():
    import matplotlib

    matplotlib.use("Agg")
    _, _, schedule = switched()
    schedule.switch()
    table = schedule.report()
    assert "kept 2 of 5 layers" in table
    lines = table.splitlines()
    assert lines[2].startswith("blocks.0") and lines[2].endswith("kept")  # most important first
    assert "shared #0 (3 layers)" in table
    ax = schedule.plot()
    assert len(ax.patches) == 5
    assert ax.get_legend() is not None


def test_the_table_is_handed_to_the_caller_once():
    _, _, schedule = switched()
    schedule.log_table = True
    assert schedule.pop_messages() == []
    schedule.switch()
    assert schedule.pop_messages() == [schedule.report()]
    assert schedule.pop_messages() == []


def test_warns_about_a_sampling_phase_longer_than_the_run():
    model = Stack()
    layers = {n: model.get_submodule(n) for n in inject(model, LoRA(rank=2), TARGETS)}
    with pytest.warns(UserWarning, match="sample_steps"):
        LoRADrop(sample_steps=10).setup(model, layers, 9)
    with pytest.raises(ValueError, match="threshold"):
        LoRADrop(threshold=0.0)


@pytest.mark.slow
def test_the_callback_logs_the_table_at_the_switch(caplog):
    schedule = LoRADrop(threshold=0.6, sample_steps=2, log_table=True)
    with caplog.at_level(logging.INFO):
        trainer(3, callback(schedule)).fit(StackModule())
    assert schedule.phase == "switched"
    assert sum("LoRA-drop (threshold 0.6" in r.getMessage() for r in caplog.records) == 1
