"""Fine-tune a causal language model (SmolLM2-135M, a Llama) with LoRA, offline.

Run with ``python -m lightning_lowrank.demos.causal_lm [--help]``: LoRA on every projection of
SmolLM2's 30 decoder blocks, trained on the ``definitions`` topic of Debian's fortune cookies;
prints the held-out loss and a greedy generation before and after, then saves the adapter, merges
it and saves the merged model as an ordinary transformers checkpoint. The functions here are the
code of the causal-LM how-to guide (``docs/how-to/causal-lm.md``, which includes them verbatim);
the tests run them on a tiny random Llama.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_lowrank import LoRA, LowRankCallback, save_adapter, unload
from lightning_lowrank.demos.models import count_parameters

# --8<-- [start:targets]
#: every linear projection of a Llama decoder block: attention and the gated MLP
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# --8<-- [end:targets]


# --8<-- [start:module]
class CausalLM(pl.LightningModule):
    """Next-token prediction with a transformers ``*ForCausalLM`` model.

    The loss is the mean cross-entropy of every real token given the tokens before it,
    ``-(1 / T) * sum_t log p(x_t | x_<t)``; padding positions carry the label -100, which the
    model's loss ignores (transformers shifts the labels by one inside the model).

    Args:
        model: a causal LM called as ``model(input_ids=..., attention_mask=..., labels=...)``.
        lr: AdamW learning rate.
        warmup_steps: linear learning-rate warm-up over this many optimizer steps (0: none).
    """

    def __init__(self, model: nn.Module, lr: float = 2e-4, warmup_steps: int = 0) -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.warmup_steps = warmup_steps

    def _loss(self, batch: dict[str, Tensor]) -> Tensor:
        out = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        )
        return out.loss

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        # weighted by real tokens, so the epoch value is the loss per token of the whole set
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        self.log("val_loss", self._loss(batch), prog_bar=True, batch_size=tokens)

    @override
    def configure_optimizers(self) -> Any:
        # the callback has injected the adapters and frozen the base before this runs
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        if self.warmup_steps <= 0:
            return optimizer
        warmup = self.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


# --8<-- [end:module]


class _Texts(Dataset):
    def __init__(self, texts: Sequence[str]) -> None:
        self.texts = list(texts)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> str:
        return self.texts[index]


# --8<-- [start:data]
def causal_lm_loader(
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int = 64,
    batch_size: int = 8,
    shuffle: bool = False,
    seed: int = 0,
) -> DataLoader:
    """Batches of ``texts``, each ended by the tokenizer's end-of-sequence token, cut to
    ``max_length`` tokens and padded on the right; padding is masked out of the loss (-100)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # Llama tokenizers often have no pad token

    def collate(batch: list[str]) -> dict[str, Tensor]:
        enc = tokenizer(
            [t + tokenizer.eos_token for t in batch],
            max_length=max_length,
            truncation=True,
            padding=True,
            return_tensors="pt",
        )
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": labels,
        }

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        _Texts(texts),
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=collate,
        generator=generator,
    )


# --8<-- [end:data]


# --8<-- [start:generate]
@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 40) -> str:
    """Greedy continuation of ``prompt`` by a transformers causal LM (deterministic, so
    before/after runs compare)."""
    was_training = model.training
    model.eval()
    enc = tokenizer(prompt, return_tensors="pt")
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.train(was_training)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


# --8<-- [end:generate]


def finetune_causal_lm(
    model: Any,
    tokenizer: Any,
    train_texts: Sequence[str],
    val_texts: Sequence[str],
    prompt: str,
    output: Path,
    rank: int = 8,
    alpha: float = 16.0,
    lr: float = 2e-4,
    max_steps: int = 40,
    batch_size: int = 8,
    max_length: int = 64,
    max_new_tokens: int = 40,
    seed: int = 0,
    verbose: bool = True,
) -> dict[str, Any]:
    """Fine-tune ``model`` with LoRA on ``LLAMA_TARGETS``, then save the adapter, merge it and
    save the merged model (``output / "adapter.safetensors"`` and ``output / "merged"``).

    Args:
        model: a transformers causal LM (``*ForCausalLM``) in float32; adapted in place and, at
            the end, merged (``unload``).
        tokenizer: its tokenizer.
        train_texts: training texts; val_texts: held-out texts for the loss before and after.
        prompt: the prompt of the greedy generations before and after.
        output: the folder for the adapter file and the merged model.
        rank: LoRA rank r; alpha: LoRA alpha (scale ``alpha / r``); lr: AdamW learning rate.
        max_steps: optimizer steps; batch_size: texts per batch; max_length: tokens per text.
        max_new_tokens: tokens generated; seed: seeds the run and the data order.
        verbose: print the results.

    Returns:
        The measured numbers and texts: ``val_loss_before`` / ``_after`` (nats per token),
        ``generated_before`` / ``_after``, ``trainable``, ``layers``, ``adapter`` (its path),
        ``merged`` (the directory), ``max_logit_difference`` (merged model reloaded from disk
        against the trained model with its adapters) and ``seconds`` (training).
    """
    say = print if verbose else (lambda *a, **k: None)
    pl.seed_everything(seed, verbose=False)
    # --8<-- [start:train]
    train = causal_lm_loader(
        tokenizer, train_texts, max_length, batch_size, shuffle=True, seed=seed
    )
    val = causal_lm_loader(tokenizer, val_texts, max_length, batch_size)
    module = CausalLM(model, lr=lr, warmup_steps=max(1, max_steps // 10))
    callback = LowRankCallback(LoRA(rank=rank, alpha=alpha), target_modules=LLAMA_TARGETS)
    trainer = pl.Trainer(
        max_steps=max_steps,
        callbacks=[callback],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    before = generate(model, tokenizer, prompt, max_new_tokens)
    # validate() runs the callback's setup: the adapters are injected (B = 0, so the model is
    # still the base model) and this is the base model's loss
    val_before = trainer.validate(module, val, verbose=False)[0]["val_loss"]
    start = time.perf_counter()
    trainer.fit(module, train)  # no validation loader: validated before and after instead
    seconds = time.perf_counter() - start
    val_after = trainer.validate(module, val, verbose=False)[0]["val_loss"]
    after = generate(model, tokenizer, prompt, max_new_tokens)
    # --8<-- [end:train]
    counts = count_parameters(model)
    say(f"LoRA r={rank} on {len(callback.layers)} layers: {counts}")
    say(
        f"held-out loss: {val_before:.3f} -> {val_after:.3f} nats/token "
        f"(perplexity {math.exp(val_before):.1f} -> {math.exp(val_after):.1f}), "
        f"{trainer.global_step} steps in {seconds:.0f} s"
    )
    say(f"before: {prompt}{before}")
    say(f"after:  {prompt}{after}")

    # --8<-- [start:save]
    output.mkdir(parents=True, exist_ok=True)
    adapter = save_adapter(model, output / "adapter.safetensors")  # the adapter alone
    probe = tokenizer(prompt, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        expected = model(**probe).logits
    unload(model)  # W <- W + s B A in every adapted layer, and the plain nn.Linear layers back
    model.save_pretrained(output / "merged")  # an ordinary transformers checkpoint
    tokenizer.save_pretrained(output / "merged")
    # --8<-- [end:save]
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(output / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        difference = (reloaded(**probe).logits - expected).abs().max().item()
    kib = adapter.stat().st_size / 1024
    say(f"adapter: {adapter} ({kib:,.0f} KiB); merged model: {output / 'merged'}")
    say(f"merged model reloaded from disk: max |logit difference| {difference:.1e}")
    return {
        "val_loss_before": val_before,
        "val_loss_after": val_after,
        "generated_before": before,
        "generated_after": after,
        "trainable": counts.trainable,
        "layers": sorted(callback.layers),
        "adapter": adapter,
        "merged": output / "merged",
        "max_logit_difference": difference,
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """The SmolLM2 run of the guide; returns what ``finetune_causal_lm`` returns."""
    from lightning_lowrank.demos.data import load_fortunes, smoke_mode
    from lightning_lowrank.demos.models import load_smollm2

    smoke = smoke_mode()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-steps", type=int, default=4 if smoke else 30)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=32 if smoke else 48)
    p.add_argument("--val-texts", type=int, default=16 if smoke else 64)
    p.add_argument("--prompt", default="Programmer, n.:\n\t")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--output", type=Path, default=Path("outputs/causal-lm"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    # --8<-- [start:load]
    model, tokenizer = load_smollm2()  # LlamaForCausalLM, float32, from the offline package
    texts, _, _ = load_fortunes(topics=["definitions"])  # "Cynic, n.:\n\tOne who ..."
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(texts), generator=g).tolist()
    val_texts = [texts[i] for i in order[: args.val_texts]]
    train_texts = [texts[i] for i in order[args.val_texts :]]
    # --8<-- [end:load]
    print(
        f"SmolLM2: {count_parameters(model)}; {len(train_texts)} training / "
        f"{len(val_texts)} held-out definitions"
    )
    return finetune_causal_lm(
        model,
        tokenizer,
        train_texts,
        val_texts,
        prompt=args.prompt,
        output=args.output,
        rank=args.rank,
        alpha=args.alpha,
        lr=args.lr,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
    )


if __name__ == "__main__":
    main()
