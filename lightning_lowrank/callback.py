"""``LowRankCallback``: turns any LightningModule into a low-rank fine-tuning run.

The callback is a thin Lightning layer over ``inject``, ``optim`` and ``schedules``:

- ``setup``: builds the module's layers if it uses ``configure_model`` (which must be idempotent),
  injects the adapters and freezes the base, before the strategy wraps the model and before
  ``configure_optimizers`` runs;
- ``on_fit_start``: splits the optimizer into LoRA+ groups when ``lr_ratio`` is set (before any
  optimizer state is restored, so resumed states line up);
- once per optimizer step (never per micro-batch): tells every layer the step count (SingLoRA's
  ramp) and runs the scheduled methods, logging what they report (LoRA-drop's table) on rank zero;
- checkpoints: adapter-only by default (frozen base weights are dropped; loading is non-strict for
  exactly those keys), with the schedules' state so a resumed run continues exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.optim import Optimizer
from typing_extensions import override

from lightning_lowrank.inject import adapter_layers, inject, trainable_parameter_count
from lightning_lowrank.methods.base import AdapterConfig, AdapterLayer
from lightning_lowrank.optim import split_optimizer
from lightning_lowrank.quant.model import quantized_state_keys
from lightning_lowrank.quant.spec import QuantizeSpec, resolve
from lightning_lowrank.schedules import DeltaLoRA, RankAllocator, Schedule, default_schedules


class LowRankCallback(Callback):
    """Fine-tune a LightningModule with a low-rank adapter method.

    Args:
        method: a method config: ``LoRA``, ``DoRA``, ``VeRA``, ``SingLoRA``, ``AdaLoRA``, ``SLTrain``.
        target_modules: which layers to adapt: a list of names (a module matches when its
            qualified name equals an entry or ends with ``"." + entry``), a regular expression
            full-matched against qualified names, or ``"all-linear"`` (every linear layer except
            the output head).
        exclude_modules: layers to leave alone, with the same matching rules.
        train_modules: modules kept fully trainable, e.g. ``["classifier"]`` for a new head.
        lr_ratio: LoRA+: the B-side learning rate is ``lr_ratio`` times the A-side one
            (16 recommended). ``None`` leaves the optimizer as ``configure_optimizers`` built it.
        embedding_lr: LoRA+: the learning rate of adapters on embedding layers.
        schedules: scheduled methods such as ``DeltaLoRA(...)`` or ``LoRADrop(...)``. AdaLoRA's
            rank allocator is added automatically when ``method`` is ``AdaLoRA`` and no
            ``RankAllocator`` is given here (pass one to change its budget). Each schedule's
            checkpoint state is stored under its ``state_key``, so the keys must be unique; the
            order does not matter on resume.
        save_adapter_only: drop frozen base weights from checkpoints (they are reloaded from the
            base model); resume then loads non-strictly for exactly those keys.
        total_steps: total optimizer steps for schedules that need it; by default the Trainer's
            ``estimated_stepping_batches``.
        quantize_base: ``"nf4"`` (or :class:`~lightning_lowrank.quant.NF4`) stores the adapted
            layers' frozen weights in 4-bit NF4 at setup, before any strategy wraps the model
            (see :func:`~lightning_lowrank.inject`).
    """

    def __init__(
        self,
        method: AdapterConfig,
        target_modules: str | list[str] = "all-linear",
        exclude_modules: str | list[str] | None = None,
        train_modules: list[str] | None = None,
        lr_ratio: float | None = None,
        embedding_lr: float = 1e-6,
        schedules: Sequence[Schedule] = (),
        save_adapter_only: bool = True,
        total_steps: int | None = None,
        quantize_base: QuantizeSpec = None,
    ) -> None:
        if not isinstance(method, AdapterConfig):
            raise TypeError(
                f"method must be a method config such as LoRA(rank=8), got {type(method).__name__}"
            )
        if lr_ratio is not None and lr_ratio <= 0:
            raise ValueError(f"lr_ratio must be positive, got {lr_ratio}")
        given = list(schedules)
        everything = given + default_schedules(method, given)
        _check_schedules(method, everything)
        self.method = method
        self.target_modules = target_modules
        self.exclude_modules = exclude_modules
        self.train_modules = train_modules
        self.lr_ratio = lr_ratio
        self.embedding_lr = embedding_lr
        self.schedules: list[Schedule] = everything
        self.save_adapter_only = save_adapter_only
        self.total_steps = total_steps
        self.quantize_base = resolve(quantize_base)
        if self.quantize_base is not None and any(
            isinstance(s, DeltaLoRA) and s.mode == "inplace" for s in self.schedules
        ):
            raise ValueError(
                "DeltaLoRA(mode='inplace') writes into the base weights, which quantize_base "
                "stores in 4 bits: use DeltaLoRA(mode='implicit') over a quantized base"
            )
        self.layers: dict[str, AdapterLayer] = {}
        self._module: pl.LightningModule | None = None
        self._last_step = 0

    # --- setup ------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise ValueError(
                f"LowRankCallback supports single-device and DDP strategies, not "
                f"{type(trainer.strategy).__name__}: use strategy='ddp' (or 'auto' on one device)"
            )
        if self._module is pl_module and self.layers:
            return  # a later trainer.fit/validate/test on the same module: already injected
        if adapter_layers(pl_module):
            raise ValueError(
                "the model already has adapters (inject was called on it, or another "
                "LowRankCallback is attached): use either inject(...) or the callback, not both"
            )
        if is_overridden("configure_model", pl_module):
            # Lightning calls configure_model after this hook; layers must exist to be adapted,
            # so it is called here first (it must be idempotent, as Lightning requires anyway)
            pl_module.configure_model()
        names = inject(
            pl_module,
            self.method,
            target_modules=self.target_modules,
            exclude_modules=self.exclude_modules,
            train_modules=self.train_modules,
            quantize_base=self.quantize_base,
        )
        self._module = pl_module
        self.layers = {n: cast(AdapterLayer, pl_module.get_submodule(n)) for n in names}
        if self.save_adapter_only:
            pl_module.strict_loading = False
        total = self.total_steps if self.total_steps is not None else _estimated_steps(trainer)
        for schedule in self.schedules:
            schedule.setup(pl_module, self.layers, total)
        self._log_messages()
        rank_zero_info(
            f"LowRankCallback: {type(self.method).__name__} on {len(names)} layers, "
            f"{trainable_parameter_count(pl_module):,} trainable parameters"
        )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.lr_ratio is None:
            return
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        for optimizer in trainer.optimizers:
            split_optimizer(optimizer, pl_module, self.lr_ratio, schedulers, self.embedding_lr)
        held = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        missing = [
            n for n, p in pl_module.named_parameters() if p.requires_grad and id(p) not in held
        ]
        if missing:
            rank_zero_warn(
                f"LowRankCallback: {len(missing)} trainable parameters are in no optimizer "
                f"(e.g. {missing[:3]}); build the optimizer from self.parameters()"
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after checkpoint restore: a resumed run continues from the restored step
        self._last_step = trainer.global_step
        for layer in self.layers.values():
            layer.set_step(trainer.global_step)
        steps_per_epoch = _steps_per_epoch(trainer)
        for schedule in self.schedules:
            schedule.train_start(
                pl_module, self.layers, trainer.global_step, steps_per_epoch, trainer.optimizers
            )

    # --- per optimizer step -----------------------------------------------------------------
    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        for schedule in self.schedules:
            schedule.before_optimizer_step(pl_module, self.layers, trainer.global_step)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return  # a micro-batch under gradient accumulation: no optimizer step happened
        self._last_step = step
        for layer in self.layers.values():
            layer.set_step(step)
        for schedule in self.schedules:
            schedule.after_optimizer_step(pl_module, self.layers, step)
        self._log_messages()

    def _log_messages(self) -> None:
        for schedule in self.schedules:
            for message in schedule.pop_messages():
                rank_zero_info(message)

    # --- checkpoints ------------------------------------------------------------------------
    def _droppable_keys(self, pl_module: pl.LightningModule) -> set[str]:
        """Frozen base parameters, which adapter-only checkpoints leave out."""
        keep_base = any(s.checkpoint_keeps_base() for s in self.schedules)
        drop = set()
        for name, p in pl_module.named_parameters(remove_duplicate=False):
            if p.requires_grad:
                continue
            owner = _owning_layer(name, self.layers)
            if owner is not None and not name.startswith(owner + ".base."):
                continue  # a frozen adapter tensor (LoRA-FA's A) is part of the adapter
            if owner is not None and keep_base:
                continue  # a schedule changes this base weight (Delta-LoRA)
            drop.add(name)
        return drop | quantized_state_keys(pl_module)  # the 4-bit storage's own entries

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if not self.save_adapter_only:
            return
        drop = self._droppable_keys(pl_module)
        state = checkpoint["state_dict"]
        for key in [k for k in state if k in drop]:
            del state[key]

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if not self.save_adapter_only:
            return
        stored = set(checkpoint["state_dict"])
        expected = set(pl_module.state_dict())
        missing = expected - stored - self._droppable_keys(pl_module)
        unexpected = stored - expected
        if missing or unexpected:
            raise ValueError(
                "checkpoint does not match the adapted model: "
                f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}. Was it saved "
                "with another method or other target_modules?"
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "last_step": self._last_step,
            "schedules": {s.state_key: s.state_dict() for s in self.schedules},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["schedules"]
        if isinstance(saved, list):
            # checkpoints written before the state was keyed hold a list in schedule order
            if len(saved) != len(self.schedules):
                raise ValueError(
                    f"checkpoint has state for {len(saved)} schedules, this callback has "
                    f"{len(self.schedules)}: resume with the same schedules"
                )
            states = saved
        else:
            keys = [s.state_key for s in self.schedules]
            missing = [k for k in keys if k not in saved]
            unexpected = [k for k in saved if k not in keys]
            if missing or unexpected:
                raise ValueError(
                    "the checkpoint's schedules do not match this callback's: "
                    f"missing from the checkpoint {missing}, not in this callback {unexpected}. "
                    "Resume with the same schedules (their order does not matter)"
                )
            states = [saved[k] for k in keys]
        self._last_step = state_dict["last_step"]
        for schedule, state in zip(self.schedules, states, strict=True):
            schedule.load_state_dict(state)


def _check_schedules(method: AdapterConfig, schedules: list[Schedule]) -> None:
    """Refuse schedules whose checkpoint keys clash, and an allocator that follows another
    config than ``method``, before anything is built."""
    keys = [s.state_key for s in schedules]
    clashes = sorted({k for k in keys if keys.count(k) > 1})
    if clashes:
        raise ValueError(
            f"several schedules have the state key {clashes}: their checkpoint states would "
            "overwrite each other. Pass each schedule once, or give a subclass its own state_key"
        )
    for s in schedules:
        if isinstance(s, RankAllocator) and s.config is not None and s.config != method:
            raise ValueError(
                f"the RankAllocator follows {s.config!r}, the callback's method is {method!r}: "
                "pass RankAllocator(budget=...) without a config (it takes the method's), or "
                "the same AdaLoRA config to both"
            )


def _owning_layer(name: str, layers: dict[str, AdapterLayer]) -> str | None:
    for layer_name in layers:
        if name.startswith(layer_name + "."):
            return layer_name
    return None


def _steps_per_epoch(trainer: pl.Trainer) -> int | None:
    batches = trainer.num_training_batches
    if batches == float("inf") or batches <= 0:
        return None
    return max(1, math.ceil(batches / trainer.accumulate_grad_batches))


def _estimated_steps(trainer: pl.Trainer) -> int | None:
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return int(trainer.max_steps)
    try:
        steps = trainer.estimated_stepping_batches
    except Exception:  # no train dataloader yet (validate/test only)
        return None
    return None if steps == float("inf") else int(steps)
