"""One 4-bit code path on every CPU.

On CPUs with AVX512-BF16, bitsandbytes' ``Linear4bit`` repacks its weight on the first eval-mode
forward without gradients (absmax in bfloat16, a kernel layout) and computes with that from then
on, which differs from the dequantized weight by bfloat16 rounding of the absmax; for a layer
narrower than its block size the repack itself fails inside bitsandbytes. The tests here compare
against the dequantized weight to float32 precision, so every layer they build takes the standard
path whatever the CPU; ``test_repack.py`` applies the repack by hand and checks every path that
reads a repacked weight.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _standard_4bit_layout(monkeypatch):
    try:
        from bitsandbytes.nn import modules
    except ImportError:  # the tests that need bitsandbytes skip themselves
        return
    # read by Linear4bit.__init__: layers built from here on never repack themselves
    monkeypatch.setattr(modules, "has_avx512bf16", lambda: False)
