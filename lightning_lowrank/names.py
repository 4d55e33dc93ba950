"""Adapter-file names: relative to a model root, so a file fits every wrapping of one model.

An adapter file names each layer relative to the same root ``export_peft`` uses: the outermost
transformers ``PreTrainedModel`` inside the saved module that holds every adapter (the module
itself when it holds none), with ``torch.compile``'s ``_orig_mod.`` components removed. So
``save_adapter(lightning_module)`` writes ``bert.encoder...`` whether the LightningModule holds
the transformers model as ``self.model`` or is compiled, and the file loads into the bare model.

Loading resolves a file's names against the target model: relative to each of its outermost
transformers models, then to the model itself, and, for files written before names were
relative (``model.bert.encoder...``), with leading components that all names share dropped.
The first reading under which every name exists wins.
"""

from __future__ import annotations

from torch import nn

#: the attribute ``torch.compile`` wraps a module's original under
COMPILED = "_orig_mod"


def strip_compiled(name: str) -> str:
    """``name`` without ``torch.compile``'s ``_orig_mod`` components."""
    return ".".join(part for part in name.split(".") if part != COMPILED)


def file_names(model: nn.Module, adapted: list[str]) -> dict[str, str]:
    """``{name in model: name in an adapter file}`` for the adapted layers of ``model``."""
    # imported here: the peft package imports inject, which imports this module
    from lightning_lowrank.peft.names import export_root, relative

    root = export_root(model, adapted, None)
    return {n: strip_compiled(relative(n, root)) for n in adapted}


def _index(model: nn.Module) -> dict[str, str]:
    index: dict[str, str] = {}
    for name, _ in model.named_modules():
        if name:
            # a compiled wrapper and its original share a clean name: the original (longer) wins
            clean = strip_compiled(name)
            if clean not in index or len(name) > len(index[clean]):
                index[clean] = name
    return index


def resolve_file_names(model: nn.Module, names: list[str]) -> dict[str, str] | None:
    """``{name in the file: name in model}``, or None when no reading fits (see the module
    docstring)."""
    from lightning_lowrank.peft.names import absolute, outermost_pretrained

    index = _index(model)
    roots = [strip_compiled(r) for r in outermost_pretrained(model)] + [""]
    parts = [n.split(".") for n in names]
    shared = 0
    while all(len(p) > shared + 1 for p in parts) and len({p[shared] for p in parts}) == 1:
        shared += 1
    for drop in range(shared + 1):
        stripped = [".".join(p[drop:]) for p in parts]
        for root in dict.fromkeys(roots):
            found = [index.get(absolute(s, root)) for s in stripped]
            if all(found):
                return dict(zip(names, found, strict=True))  # type: ignore[arg-type]
    return None
