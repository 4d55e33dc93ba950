"""Module names: the root that PEFT's names are relative to, and PEFT's name patterns.

PEFT names modules relative to the transformers model it wraps. A model here is often a
LightningModule holding that model as an attribute (``self.model``), so by default names are taken
relative to the outermost transformers ``PreTrainedModel`` inside ``model`` (``model`` itself when it
is one, or when it holds none); ``root="model"`` (a submodule name, ``""`` for ``model`` itself)
chooses another.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn


def pretrained_type() -> type | None:
    try:
        from transformers import PreTrainedModel
    except Exception:  # transformers is optional
        return None
    return PreTrainedModel


def outermost_pretrained(model: nn.Module) -> list[str]:
    """Names of the transformers models inside ``model`` that no other one contains."""
    cls = pretrained_type()
    if cls is None:
        return []
    found = [n for n, m in model.named_modules() if isinstance(m, cls)]
    return [n for n in found if not any(inside(n, other) for other in found if other != n)]


def inside(name: str, ancestor: str) -> bool:
    return ancestor == "" or name == ancestor or name.startswith(ancestor + ".")


def relative(name: str, root: str) -> str:
    return name[len(root) + 1 :] if root else name


def absolute(name: str, root: str) -> str:
    return f"{root}.{name}" if root else name


def check_root(model: nn.Module, root: str) -> nn.Module:
    try:
        return model.get_submodule(root) if root else model
    except AttributeError as err:
        raise ValueError(
            f"root={root!r} is not a submodule of the model; pass the attribute path of the "
            "transformers model (e.g. root='model') or '' for the model itself"
        ) from err


def export_root(model: nn.Module, adapted: list[str], root: str | None) -> str:
    if root is not None:
        check_root(model, root)
        outside = [n for n in adapted if not inside(n, root) or n == root]
        if outside:
            raise ValueError(f"root={root!r} does not contain the adapted layers {outside[:3]}")
        return root
    holding = [r for r in outermost_pretrained(model) if all(inside(n, r) for n in adapted)]
    return holding[0] if holding else ""


def import_root(model: nn.Module, names: list[str], root: str | None) -> str:
    if root is not None:
        check_root(model, root)
        return root
    candidates = outermost_pretrained(model)
    if len(candidates) <= 1:
        return candidates[0] if candidates else ""
    fitting = [r for r in candidates if all(has_module(model, absolute(n, r)) for n in names)]
    if len(fitting) == 1:
        return fitting[0]
    raise ValueError(
        f"the model holds several transformers models ({candidates}); pass root=<one of them> to "
        "say which one the PEFT adapter belongs to"
    )


def has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


# --- PEFT's patterns --------------------------------------------------------------------------


def target_modules(root_module: nn.Module, adapted: list[str]) -> list[str]:
    """The shortest ``target_modules`` list that makes PEFT adapt exactly ``adapted``.

    PEFT adapts a module whose name equals an entry or ends with ``"." + entry``; the layers'
    own names (``["query", "value"]``) are used when they select nothing else, full names
    otherwise."""
    wrapped = set(adapted)
    names = [
        n
        for n, _ in root_module.named_modules()
        if n and not any(n.startswith(a + ".") for a in wrapped)
    ]
    short = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    selected = {n for n in names if any(n == t or n.endswith("." + t) for t in short)}
    return short if selected == wrapped else sorted(adapted)


def pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's pattern lookup: the first key ``k`` with ``name`` matching ``(.*\\.)?(k)$``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default
