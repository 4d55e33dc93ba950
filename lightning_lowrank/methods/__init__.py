"""One file per parametrisation: a typed config dataclass plus the layer that wraps a base layer.

Config classes register themselves by class name when they are defined (``methods/registry.py``):
importing a module that defines one, the library's or a user's, is all it takes for adapter files,
LightningCLI's ``class_path`` and PEFT export to find it. This package is pure torch: it never
imports Lightning.
"""

from __future__ import annotations

from typing import Any

from lightning_lowrank.methods.adalora import AdaLoRA, AdaLoRALayer
from lightning_lowrank.methods.base import AdapterConfig, AdapterLayer, PeftExportError, PeftLayer
from lightning_lowrank.methods.dora import DoRA, DoRALayer, DoRASingLoRALayer
from lightning_lowrank.methods.lora import LoRA, LoRALayer
from lightning_lowrank.methods.registry import CONFIG_TYPES, ConfigNameClash, register_config
from lightning_lowrank.methods.singlora import SingLoRA, SingLoRALayer
from lightning_lowrank.methods.sltrain import SLTrain, SLTrainLayer
from lightning_lowrank.methods.vera import VeRA, VeRALayer


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
    """Rebuild a method config from [`AdapterConfig.to_dict`][lightning_lowrank.AdapterConfig.to_dict] output, by its registered name.

    Raises:
        ValueError: no registered config has that name (a user-defined method registers when
            the module that defines it is imported).
    """
    data = dict(data)
    name = data.pop("type", None)
    if name not in CONFIG_TYPES:
        raise ValueError(
            f"unknown adapter method {name!r}; known: {sorted(CONFIG_TYPES)}. A method defined "
            "outside the library registers when its module is imported: import it first"
        )
    return CONFIG_TYPES[name](**data)


__all__ = [
    "AdaLoRA",
    "AdaLoRALayer",
    "AdapterConfig",
    "AdapterLayer",
    "CONFIG_TYPES",
    "ConfigNameClash",
    "DoRA",
    "DoRALayer",
    "DoRASingLoRALayer",
    "LoRA",
    "LoRALayer",
    "PeftExportError",
    "PeftLayer",
    "SLTrain",
    "SLTrainLayer",
    "SingLoRA",
    "SingLoRALayer",
    "VeRA",
    "VeRALayer",
    "config_from_dict",
    "register_config",
]


def _enable_cli_subclasses() -> None:
    # LightningCLI (jsonargparse) treats dataclasses as plain groups of fields; this lets a YAML
    # file pick the method with `class_path: lightning_lowrank.LoRA` and `init_args: {...}`
    try:
        from jsonargparse import set_parsing_settings
    except ImportError:
        return
    set_parsing_settings(subclasses_enabled=[AdapterConfig])


_enable_cli_subclasses()
