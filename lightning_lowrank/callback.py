"""``LowRankCallback``: turns any LightningModule into a low-rank fine-tuning run.

The callback is a thin Lightning layer over ``inject``, ``optim`` and ``schedules``:

- ``setup``: builds the module's layers if it uses ``configure_model`` (which must be idempotent),
  injects the adapters and freezes the base, before the strategy wraps the model and before
  ``configure_optimizers`` runs; under ``ModelParallelStrategy`` it then shards the model with
  FSDP2 (``shard.py``);
- ``on_fit_start``: splits the optimizer into LoRA+ groups when ``lr_ratio`` is set (before any
  optimizer state is restored, so resumed states line up);
- once per optimizer step (never per micro-batch): tells every layer the step count (SingLoRA's
  ramp) and runs the scheduled methods, logging what they report (LoRA-drop's table) on rank zero;
- checkpoints: adapter-only by default (frozen base weights are dropped; loading is non-strict for
  exactly those keys), with the schedules' state so a resumed run continues exactly.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Sequence
from typing import Any, cast

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.optim import Optimizer
from typing_extensions import override

from lightning_lowrank.guards import check_ownership, check_single_callback, check_strategy
from lightning_lowrank.inject import (
    adapter_layers,
    check_target_spec,
    inject,
    trainable_parameter_count,
)
from lightning_lowrank.methods.base import AdapterConfig, AdapterLayer, check_int, check_number
from lightning_lowrank.optim import split_optimizer
from lightning_lowrank.quant.model import quantized_state_keys
from lightning_lowrank.quant.spec import QuantizeSpec, check_schedules_over, resolve
from lightning_lowrank.resume import base_fingerprint, check_resume, loaded_callback_state
from lightning_lowrank.schedules import Schedule, default_schedules
from lightning_lowrank.shard import ParallelizeFn, check_shardable, shard_model
from lightning_lowrank.shard import check_strategy as check_sharding
from lightning_lowrank.trainer_steps import (
    check_schedules,
    configure_model_for,
    estimated_steps,
    steps_per_epoch,
)


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
        quantize_base: ``"nf4"`` (or ``quant.NF4``) stores the adapted layers' frozen weights in
            4-bit NF4 at setup, before any strategy wraps the model (see ``inject``).
        shard_blocks: under ``ModelParallelStrategy``: the classes (or class names) of the blocks
            that get one FSDP2 group each; default: a transformers model's ``_no_split_modules``,
            else the entries of the longest ``nn.ModuleList`` (``shard.block_modules``).
        parallelize: under ``ModelParallelStrategy``: ``parallelize(pl_module, mesh)`` shards the
            adapted model instead of the default (it must shard, with ``fully_shard``, every
            module whose forward is called).
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
        shard_blocks: Sequence[type | str] | None = None,
        parallelize: ParallelizeFn | None = None,
    ) -> None:
        if not isinstance(method, AdapterConfig):
            raise TypeError(
                f"method must be a method config such as LoRA(rank=8), got {type(method).__name__}"
            )
        if lr_ratio is not None:
            lr_ratio = check_number("lr_ratio", lr_ratio)
            if lr_ratio <= 0:
                raise ValueError(f"lr_ratio must be positive (LoRA+ uses 16), got {lr_ratio}")
        embedding_lr = check_number("embedding_lr", embedding_lr, minimum=0.0)
        check_target_spec("target_modules", target_modules)
        check_target_spec("exclude_modules", exclude_modules, optional=True)
        check_target_spec("train_modules", train_modules, optional=True)
        if isinstance(train_modules, str):
            raise ValueError(f"train_modules must be a list of module names, got {train_modules!r}")
        if total_steps is not None:
            total_steps = check_int("total_steps", total_steps, minimum=1)
        given = list(schedules)
        everything = given + default_schedules(method, given)
        check_schedules(method, everything)
        self.method = method
        self.target_modules = target_modules
        self.exclude_modules = exclude_modules
        self.train_modules = train_modules
        self.lr_ratio = lr_ratio
        self.embedding_lr = embedding_lr
        self.schedules: list[Schedule] = everything
        self.save_adapter_only = save_adapter_only
        self.total_steps = total_steps
        self.quantize_base = check_schedules_over(resolve(quantize_base), self.schedules)
        self.shard_blocks = shard_blocks
        self.parallelize = parallelize
        self.layers: dict[str, AdapterLayer] = {}
        self._module: pl.LightningModule | None = None
        self._last_step = 0
        self._total: int | None = None
        self._offset = 0  # optimizer steps of earlier fits in other Trainers (docs: reuse)
        self._fingerprint: list[list[float]] = []
        self._trainer: Callable[[], pl.Trainer | None] = lambda: None
        self._init_from_base = False
        self._restore_hook: Any = None
        self._sharded = False

    # --- setup ------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # FSDP1 and tensor parallelism get their own messages; then only tested strategies pass
        sharded = check_sharding(trainer.strategy)
        if not sharded:
            check_strategy(trainer.strategy)
        check_single_callback(trainer, self)
        check_ownership(self, pl_module)
        if self._module is pl_module and self.layers:
            # a later trainer.fit/validate/test on the same module continues its run; a fit
            # tells the schedules its length (validate/test may have run first: docs, reuse)
            if stage == "fit":
                total = self.total_steps
                self._total = total if total is not None else estimated_steps(trainer)
            return
        if adapter_layers(pl_module):
            raise ValueError(
                "the model already has adapters (inject was called on it, or another "
                "LowRankCallback is attached): use either inject(...) or the callback, not both"
            )
        if is_overridden("configure_model", pl_module):
            # Lightning calls configure_model after this hook; layers must exist to be adapted,
            # so it is called here first (it must be idempotent, as Lightning requires anyway)
            configure_model_for(trainer, pl_module, sharded)
        if sharded:
            check_shardable(pl_module, self.parallelize)
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
        # built on the meta device: Lightning materialises it in strategy.setup, resetting each
        # base after its adapter layer, so base-dependent adapter init waits for on_fit_start
        self._init_from_base = any(p.is_meta for p in pl_module.parameters())
        # a meta-built base has no values yet: its resume check compares shapes and config only
        self._fingerprint = [] if self._init_from_base else base_fingerprint(self.layers)
        # Lightning loads a resumed checkpoint's tensors before on_load_checkpoint: a rank that
        # differs gets this library's message there, not torch's size mismatch
        self._trainer = weakref.ref(trainer)
        pl_module.register_load_state_dict_pre_hook(self._check_loaded_shapes)
        if self.save_adapter_only:
            pl_module.strict_loading = False
        total = self.total_steps if self.total_steps is not None else estimated_steps(trainer)
        self._total = total
        for schedule in self.schedules:
            schedule.setup(pl_module, self.layers, total)
            schedule._lowrank_owner = self  # type: ignore[attr-defined]  # one run's state
        self._log_messages()
        self._sharded = sharded
        if sharded:
            mesh = cast(ModelParallelStrategy, trainer.strategy).device_mesh["data_parallel"]
            shared = any(s.shares_adapters() for s in self.schedules)
            shard_model(pl_module, mesh, self.shard_blocks, self.parallelize, shared)
        rank_zero_info(
            f"LowRankCallback: {type(self.method).__name__} on {len(names)} layers, "
            f"{trainable_parameter_count(pl_module):,} trainable parameters"
        )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_adapter_only and self._sharded:
            # ModelParallelStrategy restores a checkpoint after this hook, loading every key of
            # the model's state_dict; an adapter-only checkpoint has no frozen ones, so until
            # on_train_start (restore done) the state_dict leaves them out
            drop = self._droppable_keys(pl_module)
            self._restore_hook = pl_module.register_state_dict_post_hook(
                lambda module, state, prefix, meta: _drop_keys(state, drop, prefix)
            )
        if self._init_from_base:
            self._init_from_base = False
            for layer in self.layers.values():
                layer.init_from_base()
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
        self._remove_restore_hook()  # the checkpoint has been restored
        # after checkpoint restore: a resumed run continues from the restored step; a later fit
        # in a new Trainer (whose global_step starts at 0) continues this run's step count
        self._offset = max(0, self._last_step - trainer.global_step)
        step = self._last_step = trainer.global_step + self._offset
        per_epoch = steps_per_epoch(trainer)
        for schedule in self.schedules:
            # the train dataloader is loaded now: fail before the first step when a schedule
            # needs a run length this run does not know
            schedule.check_run_length(self._total, per_epoch)
        for layer in self.layers.values():
            layer.set_step(step)
        for schedule in self.schedules:
            schedule.train_start(pl_module, self.layers, step, per_epoch, trainer.optimizers)

    # --- per optimizer step -----------------------------------------------------------------
    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        for schedule in self.schedules:
            schedule.before_optimizer_step(
                pl_module, self.layers, trainer.global_step + self._offset
            )

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step + self._offset
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

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_restore_hook()  # a fit that failed before on_train_start

    def _remove_restore_hook(self) -> None:
        if self._restore_hook is not None:
            self._restore_hook.remove()
            self._restore_hook = None

    # --- checkpoints ------------------------------------------------------------------------
    def _droppable_keys(self, pl_module: pl.LightningModule) -> set[str]:
        """Frozen base parameters, which adapter-only checkpoints leave out."""
        keep_base = any(s.checkpoint_keeps_base() for s in self.schedules)
        drop = set()
        for name, p in pl_module.named_parameters(remove_duplicate=False):
            if p.requires_grad:
                continue
            owner = _owning_layer(name, self.layers)
            # frozen adapter tensors (LoRA-FA's A) stay; so do bases a schedule changes (Delta-LoRA)
            if owner is not None and (keep_base or not name.startswith(owner + ".base.")):
                continue
            drop.add(name)
        return drop | quantized_state_keys(pl_module)  # the 4-bit storage's own entries

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if not self.save_adapter_only:
            return
        _drop_keys(checkpoint["state_dict"], self._droppable_keys(pl_module), prefix="")

    def _check_loaded_shapes(
        self, module: Any, state: dict[str, Any], prefix: str, *_: Any
    ) -> None:
        if not prefix:  # the whole module's load (resume, or a user's load_state_dict)
            saved = loaded_callback_state(self._trainer, self.state_key, self._legacy_state_key)
            check_resume(saved, self.method, self.layers, self._fingerprint, state)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # the load pre-hook checked a resumed checkpoint before anything was copied; this covers
        # other loads (ModelParallelStrategy has loaded and removed the state dict already)
        state = checkpoint.get("callbacks", {})
        mine = state.get(self.state_key, state.get(self._legacy_state_key))
        check_resume(
            mine, self.method, self.layers, self._fingerprint, checkpoint.get("state_dict", {})
        )
        if not self.save_adapter_only or "state_dict" not in checkpoint:
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

    # Lightning refuses two stateful callbacks with one state key when the Trainer is built,
    # with a generic message; marking state_dict as Callback's own (functools.wraps) leaves that
    # check to setup, which says what to do instead. Lightning still saves and loads the state
    # under "LowRankCallback" (it calls state_dict/load_state_dict of every callback).
    @functools.wraps(Callback.state_dict)
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]  # the same signature
        return {
            # what a resume checks (on_load_checkpoint) and load_adapter_checkpoint rebuilds from
            "method": self.method.to_dict(),
            "layers": list(self.layers),
            "base_fingerprint": self._fingerprint,
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


def _drop_keys(state: dict[str, Any], drop: set[str], prefix: str) -> None:
    for key in [k for k in state if k[len(prefix) :] in drop]:
        del state[key]


def _owning_layer(name: str, layers: dict[str, AdapterLayer]) -> str | None:
    return next((n for n in layers if name.startswith(n + ".")), None)
