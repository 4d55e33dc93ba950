"""The documentation's promises: every public name has a docstring for the API reference, and the
site's navigation only names pages that exist."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest

import lightning_lowrank
import lightning_lowrank.demos

ROOT = Path(__file__).parents[1]


def _public(module):
    return [(f"{module.__name__}.{name}", getattr(module, name)) for name in module.__all__]


@pytest.mark.parametrize(
    "name, obj",
    _public(lightning_lowrank) + _public(lightning_lowrank.demos),
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_public_name_has_its_own_docstring(name, obj):
    if not (inspect.isclass(obj) or callable(obj)):
        pytest.skip(f"{name} is a constant")
    doc = obj.__doc__ or ""
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj):
        # a dataclass without a docstring gets its signature as __doc__
        assert not doc.startswith(obj.__name__ + "("), f"{name} has no docstring"
    assert doc.strip(), f"{name} has no docstring: the API reference would be empty"


def test_nav_names_only_existing_pages():
    config = (ROOT / "mkdocs.yml").read_text()
    nav = config[config.index("\nnav:") :]
    pages = re.findall(r"([\w./-]+\.(?:md|ipynb))\s*$", nav, re.M)
    assert "index.md" in pages and "reference/index.md" in pages
    missing = [p for p in pages if not (ROOT / "docs" / p).exists()]
    assert not missing, f"mkdocs.yml's nav names missing pages: {missing}"
