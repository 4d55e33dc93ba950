"""PEFT adapter directories: file names, reading, and the config checks an import relies on."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import Tensor

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: PeftModel -> LoraModel -> the wrapped model: every key in PEFT's file starts with this
KEY_PREFIX = "base_model.model."

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
SUFFIXES = {
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


def check_config(config: dict[str, Any], directory: Path) -> None:
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
    _check_positive(directory, "r", config.get("r"), integer=True)
    _check_positive(directory, "lora_alpha", config.get("lora_alpha"), integer=False)
    for key, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise ValueError(f"{directory}: adapter_config {key} must be an object")
        for pattern, value in patterns.items():
            _check_positive(directory, f"{key}[{pattern!r}]", value, integer)


def _check_positive(directory: Path, key: str, value: Any, integer: bool) -> None:
    """A finite positive number (an integer for ranks), as PEFT writes them."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and value > 0
    if ok and integer:
        ok = float(value).is_integer()
    if not ok:
        kind = "a positive integer" if integer else "a finite positive number"
        raise ValueError(f"{directory}: adapter_config {key} must be {kind}, got {value!r}")
