"""Shared pieces of the reproduction study: one fine-tuning run, and the parallel driver.

Every study module (``study_singlora``, ``study_intruders``, ``study_loraplus``,
``study_methods``, ``study_sltrain``) describes its runs as a list of small dicts (``tasks``) and
runs one of them with ``run(task)``, which returns a JSON-able record. :func:`main` runs the
missing tasks of one or more studies, each in a fresh process (so peak-memory readings and random
state never leak from one run to the next), several at a time, and merges every record into the
study's result file as soon as it arrives: a study cut short is still usable and is resumed by
running the same command again. Every record stores what it was measured with
(:func:`benchmarks.provenance.provenance`: commit, uncommitted-changes flag, device, library
versions); records from before those fields are left out of a file the driver rewrites, so old
and new runs never mix in one comparison. The default seeds are ``DEFAULT_SEEDS`` (as many as the
verdict rule's ``MIN_SEEDS``).

    python -m benchmarks.study --jobs 4                  # every study, every seed
    python -m benchmarks.study --studies singlora --seeds 0
    python -m benchmarks.study --studies methods --only "config=LoRA r=2" "config=AdaLoRA 3 -> 2"

The runs take minutes each on a CPU and seconds on a GPU (``--accelerator`` picks; the default
``auto`` takes a GPU when there is one). Not in CI.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import os
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks.provenance import command_line, provenance  # noqa: E402
from benchmarks.stats import MIN_SEEDS  # noqa: E402

RESULTS_DIR = Path(__file__).parent / "results"
QUICK_ENV = "LOWRANK_STUDY_QUICK"
STUDIES = ("singlora", "intruders", "loraplus", "methods", "sltrain")
#: seeds of a full study run: the verdict rule needs at least ``MIN_SEEDS`` of them
DEFAULT_SEEDS = tuple(range(MIN_SEEDS))


def quick() -> bool:
    """``True`` under ``--quick``: every run shrinks to a few steps (a check that the study
    runs end to end; the numbers mean nothing and go to ``results/quick/``)."""
    return os.environ.get(QUICK_ENV, "0") == "1"


@dataclass
class Study:
    """One part of the study.

    Attributes:
        name: short name (``singlora``); the results go to ``results/study_<name>.json``.
        title: what the page calls it.
        tasks: ``tasks(seeds)``: every run of the study, as dicts holding at least ``seed``.
        run: ``run(task)``: one run, returning its record (the task's keys plus the results).
        key: the keys of a task that identify it (a finished record with the same values is
            not run again).
        meta: settings written beside the runs (steps, batch size, ...).
    """

    name: str
    title: str
    tasks: Callable[[Iterable[int]], list[dict[str, Any]]]
    run: Callable[[dict[str, Any]], dict[str, Any]]
    key: tuple[str, ...]
    meta: dict[str, Any]

    def ident(self, record: dict[str, Any]) -> tuple[Any, ...]:
        """The values of ``key`` in a task or a record: what makes two of them the same run."""
        return tuple(record.get(k) for k in self.key)

    @property
    def path(self) -> Path:
        return RESULTS_DIR / ("quick" if quick() else "") / f"study_{self.name}.json"


def device_name(accelerator: str, threads: int) -> str:
    """What the runs ran on, for the result files."""
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({threads} thread{'s' if threads > 1 else ''} per run)"


class _History:
    """Collects ``(step, val_loss, val_acc)`` after every validation run."""

    def __init__(self) -> None:
        import lightning.pytorch as pl

        class Recorder(pl.Callback):
            def __init__(self, rows: list[dict[str, float]]) -> None:
                self.rows = rows

            def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
                if trainer.sanity_checking:
                    return
                m = trainer.callback_metrics
                self.rows.append(
                    {
                        "step": trainer.global_step,
                        "val_loss": round(float(m["val_loss"]), 5),
                        "val_acc": round(float(m["val_acc"]), 5),
                    }
                )

        self.rows: list[dict[str, float]] = []
        self.callback = Recorder(self.rows)


def stored_adapter_parameters(module: torch.nn.Module, truncate: bool = False) -> int:
    """How many numbers the adapter file of ``module`` holds (after AdaLoRA's truncation when
    ``truncate``; LoRA-drop's shared adapters once)."""
    from safetensors.torch import load_file

    from lightning_lowrank import save_adapter

    with tempfile.TemporaryDirectory() as tmp:
        path = save_adapter(module, Path(tmp) / "adapter.safetensors", truncate=truncate)
        return sum(t.numel() for t in load_file(str(path)).values())


def finetune(
    *,
    data: str,
    seed: int,
    steps: int,
    lr: float,
    batch_size: int,
    max_length: int,
    accelerator: str,
    callbacks_for: Callable[[], list[Any]],
    eval_every: int | None = None,
    warmup_steps: int = 20,
    limit_eval: int | None = None,
    after_fit: Callable[[torch.nn.Module, torch.nn.Module], dict[str, Any]] | None = None,
    before_fit: Callable[[torch.nn.Module], Any] | None = None,
    head_lr: float | None = None,
) -> dict[str, Any]:
    """Fine-tune MiniLM on ``data`` (``"fortunes"`` or ``"bbc"``) and report how it went.

    Args:
        callbacks_for: builds the run's callbacks (``LowRankCallback`` and friends); an empty
            list means full fine-tuning.
        eval_every: validate every this many steps (``None``: once, at the end).
        after_fit: ``after_fit(module, model)`` adds fields to the record once training ends.
        before_fit: ``before_fit(model)`` runs on the plain model before training (to keep a
            copy of the pre-trained weights, say); its result is passed to nothing, it is for
            side effects.
        head_lr: the classifier head's learning rate (``None``: the same ``lr`` as the rest), so
            that a learning-rate sweep of an adapter does not also sweep the head's.

    Returns:
        The record: final ``val_acc`` and ``val_loss``, ``test_acc``, the validation
        ``history``, ``trainable`` parameters, ``train_seconds`` and (on a GPU) ``peak_mib``.
    """
    import lightning.pytorch as pl

    from lightning_lowrank.demos import (
        BBCNewsDataModule,
        FortunesDataModule,
        TextClassifier,
        count_parameters,
        load_minilm_classifier,
    )

    pl.seed_everything(seed, verbose=False)
    if quick():
        limit_eval = 32
    if data == "fortunes":
        dm: pl.LightningDataModule = FortunesDataModule(
            batch_size=batch_size, max_length=max_length, seed=seed, limit_eval=limit_eval
        )
    elif data == "bbc":
        dm = BBCNewsDataModule(
            batch_size=batch_size, max_length=max_length, seed=seed, limit_eval=limit_eval
        )
    else:
        raise ValueError(f"data must be 'fortunes' or 'bbc', not {data!r}")
    model, _ = load_minilm_classifier(dm.num_classes, seed=seed)
    if before_fit is not None:
        before_fit(model)
    module = TextClassifier(model, lr=lr, weight_decay=0.0, warmup_steps=warmup_steps)
    if head_lr is not None:
        module = _with_head_rate(module, head_lr)
    history = _History()
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=[*callbacks_for(), history.callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        val_check_interval=eval_every or steps,
        check_val_every_n_epoch=None,
        accelerator=accelerator,
        devices=1,
    )
    on_gpu = trainer.strategy.root_device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.fit(module, dm)
    seconds = time.perf_counter() - started
    if not history.rows or history.rows[-1]["step"] != trainer.global_step:
        trainer.validate(module, dm, verbose=False)
        m = trainer.callback_metrics
        history.rows.append(
            {
                "step": trainer.global_step,
                "val_loss": round(float(m["val_loss"]), 5),
                "val_acc": round(float(m["val_acc"]), 5),
            }
        )
    record: dict[str, Any] = {
        "val_acc": history.rows[-1]["val_acc"],
        "val_loss": history.rows[-1]["val_loss"],
        "test_acc": round(module.evaluate(dm.test_dataloader()), 5),
        "history": history.rows if eval_every else [],
        "trainable": count_parameters(module).trainable,
        "train_seconds": round(seconds, 1),
    }
    if on_gpu:
        record["peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if after_fit is not None:
        record.update(after_fit(module, model))
    return record


def _with_head_rate(module: Any, head_lr: float) -> Any:
    """``module`` whose optimizer puts the classifier head's parameters in their own group at
    ``head_lr``; the linear warm-up scales every group alike."""

    def configure_optimizers() -> Any:
        params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        is_head = [".classifier." in f".{n}." for n, _ in params]
        groups = [
            {"params": [p for (_, p), h in zip(params, is_head, strict=True) if not h]},
            {"params": [p for (_, p), h in zip(params, is_head, strict=True) if h], "lr": head_lr},
        ]
        opt = torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=module.lr, betas=module.betas, weight_decay=0.0
        )
        warmup = max(1, module.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    module.configure_optimizers = configure_optimizers
    return module


def update_norm_ratio(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> float:
    """``||dW|| / ||W0||`` over all ``pairs`` of (pre-trained, fine-tuned) weights:
    ``sqrt(sum_l ||W_l - W0_l||_F^2) / sqrt(sum_l ||W0_l||_F^2)``, how far training moved the
    adapted layers (comparable across methods and learning rates)."""
    num = sum(float((b.double() - a.double()).pow(2).sum()) for a, b in pairs.values())
    den = sum(float(a.double().pow(2).sum()) for a, _ in pairs.values())
    return (num / den) ** 0.5


def stored_runs(doc: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """The runs of a result file that new runs may join, and how many were left out.

    Each run gets the file's device when it lacks its own (a study may be completed on another
    machine). Runs without a commit predate the verdict method: they never mix with new runs in
    one comparison, so they are left out of the file the driver rewrites.
    """
    runs = [{"device": doc.get("device"), **r} for r in doc.get("runs", [])]
    kept = [r for r in runs if r.get("commit")]
    return kept, len(runs) - len(kept)


def parse_only(pairs: Iterable[str]) -> dict[str, set[str]]:
    """``--only`` arguments (``FIELD=VALUE``, repeatable) as ``{field: {values}}``; a field given
    twice accepts either value."""
    only: dict[str, set[str]] = {}
    for pair in pairs:
        field, sep, value = pair.partition("=")
        if not sep or not field:
            raise SystemExit(
                f"--only takes FIELD=VALUE (config=LoRA r=2, kind=memory), not {pair!r}"
            )
        only.setdefault(field, set()).add(value)
    return only


def selected(task: dict[str, Any], only: dict[str, set[str]]) -> bool:
    """Whether ``task`` matches every field of ``only`` (values compared as text)."""
    return all(str(task.get(field)) in values for field, values in only.items())


def check_only(only: dict[str, set[str]], tasks: list[dict[str, Any]]) -> None:
    """Refuse an ``--only`` value that no task of the chosen studies has (a typo would otherwise
    select nothing and report 0 runs to do), naming the values there are."""
    for field, values in only.items():
        have = sorted({str(t[field]) for t in tasks if field in t})
        missing = sorted(values - set(have))
        if missing:
            raise SystemExit(
                f"--only {field}=: no task of these studies has {field} "
                + ", ".join(repr(v) for v in missing)
                + (f"; there are {', '.join(repr(v) for v in have)}" if have else "")
            )


def load_study(name: str) -> Study:
    """The ``Study`` of ``benchmarks/study_<name>.py``."""
    return importlib.import_module(f"benchmarks.study_{name}").STUDY


def _run_task(name: str, task: dict[str, Any], threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for logger in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    return load_study(name).run(task)


def _write(study: Study, records: list[dict[str, Any]], command: str, device: str) -> None:
    study.path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "study": study.title,
        "command": command,
        "device": ", ".join(sorted({r["device"] for r in records if r.get("device")})) or device,
        **study.meta,
        "runs": records,
    }
    study.path.write_text(json.dumps(doc, indent=1) + "\n")


def _describe(task: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in task.items())


def main(argv: list[str] | None = None, studies: Iterable[str] = STUDIES) -> None:
    parser = argparse.ArgumentParser(description="Run the reproduction study (or parts of it).")
    parser.add_argument("--studies", nargs="+", default=list(studies), choices=STUDIES)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each a process")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run")
    parser.add_argument("--accelerator", default="auto", help="cpu, gpu or auto")
    parser.add_argument("--rerun", action="store_true", help="run again tasks already done")
    parser.add_argument(
        "--only",
        nargs="+",
        default=[],
        metavar="FIELD=VALUE",
        help="only the tasks whose FIELD is VALUE, e.g. --only 'config=LoRA r=2' kind=memory "
        "(a field given twice takes either value)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a few steps per run, to check that it all works"
    )
    args = parser.parse_args(argv)
    if args.quick:  # before the study modules are imported here and in the workers
        os.environ[QUICK_ENV] = "1"
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    only = parse_only(args.only)

    loaded = {name: load_study(name) for name in args.studies}
    check_only(only, [t for study in loaded.values() for t in study.tasks(args.seeds)])
    records: dict[str, list[dict[str, Any]]] = {}
    todo: list[tuple[str, dict[str, Any]]] = []
    per_study: dict[str, list[dict[str, Any]]] = {}
    for name, study in loaded.items():
        doc = json.loads(study.path.read_text()) if study.path.exists() else {"runs": []}
        old, legacy = stored_runs(doc)
        if legacy:
            print(
                f"{name}: {legacy} stored runs record no commit (they predate the verdict "
                "method); the new result file leaves them out (git history keeps them)",
                flush=True,
            )
        records[name] = old
        done = {study.ident(r) for r in old}
        per_study[name] = [
            {**t, "accelerator": args.accelerator}
            for t in study.tasks(args.seeds)
            if selected(t, only) and (args.rerun or study.ident(t) not in done)
        ]
    # seed-major, studies interleaved: a study cut short has every config for its first seeds
    for seed in args.seeds:
        for name in args.studies:
            todo += [(name, t) for t in per_study[name] if t["seed"] == seed]
    print(f"{len(todo)} runs to do, {args.jobs} at a time, {threads} threads each", flush=True)
    device = device_name(args.accelerator, threads)
    command = command_line("benchmarks.study", argv)

    stamp = provenance(device)  # the checkout the runs were started from

    def merge(name: str, rec: dict[str, Any]) -> None:
        rec.update(stamp)
        study = loaded[name]
        records[name] = [r for r in records[name] if study.ident(r) != study.ident(rec)]
        records[name].append(rec)
        _write(loaded[name], records[name], command, device)

    failures = 0
    started = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=ctx, max_tasks_per_child=1) as pool:
        pending = {pool.submit(_run_task, name, t, threads): (name, t) for name, t in todo}
        finished = 0
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                name, task = pending.pop(fut)
                finished += 1
                elapsed = time.perf_counter() - started
                try:
                    rec = fut.result()
                except Exception:  # one failed run must not stop the others
                    failures += 1
                    print(f"[{finished}/{len(todo)}] {name}: FAILED {_describe(task)}", flush=True)
                    traceback.print_exc()
                    continue
                merge(name, rec)
                print(
                    f"[{finished}/{len(todo)} {elapsed:.0f}s] {name}: {_describe(task)} -> "
                    + ", ".join(
                        f"{k} {rec[k]}" for k in ("val_acc", "test_acc", "val_ppl") if k in rec
                    ),
                    flush=True,
                )
    if failures:
        raise SystemExit(f"{failures} run(s) failed")
