"""lightning_lowrank: low-rank adaptation for PyTorch Lightning, as one callback."""

from lightning_lowrank.analysis import intruder_dimensions
from lightning_lowrank.callback import LowRankCallback
from lightning_lowrank.inject import (
    adapter_layers,
    find_targets,
    inject,
    merge,
    trainable_parameter_count,
    unload,
    unmerge,
)
from lightning_lowrank.io import adapter_state_dict, load_adapter, read_adapter, save_adapter
from lightning_lowrank.methods import AdaLoRA, AdapterConfig, AdapterLayer, LoRA
from lightning_lowrank.monitor import AdapterMonitor
from lightning_lowrank.optim import lora_plus_param_groups, split_optimizer
from lightning_lowrank.peft import export_peft, import_peft
from lightning_lowrank.schedules import RankAllocator, Schedule

__version__ = "0.1.0"

__all__ = [
    "AdaLoRA",
    "AdapterConfig",
    "AdapterLayer",
    "AdapterMonitor",
    "LoRA",
    "LowRankCallback",
    "RankAllocator",
    "Schedule",
    "adapter_layers",
    "adapter_state_dict",
    "export_peft",
    "find_targets",
    "import_peft",
    "inject",
    "intruder_dimensions",
    "load_adapter",
    "lora_plus_param_groups",
    "merge",
    "read_adapter",
    "save_adapter",
    "split_optimizer",
    "trainable_parameter_count",
    "unload",
    "unmerge",
]
