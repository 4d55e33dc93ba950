"""PEFT-format adapter export and import.

An adapter trained here can be loaded wherever Hugging Face PEFT adapters load
(``PeftModel.from_pretrained``, transformers' ``load_adapter``, serving stacks), and a PEFT LoRA or
DoRA adapter can be loaded into a model here. A PEFT adapter directory holds two files:

- ``adapter_config.json``: ``peft_type: "LORA"``, ``r``, ``lora_alpha``, ``target_modules``,
  ``use_rslora``, ``use_dora``, ``fan_in_fan_out`` and the per-layer ``rank_pattern`` /
  ``alpha_pattern``;
- ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight`` ``(r, in)`` and
  ``...lora_B.weight`` ``(out, r)`` for linear layers (GPT-2's ``Conv1D`` too: PEFT stores its
  factors in ``(out, in)`` orientation and sets ``fan_in_fan_out``), ``...lora_embedding_A``
  ``(r, num_embeddings)`` and ``...lora_embedding_B`` ``(embedding_dim, r)`` for embeddings,
  ``...lora_magnitude_vector`` ``(out,)`` for DoRA, and the full weights of ``modules_to_save``
  (e.g. a classifier head) under ``base_model.model.<module>.<parameter>``.

PEFT's layer computes ``base(x) + s * B @ A x`` with ``s = lora_alpha / r`` (``/ sqrt(r)`` with
``use_rslora``), per layer ``r`` and ``lora_alpha`` taken from the patterns when they match. Every
method whose update is a product of two factors maps onto that exactly.

Module names: PEFT names modules relative to the transformers model it wraps. A model here is often
a LightningModule holding that model as an attribute (``self.model``), so by default names are taken
relative to the outermost transformers ``PreTrainedModel`` inside ``model`` (``model`` itself when it
is one, or when it holds none); pass ``root="model"`` (a submodule name, ``""`` for ``model``
itself) to choose another.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from lightning_lowrank.inject import adapter_layers, attach, build_layers
from lightning_lowrank.methods.adalora import AdaLoRALayer
from lightning_lowrank.methods.base import AdapterLayer, layer_kind, layer_shape, scale_factor
from lightning_lowrank.methods.dora import DoRA, DoRALayer, DoRASingLoRALayer
from lightning_lowrank.methods.lora import LoRA, LoRALayer
from lightning_lowrank.methods.singlora import SingLoRALayer
from lightning_lowrank.methods.sltrain import SLTrainLayer
from lightning_lowrank.methods.vera import VeRALayer

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: PeftModel -> LoraModel -> the wrapped model: every key in PEFT's file starts with this
KEY_PREFIX = "base_model.model."


@dataclass
class PeftLayer:
    """One adapted layer in PEFT's LoRA form: ``dW = s * lora_B @ lora_A`` with
    ``s = alpha / r`` (``alpha / sqrt(r)`` if ``rslora``), ``r = lora_A.shape[0]``."""

    kind: str  # "linear", "conv1d" or "embedding"
    lora_A: Tensor  # (r, in)
    lora_B: Tensor  # (out, r)
    alpha: float
    rslora: bool
    magnitude: Tensor | None = None  # DoRA's m, (out,)

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[0])


class PeftExportError(ValueError):
    """The model's adapter has no exact PEFT LoRA form; the message says what to do instead."""


# --- locating the transformers model -------------------------------------------------------------


def _pretrained_type() -> type | None:
    try:
        from transformers import PreTrainedModel
    except Exception:  # transformers is optional
        return None
    return PreTrainedModel


def _outermost_pretrained(model: nn.Module) -> list[str]:
    """Names of the transformers models inside ``model`` that no other one contains."""
    cls = _pretrained_type()
    if cls is None:
        return []
    found = [n for n, m in model.named_modules() if isinstance(m, cls)]
    return [n for n in found if not any(_inside(n, other) for other in found if other != n)]


def _inside(name: str, ancestor: str) -> bool:
    return ancestor == "" or name == ancestor or name.startswith(ancestor + ".")


def _relative(name: str, root: str) -> str:
    return name[len(root) + 1 :] if root else name


def _absolute(name: str, root: str) -> str:
    return f"{root}.{name}" if root else name


def _check_root(model: nn.Module, root: str) -> nn.Module:
    try:
        return model.get_submodule(root) if root else model
    except AttributeError as err:
        raise ValueError(
            f"root={root!r} is not a submodule of the model; pass the attribute path of the "
            "transformers model (e.g. root='model') or '' for the model itself"
        ) from err


def _export_root(model: nn.Module, adapted: list[str], root: str | None) -> str:
    if root is not None:
        _check_root(model, root)
        outside = [n for n in adapted if not _inside(n, root) or n == root]
        if outside:
            raise ValueError(f"root={root!r} does not contain the adapted layers {outside[:3]}")
        return root
    holding = [r for r in _outermost_pretrained(model) if all(_inside(n, r) for n in adapted)]
    return holding[0] if holding else ""


def _import_root(model: nn.Module, names: list[str], root: str | None) -> str:
    if root is not None:
        _check_root(model, root)
        return root
    candidates = _outermost_pretrained(model)
    if len(candidates) <= 1:
        return candidates[0] if candidates else ""
    fitting = [r for r in candidates if all(_has_module(model, _absolute(n, r)) for n in names)]
    if len(fitting) == 1:
        return fitting[0]
    raise ValueError(
        f"the model holds several transformers models ({candidates}); pass root=<one of them> to "
        "say which one the PEFT adapter belongs to"
    )


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


# --- export --------------------------------------------------------------------------------------


def _pair(
    b: Tensor, a: Tensor, c: Tensor | float, alpha: float, rslora: bool, kind: str | None
) -> PeftLayer:
    """PEFT's pair for ``dW = c * b @ a`` under PEFT's scale for ``alpha`` and ``r = a.shape[0]``:
    ``c`` differs from that scale (a ramp, a fixed AdaLoRA scale) only by a factor folded into A."""
    s_peft = scale_factor(alpha, a.shape[0], "rslora" if rslora else "standard")
    c = float(c)
    if c != s_peft:
        a = a * (c / s_peft)
    return PeftLayer(kind=kind or "linear", lora_A=a, lora_B=b, alpha=alpha, rslora=rslora)


def _lora_form(layer: LoRALayer) -> PeftLayer:
    # LoRA, rsLoRA, LoRA-FA (a frozen A is still a plain pair) and LoRA-drop (each sharing layer
    # writes its own copy of the shared pair) map one to one
    return _pair(
        layer.lora_B,
        layer.lora_A,
        layer.scale,
        layer.alpha,
        layer.config.scaling == "rslora",
        layer.kind,
    )


def _singlora_form(layer: SingLoRALayer) -> PeftLayer:
    # dW = s u(t) A[:out] A[:in]^T is the pair B = A[:out], A' = u(t) A[:in]^T: exact on square and
    # non-square layers alike, the ramp's current value folded into A'
    b, a, c = layer.low_rank_factors()
    cfg = layer.config
    return _pair(b, a, c, cfg.alpha, cfg.scaling == "rslora", layer.kind)


def _adalora_form(layer: AdaLoRALayer) -> PeftLayer | None:
    # dW = s P diag(lambda) Q over the slots in use: the kept slots, and any slot whose lambda is
    # non-zero (so the export is exact mid-schedule too). lambda goes into A; the scale stays
    # s = alpha / r_init through a per-layer alpha = s * r_kept
    keep = (layer.rank_mask != 0) | (layer.lora_E != 0)
    k = int(keep.sum())
    if k == 0:
        return None
    a = layer.lora_E[keep, None] * layer.lora_A[keep]
    return _pair(layer.lora_B[:, keep], a, layer.scale, layer.scale * k, False, layer.kind)


def _vera_form(layer: VeRALayer) -> PeftLayer:
    # dW = diag(b) B diag(d) A is the pair (diag(b) B[:out], diag(d) A[:, :in]) at VeRA's rank with
    # scale 1 (alpha = r): exact, though the file holds dense factors, not just b and d
    b, a = layer.factors()
    r = a.shape[0]
    return _pair(
        layer.vera_lambda_b[:, None] * b,
        layer.vera_lambda_d[:, None] * a,
        1.0,
        float(r),
        False,
        layer.kind,
    )


def _dora_form(layer: DoRALayer | DoRASingLoRALayer) -> PeftLayer:
    # PEFT's DoRA is m * (W0 + dW) / ||W0 + dW||_row over a LoRA pair, as here; the delta under the
    # magnitude (LoRA's or SingLoRA's) is a pair with its scale c folded as for those methods
    b, a, c = layer.delta_factors()
    alpha = layer.alpha if isinstance(layer, LoRALayer) else layer.config.alpha
    form = _pair(b, a, c, alpha, layer.config.scaling == "rslora", layer.kind)
    form.magnitude = layer.magnitude
    return form


def _peft_form(name: str, layer: AdapterLayer) -> PeftLayer | None:
    """The exact PEFT LoRA form of one layer; ``None`` when its update is zero by construction
    (a LoRA-drop dropped layer, an AdaLoRA layer with every slot pruned)."""
    if getattr(layer, "extension", None) is not None:
        raise PeftExportError(
            f"layer {name!r} carries a {type(layer.extension).__name__} extension (Delta-LoRA): "
            "it changes the base weight itself, which a PEFT adapter cannot carry. Call "
            "unload(model) and save the merged model (save_pretrained) instead"
        )
    if getattr(layer, "dropped", False):
        return None
    # exact classes, most specific first: a subclass must never pass as its parent
    kind = type(layer)
    if kind in (DoRALayer, DoRASingLoRALayer):
        return _dora_form(layer)
    if kind is LoRALayer:
        return _lora_form(layer)
    if kind is SingLoRALayer:
        return _singlora_form(layer)
    if kind is AdaLoRALayer:
        return _adalora_form(layer)
    if kind is VeRALayer:
        return _vera_form(layer)
    if kind is SLTrainLayer:
        raise PeftExportError(
            f"layer {name!r} is SLTrain: its sparse part S is a full-rank update that PEFT's LoRA "
            "format cannot hold. Call unload(model) and save the merged model (save_pretrained) "
            "instead"
        )
    raise PeftExportError(
        f"layer {name!r} uses {type(layer).__name__}, which has no PEFT LoRA form: call "
        "unload(model) and save the merged model (save_pretrained) instead"
    )


def _peft_target_modules(root_module: nn.Module, adapted: list[str]) -> list[str]:
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


def _modules_to_save(
    model: nn.Module, root: str, adapted: list[str]
) -> tuple[list[str], dict[str, Tensor]]:
    """Trainable modules outside the adapters (e.g. a new classifier head): PEFT's
    ``modules_to_save``, written whole. Returns their names and tensors, relative to ``root``."""
    owners: set[str] = set()
    for pname, p in model.named_parameters():
        if not p.requires_grad or any(_inside(pname, a) for a in adapted):
            continue
        owner = pname.rpartition(".")[0]
        if not _inside(owner, root) or owner == root:
            warnings.warn(
                f"trainable parameter {pname!r} is not in a submodule of {root or 'the model'!r}: "
                "PEFT's modules_to_save cannot hold it, so it is not exported",
                stacklevel=3,
            )
            continue
        owners.add(owner)
    tensors: dict[str, Tensor] = {}
    for owner in sorted(owners):
        if any(_inside(a, owner) for a in adapted):
            raise PeftExportError(
                f"module {owner!r} has trainable parameters and also contains adapted layers: "
                "PEFT saves such a module whole, adapters included. Freeze its own parameters or "
                "unload(model) and save the merged model"
            )
        for key, value in model.get_submodule(owner).state_dict().items():
            tensors[f"{_relative(owner, root)}.{key}"] = value
    return [_relative(o, root) for o in sorted(owners)], tensors


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's pattern lookup: the first key ``k`` with ``name`` matching ``(.*\\.)?(k)$``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _patterns(
    forms: dict[str, PeftLayer], r: int, alpha: float
) -> tuple[dict[str, int], dict[str, float]]:
    """``rank_pattern`` and ``alpha_pattern`` for the layers whose rank or alpha is not the
    default. PEFT's keys are regexes matched at the end of a name, so a plain name can also match
    a layer whose name ends with it; then every key is anchored (``^`` and escaped)."""
    for anchored in (False, True):
        key = (lambda n: "^" + re.escape(n)) if anchored else (lambda n: n)
        ranks = {key(n): f.rank for n, f in forms.items() if f.rank != r}
        alphas = {key(n): f.alpha for n, f in forms.items() if f.alpha != alpha}
        if all(
            _pattern_value(ranks, n, r) == f.rank and _pattern_value(alphas, n, alpha) == f.alpha
            for n, f in forms.items()
        ):
            return ranks, alphas
    raise PeftExportError("the per-layer ranks cannot be written as PEFT patterns")  # unreachable


def peft_adapter(
    model: nn.Module, root: str | None = None
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The model's adapter as PEFT's ``(adapter_config, tensors)``, without writing anything.

    Raises:
        PeftExportError: a layer's method has no exact PEFT form (the message says what to do).
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("the model has no adapters: call inject(model, method, ...) first")
    adapted = list(layers)
    root = _export_root(model, adapted, root)
    with torch.no_grad():
        forms = {_relative(n, root): _peft_form(n, layer) for n, layer in layers.items()}
    forms = {n: f for n, f in forms.items() if f is not None}
    if not forms:
        raise PeftExportError(
            "every adapted layer has a zero update (rank 0 after pruning): there is nothing to export"
        )
    flags = {(f.rslora, f.magnitude is not None) for f in forms.values()}
    if len(flags) > 1:
        raise PeftExportError(
            "the layers mix scaling rules or DoRA with plain LoRA, which one PEFT config cannot "
            "express: export each part separately or unload(model) and save the merged model"
        )
    rslora, dora = flags.pop()

    # the most common rank and alpha are the defaults; the other layers go into the patterns
    r = Counter(f.rank for f in forms.values()).most_common(1)[0][0]
    alpha = Counter(f.alpha for f in forms.values()).most_common(1)[0][0]
    rank_pattern, alpha_pattern = _patterns(forms, r, alpha)
    root_module = _check_root(model, root)
    save_names, save_tensors = _modules_to_save(model, root, adapted)

    tensors: dict[str, Tensor] = {}
    for name, f in forms.items():
        key = KEY_PREFIX + name
        if f.kind == "embedding":
            tensors[f"{key}.lora_embedding_A"] = f.lora_A
            tensors[f"{key}.lora_embedding_B"] = f.lora_B
        else:
            tensors[f"{key}.lora_A.weight"] = f.lora_A
            tensors[f"{key}.lora_B.weight"] = f.lora_B
        if f.magnitude is not None:
            tensors[f"{key}.lora_magnitude_vector"] = f.magnitude
    for name, value in save_tensors.items():
        tensors[KEY_PREFIX + name] = value
    # storage shared between layers (LoRA-drop) or with the model must be written as copies
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}

    dropout = {getattr(layer.config, "dropout", 0.0) for layer in layers.values()}
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(
            getattr(root_module, "config", None), "name_or_path", None
        )
        or None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": float(max(dropout)),
        "use_rslora": rslora,
        "use_dora": dora,
        "target_modules": _peft_target_modules(root_module, list(forms)),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        # PEFT reads the base weight of a Conv1D as (in, out) only when this is set
        "fan_in_fan_out": any(f.kind == "conv1d" for f in forms.values()),
        "modules_to_save": save_names or None,
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
    }
    return config, tensors


def export_peft(model: nn.Module, directory: str | os.PathLike, root: str | None = None) -> Path:
    """Write the model's adapter as a PEFT LoRA adapter directory.

    Writes ``adapter_config.json`` and ``adapter_model.safetensors`` so that
    ``PeftModel.from_pretrained(base, directory)`` on the same base model computes what ``model``
    computes. Everything is converted and checked before anything is written: a model whose
    adapter has no exact PEFT form raises and leaves ``directory`` untouched.

    Args:
        model: a model with injected adapters (a LightningModule, a transformers model, ...).
        directory: the adapter directory to write (created if missing; the two files are
            replaced atomically).
        root: the submodule that PEFT's names are relative to; default: the outermost transformers
            model inside ``model`` that holds every adapter, else ``model`` itself.

    Returns:
        The directory written.

    Raises:
        PeftExportError: a layer's method has no exact PEFT form; the message says what to do.
    """
    config, tensors = peft_adapter(model, root)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(
        directory / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"})
    )
    text = json.dumps(config, indent=2, sort_keys=True)
    _atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(text + "\n"))
    return directory


def _atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --- import --------------------------------------------------------------------------------------

#: PEFT config entries this importer cannot honour, with the value meaning "not used"
_UNSUPPORTED = {
    "layer_replication": None,
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_qalora": False,
    "use_bdlora": None,
    "lora_bias": False,
    "megatron_config": None,
}
#: PEFT initialisations that rewrite the base weights (the saved adapter then needs that residual
#: base unless PEFT converted it to a plain LoRA adapter, which resets init_lora_weights to True)
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
#: PEFT's tensor names and what each one is: factor A, factor B or DoRA's magnitude m
_SUFFIXES = {
    "lora_A.weight": "A",
    "lora_B.weight": "B",
    "lora_embedding_A": "A",
    "lora_embedding_B": "B",
    "lora_magnitude_vector": "m",
    "lora_magnitude_vector.weight": "m",  # the key of older PEFT versions
}


def read_peft(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read a PEFT adapter directory into ``(adapter_config, tensors)``.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: a file is corrupt, or the adapter is pickled (``adapter_model.bin``).
    """
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: is it a PEFT adapter directory?")
    if not weights_path.is_file():
        if (directory / "adapter_model.bin").is_file():
            raise ValueError(
                f"{directory} holds a pickled adapter_model.bin, which is never loaded (pickle can "
                "run code): convert it to adapter_model.safetensors with PEFT's save_pretrained"
            )
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path} is not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} does not hold a JSON object")
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{weights_path} is not a valid safetensors file ({err})") from err
    return config, tensors


def _check_config(config: dict[str, Any], directory: Path) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(
            f"{directory} is a {peft_type} adapter; only PEFT LoRA adapters (peft_type 'LORA', "
            "with or without use_dora) can be imported: merge it in PEFT (merge_and_unload) instead"
        )
    for key, unused in _UNSUPPORTED.items():
        value = config.get(key, unused)
        if value not in (unused, None, False, {}, []):
            raise ValueError(
                f"{directory}: adapter_config {key}={value!r} is not supported here; merge the "
                "adapter in PEFT (merge_and_unload) and load the merged model instead"
            )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise ValueError(
            f"{directory}: init_lora_weights={init!r} changed the base weights when the adapter "
            "was created, so the adapter does not apply to the original base model. Convert it in "
            "PEFT first (save_pretrained(..., path_initial_model_for_weight_conversion=...)) or "
            "merge it there (merge_and_unload)"
        )
    if config.get("bias", "none") != "none":
        raise ValueError(
            f"{directory}: bias={config['bias']!r} adapters train base biases, which is not "
            "supported here; merge the adapter in PEFT (merge_and_unload) instead"
        )
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise ValueError(f"{directory}: adapter_config {key} must be a positive number")


@dataclass
class _Planned:
    name: str  # absolute module name in the model
    kind: str
    tensors: dict[str, Tensor]  # "A", "B", optionally "m"
    rank: int
    alpha: float


def _plan(
    model: nn.Module,
    config: dict[str, Any],
    tensors: dict[str, Tensor],
    directory: Path,
    root: str | None,
) -> tuple[str, dict[str, _Planned], dict[str, Tensor]]:
    """Check every key, shape and value against the model; change nothing."""
    bad = [k for k in tensors if not k.startswith(KEY_PREFIX)]
    if bad:
        raise ValueError(
            f"{directory}: keys {bad[:3]} do not start with {KEY_PREFIX!r}: not a PEFT LoRA file"
        )
    grouped: dict[str, dict[str, Tensor]] = {}
    others: dict[str, Tensor] = {}
    for key, value in tensors.items():
        key = key[len(KEY_PREFIX) :]
        for suffix in _SUFFIXES:
            if key.endswith("." + suffix):
                module = key[: -len(suffix) - 1]
                grouped.setdefault(module, {})[suffix] = value
                break
        else:
            others[key] = value
    if not grouped:
        raise ValueError(f"{directory} holds no LoRA tensors")
    root = _import_root(model, list(grouped), root)
    dora = bool(config.get("use_dora", False))
    r0, alpha0 = int(config["r"]), float(config["lora_alpha"])
    rank_pattern, alpha_pattern = (
        config.get("rank_pattern") or {},
        config.get("alpha_pattern") or {},
    )

    planned: dict[str, _Planned] = {}
    for module, parts in grouped.items():
        name = _absolute(module, root)
        if not _has_module(model, name):
            raise ValueError(
                f"{directory} adapts {module!r}, which this model lacks (looked under "
                f"root={root!r}): load it into the base model the adapter was trained on, or pass "
                "root=<submodule> if it was trained on a part of this model (e.g. its backbone)"
            )
        base = model.get_submodule(name)
        kind = layer_kind(base)
        if kind is None:
            raise ValueError(
                f"{directory} adapts {module!r}, a {type(base).__name__}: only nn.Linear, Conv1D and "
                "nn.Embedding layers can be loaded here; merge the adapter in PEFT instead"
            )
        family = "embedding" if kind == "embedding" else "linear"
        prefix = "lora_embedding_" if family == "embedding" else "lora_"
        a_key = f"{prefix}A" if family == "embedding" else "lora_A.weight"
        b_key = f"{prefix}B" if family == "embedding" else "lora_B.weight"
        m_keys = [k for k in parts if _SUFFIXES[k] == "m"]
        expected = {a_key, b_key} | (
            {m_keys[0] if m_keys else "lora_magnitude_vector"} if dora else set()
        )
        if set(parts) != expected:
            raise ValueError(
                f"{directory}: {module!r} ({kind}) has tensors {sorted(parts)} but "
                f"{sorted(expected)} are expected (use_dora={dora})"
            )
        out_f, in_f = layer_shape(base)
        a, b = parts[a_key], parts[b_key]
        rank = int(a.shape[0]) if a.dim() == 2 else -1
        want = {a_key: (rank, in_f), b_key: (out_f, rank)}
        if dora:
            want[m_keys[0]] = (out_f,)
        for key, shape in want.items():
            value = parts[key]
            if tuple(value.shape) != shape or rank < 1:
                raise ValueError(
                    f"{directory}: {module}.{key} has shape {tuple(value.shape)}, but the layer "
                    f"(out={out_f}, in={in_f}) needs {shape}: another base model size?"
                )
            if not value.is_floating_point() or not torch.isfinite(value).all():
                raise ValueError(
                    f"{directory}: {module}.{key} holds non-finite or non-float values"
                )
        if int(_pattern_value(rank_pattern, module, r0)) != rank:
            raise ValueError(
                f"{directory}: {module} has rank {rank} in the weights but "
                f"{_pattern_value(rank_pattern, module, r0)} in adapter_config (r / rank_pattern)"
            )
        planned[name] = _Planned(
            name=name,
            kind=kind,
            tensors={"A": a, "B": b, **({"m": parts[m_keys[0]]} if dora else {})},
            rank=rank,
            alpha=float(_pattern_value(alpha_pattern, module, alpha0)),
        )

    # modules_to_save: whole modules (e.g. a classifier head) stored under their own names
    state = _check_root(model, root).state_dict()
    extra: dict[str, Tensor] = {}
    for key, value in others.items():
        if key not in state:
            raise ValueError(
                f"{directory}: unexpected key {KEY_PREFIX + key!r}: neither a LoRA tensor nor a "
                "parameter of this model"
            )
        if tuple(value.shape) != tuple(state[key].shape):
            raise ValueError(
                f"{directory}: {key} has shape {tuple(value.shape)} but the model's is "
                f"{tuple(state[key].shape)}"
            )
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"{directory}: {key} holds non-finite values")
        extra[_absolute(key, root)] = value
    return root, planned, extra


def _method(config: dict[str, Any]) -> LoRA | DoRA:
    kwargs = {
        "rank": int(config["r"]),
        "alpha": float(config["lora_alpha"]),
        "dropout": float(config.get("lora_dropout", 0.0) or 0.0),
        "scaling": "rslora" if config.get("use_rslora", False) else "standard",
    }
    return DoRA(**kwargs) if config.get("use_dora", False) else LoRA(**kwargs)


def import_peft(
    model: nn.Module, directory: str | os.PathLike, root: str | None = None
) -> list[str]:
    """Load a PEFT LoRA or DoRA adapter directory into ``model``.

    Injects the matching adapters (``LoRA`` or ``DoRA`` with PEFT's ``r``, ``lora_alpha``,
    ``lora_dropout`` and ``use_rslora``; per-layer ranks and alphas from ``rank_pattern`` /
    ``alpha_pattern``) into the modules named in the file, copies the factors in, and loads the
    whole modules of ``modules_to_save`` (left trainable). Every key, shape and value is checked
    before the model is changed: a file that does not fit raises and leaves the model untouched.

    Args:
        model: a model without adapters, holding the base model the adapter was trained on.
        directory: a PEFT adapter directory (``adapter_config.json`` and
            ``adapter_model.safetensors``).
        root: the submodule that PEFT's names are relative to; default: the outermost transformers
            model inside ``model`` (``model`` itself if it holds none).

    Returns:
        The adapted module names (qualified from ``model``).
    """
    directory = Path(directory)
    config, tensors = read_peft(directory)
    _check_config(config, directory)
    if adapter_layers(model):
        raise ValueError(
            "the model already has adapters: call unload(model) or import into a fresh base model"
        )
    root, planned, extra = _plan(model, config, tensors, directory, root)
    method = _method(config)
    layer_meta = {
        n: {
            **({"rank": p.rank} if p.rank != method.rank else {}),
            **({"alpha": p.alpha} if p.alpha != method.alpha else {}),
        }
        for n, p in planned.items()
    }
    exact = "|".join(re.escape(n) for n in planned)
    layers = build_layers(model, method, exact, layer_meta=layer_meta)
    names = {"A": "lora_A", "B": "lora_B", "m": "magnitude"}
    for name, p in planned.items():
        own = layers[name].adapter_state_dict()
        for part, value in p.tensors.items():
            if tuple(own[names[part]].shape) != tuple(value.shape):
                raise ValueError(f"{directory}: {name} does not fit the layer built for it")
    owners = sorted({k.rpartition(".")[0] for k in extra})
    attach(model, layers, train_modules=None)
    with torch.no_grad():
        for name, p in planned.items():
            own = layers[name].adapter_state_dict()
            for part, value in p.tensors.items():
                own[names[part]].copy_(value.to(own[names[part]].dtype))
        state = model.state_dict()
        for key, value in extra.items():
            state[key].copy_(value.to(state[key].dtype))
    for owner in owners:
        for param in model.get_submodule(owner).parameters():
            param.requires_grad_(True)
    return list(layers)
