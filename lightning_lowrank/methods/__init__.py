"""One file per parametrisation: a typed config dataclass plus the layer that wraps a base layer.

This package is pure torch: it never imports Lightning.
"""

from __future__ import annotations

from typing import Any

from lightning_lowrank.methods.adalora import AdaLoRA, AdaLoRALayer
from lightning_lowrank.methods.base import AdapterConfig, AdapterLayer
from lightning_lowrank.methods.dora import DoRA, DoRALayer, DoRASingLoRALayer
from lightning_lowrank.methods.lora import LoRA, LoRALayer
from lightning_lowrank.methods.singlora import SingLoRA, SingLoRALayer
from lightning_lowrank.methods.sltrain import SLTrain, SLTrainLayer
from lightning_lowrank.methods.vera import VeRA, VeRALayer

#: every config class, by name, for rebuilding a config from an adapter file's metadata
CONFIG_TYPES: dict[str, type[AdapterConfig]] = {
    cls.__name__: cls for cls in (LoRA, AdaLoRA, DoRA, VeRA, SingLoRA, SLTrain)
}


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
    """Rebuild a method config from :meth:`AdapterConfig.to_dict` output."""
    data = dict(data)
    name = data.pop("type", None)
    if name not in CONFIG_TYPES:
        raise ValueError(f"unknown adapter method {name!r}; known: {sorted(CONFIG_TYPES)}")
    return CONFIG_TYPES[name](**data)


__all__ = [
    "AdaLoRA",
    "AdaLoRALayer",
    "AdapterConfig",
    "AdapterLayer",
    "CONFIG_TYPES",
    "DoRA",
    "DoRALayer",
    "DoRASingLoRALayer",
    "LoRA",
    "LoRALayer",
    "SLTrain",
    "SLTrainLayer",
    "SingLoRA",
    "SingLoRALayer",
    "VeRA",
    "VeRALayer",
    "config_from_dict",
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
