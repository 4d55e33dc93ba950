"""The registry of method configs: every subclass of ``AdapterConfig``, by class name.

``AdapterConfig.__init_subclass__`` calls ``register_config``, so defining a config class (in
the library or in a user's module) is what makes adapter files (``config_from_dict``),
LightningCLI's ``class_path`` and PEFT export find it. A leaf module: it imports nothing else from
the package.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightning_lowrank.methods.base import AdapterConfig

_REGISTRY: dict[str, type[AdapterConfig]] = {}
#: every registered config class by name: a read-only live view, filled as classes are defined
CONFIG_TYPES = MappingProxyType(_REGISTRY)


class ConfigNameClash(TypeError):
    """Two different config classes want the same registry name."""


def register_config(cls: type[AdapterConfig]) -> type[AdapterConfig]:
    """Register ``cls`` under its class name (done for every subclass of [`AdapterConfig`][lightning_lowrank.AdapterConfig]).

    Adapter files store the method by class name, so two classes may not share one. Defining
    the same class again (same module and qualified name: a notebook cell re-run, a module
    reload) replaces the earlier definition instead of raising.

    Raises:
        ConfigNameClash: another class already holds the name.
    """
    name = cls.__name__
    old = _REGISTRY.get(name)
    if old is not None and old is not cls:
        same = (old.__module__, old.__qualname__) == (cls.__module__, cls.__qualname__)
        if not same:
            raise ConfigNameClash(
                f"adapter config name {name!r} is taken by {old.__module__}.{old.__qualname__}; "
                f"adapter files name a method by its class name, so rename "
                f"{cls.__module__}.{cls.__qualname__} (or define it with register=False if it is "
                "never saved or loaded)"
            )
    _REGISTRY[name] = cls
    return cls


__all__ = ["CONFIG_TYPES", "ConfigNameClash", "register_config"]
