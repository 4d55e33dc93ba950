"""A user's own LoRA variant, in the user's own module: no library file names it.

``MyLoRA`` adds a field of its own, ``a_std``, and its layer draws A from ``N(0, a_std^2)``
instead of LoRA's Kaiming-uniform and keeps a per-layer constant (``fan_in``, a buffer, so adapter
files carry it). Importing this module registers ``MyLoRA``; everything else (inject, train,
save/load, PEFT export, LightningCLI's ``class_path``) follows from the protocol.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lightning_lowrank import LoRA
from lightning_lowrank.methods import LoRALayer


class MyLoRALayer(LoRALayer):
    """LoRA with A drawn from ``N(0, a_std^2)`` and the layer's fan-in kept as a buffer."""

    def __init__(self, base: nn.Module, config: MyLoRA, **kwargs) -> None:
        super().__init__(base, config, **kwargs)
        with torch.no_grad():
            self.lora_A.normal_(0.0, config.a_std)
        self.register_buffer("fan_in", torch.tensor(float(self.in_features)))

    def initial_state(self) -> dict[str, torch.Tensor]:
        # what reset_parameters re-draws (a meta-device model, once materialised): this
        # variant's own init, not LoRA's
        state = super().initial_state()
        state["lora_A"].normal_(0.0, self.config.a_std)
        state["fan_in"] = torch.tensor(float(self.in_features))
        return state


@dataclass
class MyLoRA(LoRA):
    """LoRA whose A starts as ``N(0, a_std^2)``.

    Args:
        a_std: the standard deviation of A at initialisation.
    """

    a_std: float = 0.02

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.a_std <= 0:
            raise ValueError(f"a_std must be positive, got {self.a_std}")


MyLoRA.layer_cls = MyLoRALayer
