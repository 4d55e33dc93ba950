"""Adapter files written by earlier code (``tests/fixtures/adapters``) still load to the outputs
they gave when they were written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_lowrank import load_adapter, set_step
from tests.fixtures.adapters.generate import Net

HERE = Path(__file__).parent / "fixtures" / "adapters"
EXPECTED = load_file(HERE / "expected_outputs.safetensors")
NAMES = sorted(k for k in EXPECTED if k != "inputs")
#: the ramp step is training state, not part of the file: the fixture was written at step 4
STEPS = {"singlora_ramp": 4}


def test_every_fixture_file_has_an_expected_output():
    files = {p.stem for p in HERE.glob("*.safetensors")} - {"expected_outputs"}
    assert files == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_old_file_loads_to_the_same_outputs(name):
    model = Net()
    load_adapter(model, HERE / f"{name}.safetensors")
    if name in STEPS:
        set_step(model, STEPS[name])
    with torch.no_grad():
        out = model.eval()(EXPECTED["inputs"])
    # float32, the same products in the same order: equal to rounding
    torch.testing.assert_close(out, EXPECTED[name], rtol=1e-6, atol=1e-6)
