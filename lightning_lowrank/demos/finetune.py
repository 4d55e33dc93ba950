"""Fine-tune the offline MiniLM on BBC News with LoRA, through ``LowRankCallback``.

Run with ``make demo`` or ``python -m lightning_lowrank.demos.finetune [--help]``. Prints the
trainable parameters, the test accuracy and macro-F1 before and after training, and where the
adapter file was saved (with its size). The defaults finish in a few minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import cast

import lightning.pytorch as pl
import torch
from safetensors.torch import save_file

from lightning_lowrank import LoRA, LowRankCallback, save_adapter
from lightning_lowrank.demos.classifier import TextClassifier
from lightning_lowrank.demos.data import BBCNewsDataModule, smoke_mode
from lightning_lowrank.demos.models import count_parameters, load_minilm_classifier
from lightning_lowrank.demos.quiet import quiet_lightning


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; every option has a default that fits the time budget."""
    smoke = smoke_mode()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale alpha / r)")
    p.add_argument("--scaling", choices=["standard", "rslora"], default="standard")
    p.add_argument(
        "--target",
        default="query,value",
        help='comma-separated module names, or "all-linear" (default: query,value)',
    )
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--lr-ratio", type=float, default=None, help="LoRA+ ratio lr_B / lr_A, e.g. 16")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=40 if smoke else -1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64, help="tokens per article (title and lead)")
    p.add_argument("--limit-train", type=int, default=128 if smoke else None)
    p.add_argument("--limit-eval", type=int, default=64 if smoke else None)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=Path("outputs/demo"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the demo; returns the measured numbers (accuracies, macro-F1s, counts, size, seconds)."""
    quiet_lightning()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, verbose=False)
    start = time.perf_counter()

    data = BBCNewsDataModule(
        None,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        limit_train=args.limit_train,
        limit_eval=args.limit_eval,
    )
    model, tokenizer = load_minilm_classifier(data.num_classes, seed=args.seed)
    data.tokenizer = tokenizer
    data.setup()
    module = TextClassifier(model, lr=args.lr)
    sizes = {k: len(v) for k, v in data.split_indices.items()}
    print(
        f"BBC News: {sizes['train']} train / {sizes['val']} val / {sizes['test']} test articles, "
        f"{data.num_classes} classes {data.class_names}"
    )
    print(f"MiniLM before adapters: {count_parameters(module)}")
    before = module.evaluate_metrics(data.test_dataloader())
    print(
        f"test accuracy before fine-tuning: {before['acc']:.1%}, macro-F1 {before['f1']:.3f} "
        "(a random head; chance accuracy is about 20%)"
    )

    target = "all-linear" if args.target == "all-linear" else args.target.split(",")
    callback = LowRankCallback(
        LoRA(rank=args.rank, alpha=args.alpha, scaling=args.scaling),
        target_modules=target,
        train_modules=["classifier"],  # the new head is trained in full
        lr_ratio=args.lr_ratio,
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        callbacks=[callback],
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
    )
    trainer.fit(module, datamodule=data)
    counts = count_parameters(module)
    print(f"with LoRA (rank {args.rank}, {len(callback.layers)} layers): {counts}")
    after = module.evaluate_metrics(data.test_dataloader())
    print(f"test accuracy after fine-tuning: {after['acc']:.1%}, macro-F1 {after['f1']:.3f}")

    args.output.mkdir(parents=True, exist_ok=True)
    adapter = save_adapter(module, args.output / "adapter.safetensors")
    # the head is not an adapter (it is trained in full): it is saved next to the adapter
    head = args.output / "classifier.safetensors"
    classifier = cast(torch.nn.Module, model.classifier)
    save_file({k: v.detach().contiguous() for k, v in classifier.state_dict().items()}, head)
    seconds = time.perf_counter() - start
    kib = adapter.stat().st_size / 1024
    print(
        f"adapter saved to {adapter} ({kib:,.1f} KiB); classifier head to {head} "
        f"({head.stat().st_size / 1024:,.1f} KiB)"
    )
    print(f"done in {seconds:.0f} s")
    return {
        "acc_before": before["acc"],
        "acc_after": after["acc"],
        "f1_before": before["f1"],
        "f1_after": after["f1"],
        "trainable": counts.trainable,
        "total": counts.total,
        "adapter_kib": kib,
        "seconds": seconds,
    }


if __name__ == "__main__":
    main()
