"""lightning_lowrank: low-rank adaptation for PyTorch Lightning, as one callback."""

from lightning_lowrank.analysis import intruder_dimensions
from lightning_lowrank.callback import LowRankCallback
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
from lightning_lowrank.monitor import AdapterMonitor
from lightning_lowrank.optim import lora_plus_param_groups, split_optimizer
from lightning_lowrank.peft import export_peft, import_peft
from lightning_lowrank.pretrain import sltrain_pretrain
from lightning_lowrank.schedules import DeltaLoRA, LoRADrop, RankAllocator, Schedule
from lightning_lowrank.sharing import retie_shared

__version__ = "0.1.0"

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
