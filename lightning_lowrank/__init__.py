"""lightning_lowrank: low-rank adaptation for PyTorch Lightning, as one callback.

The Lightning layer (``LowRankCallback``, ``AdapterMonitor``) is imported on first use, so that
the pure-torch parts (``methods``, ``schedules``, inject, files) load without Lightning.
"""

from typing import TYPE_CHECKING, Any

from lightning_lowrank.analysis import intruder_dimensions
from lightning_lowrank.inject import (
    adapter_layers,
    find_targets,
    inject,
    merge,
    set_step,
    trainable_parameter_count,
    unload,
    unmerge,
)
from lightning_lowrank.io import adapter_state_dict, load_adapter, read_adapter, save_adapter
from lightning_lowrank.methods import (
    AdaLoRA,
    AdapterConfig,
    AdapterLayer,
    DoRA,
    LoRA,
    SingLoRA,
    SLTrain,
    VeRA,
)
from lightning_lowrank.optim import lora_plus_param_groups, split_optimizer
from lightning_lowrank.peft import export_peft, import_peft
from lightning_lowrank.pretrain import sltrain_pretrain
from lightning_lowrank.resume import load_adapter_checkpoint
from lightning_lowrank.schedules import DeltaLoRA, LoRADrop, RankAllocator, Schedule
from lightning_lowrank.sharing import retie_shared

if TYPE_CHECKING:
    from lightning_lowrank.callback import LowRankCallback
    from lightning_lowrank.monitor import AdapterMonitor

__version__ = "0.1.0"

#: names of the Lightning layer, by the module that defines them (imported on first use)
_LIGHTNING_LAYER = {
    "LowRankCallback": "lightning_lowrank.callback",
    "AdapterMonitor": "lightning_lowrank.monitor",
}


def __getattr__(name: str) -> Any:
    if name in _LIGHTNING_LAYER:
        import importlib

        value = getattr(importlib.import_module(_LIGHTNING_LAYER[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_lowrank' has no attribute {name!r}")


__all__ = [
    "AdaLoRA",
    "AdapterConfig",
    "AdapterLayer",
    "AdapterMonitor",
    "DeltaLoRA",
    "DoRA",
    "LoRADrop",
    "LoRA",
    "LowRankCallback",
    "RankAllocator",
    "SLTrain",
    "Schedule",
    "SingLoRA",
    "VeRA",
    "adapter_layers",
    "adapter_state_dict",
    "export_peft",
    "find_targets",
    "import_peft",
    "inject",
    "intruder_dimensions",
    "load_adapter",
    "load_adapter_checkpoint",
    "lora_plus_param_groups",
    "merge",
    "read_adapter",
    "retie_shared",
    "save_adapter",
    "set_step",
    "sltrain_pretrain",
    "split_optimizer",
    "trainable_parameter_count",
    "unload",
    "unmerge",
]
