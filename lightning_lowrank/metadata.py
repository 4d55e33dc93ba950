"""Checks of an adapter file's JSON metadata before anything is built from it.

An adapter file's metadata (see ``io``) is decoded and its structure checked
here, so that a malformed or foreign file gets one clear ``ValueError`` ("written by a newer
version?") instead of a ``TypeError``, ``KeyError`` or ``RecursionError`` from deep inside the
loader:

- ``method``: an object with a string ``type`` and scalar fields;
- ``layers``: layer name -> object of scalar per-layer facts;
- ``extensions``: layer name -> object with a string ``name`` and scalar facts;
- ``shared``: layer name -> layer name;
- ``quantization``: quantized base layer name -> object of scalar storage facts;
- ``extra``: any JSON object (scheduled methods' state), nested at most ``MAX_DEPTH`` deep.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from lightning_lowrank.methods import config_from_dict
from lightning_lowrank.methods.base import AdapterConfig

#: the deepest nesting accepted in any metadata entry (this library writes at most 4 levels)
MAX_DEPTH = 32

_SCALARS = (str, int, float, bool, type(None))


class MetadataError(ValueError):
    """An adapter file's metadata is malformed, or was written by a newer version."""


def _fail(path: Path | str, what: str) -> MetadataError:
    return MetadataError(
        f"adapter file {path} has malformed metadata: {what}. Was it written by a newer version "
        "of lightning_lowrank (upgrade it), or is the file corrupt?"
    )


def _depth(value: Any) -> int:
    """Nesting depth of decoded JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_DEPTH:
            return depth
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        )
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _decode(raw: dict[str, str], key: str, path: Path | str, required: bool) -> Any:
    if key not in raw:
        if required:
            raise _fail(path, f"the {key!r} entry is missing")
        return {}
    try:
        value = json.loads(raw[key])
    except (json.JSONDecodeError, RecursionError) as err:
        raise _fail(
            path, f"the {key!r} entry is not readable JSON ({type(err).__name__})"
        ) from None
    if _depth(value) > MAX_DEPTH:
        raise _fail(path, f"the {key!r} entry is nested deeper than {MAX_DEPTH} levels")
    if not isinstance(value, dict):
        raise _fail(path, f"the {key!r} entry is a {type(value).__name__}, not an object")
    return value


def _check_facts(entry: str, value: Any, path: Path | str) -> None:
    """``value`` must map layer names to objects of scalar facts."""
    for name, facts in value.items():
        if not isinstance(facts, dict):
            raise _fail(path, f"{entry}[{name!r}] is a {type(facts).__name__}, not an object")
        bad = [k for k, v in facts.items() if not isinstance(v, _SCALARS)]
        if bad:
            raise _fail(path, f"{entry}[{name!r}] has non-scalar values for {bad[:3]}")


def parse_metadata(raw: dict[str, str], path: Path | str) -> dict[str, Any]:
    """Decode and check the metadata entries of an adapter file (entries as listed at the top of this module).

    Raises:
        MetadataError: an entry is missing, not JSON, too deep or of the wrong shape.
    """
    meta = {
        "method": _decode(raw, "method", path, required=True),
        "layers": _decode(raw, "layers", path, required=True),
        "extra": _decode(raw, "extra", path, required=False),
        "extensions": _decode(raw, "extensions", path, required=False),
        "shared": _decode(raw, "shared", path, required=False),
        "quantization": _decode(raw, "quantization", path, required=False),
    }
    method = meta["method"]
    if not isinstance(method.get("type"), str):
        raise _fail(path, "the method entry has no string 'type'")
    bad = [k for k, v in method.items() if not isinstance(v, _SCALARS)]
    if bad:
        raise _fail(path, f"the method's fields {bad[:3]} are not scalars")
    _check_facts("layers", meta["layers"], path)
    _check_facts("extensions", meta["extensions"], path)
    _check_facts("quantization", meta["quantization"], path)
    for name, desc in meta["extensions"].items():
        if not isinstance(desc.get("name"), str):
            raise _fail(path, f"extensions[{name!r}] has no string 'name'")
    shared = meta["shared"]
    if not all(isinstance(v, str) for v in shared.values()):
        raise _fail(path, "the shared entry must map layer names to layer names")
    return meta


def method_from_metadata(method: dict[str, Any], path: Path | str) -> AdapterConfig:
    """The method config a file's ``method`` entry describes, with a clear message when a field
    is unknown (a newer version's) or invalid."""
    try:
        return config_from_dict(method)
    except (TypeError, ValueError) as err:
        problem = f"its method config is invalid ({err})"
    from lightning_lowrank.methods import CONFIG_TYPES

    if method["type"] in CONFIG_TYPES:
        known = {f.name for f in fields(CONFIG_TYPES[method["type"]])}
        unknown = sorted(set(method) - known - {"type"})
        if unknown:
            problem = f"the {method['type']} config has unknown fields {unknown}"
    raise _fail(path, problem)


def build_error(path: Path | str, err: Exception) -> MetadataError:
    """The error for per-layer facts that the layers reject (unknown or ill-typed fields)."""
    return _fail(path, f"its per-layer facts do not fit this version's layers ({err})")


def header_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's JSON header (8-byte little-endian length)."""
    if len(data) < 8:
        raise ValueError("the file is shorter than a safetensors header")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ValueError("the header length exceeds the file")
    header = json.loads(data[8 : 8 + size])
    meta = header.get("__metadata__") or {} if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError("the header's __metadata__ is not a map of strings")
    return meta
