"""PEFT interop: export_peft -> PeftModel.from_pretrained, and PEFT save_pretrained -> import_peft.

Outputs are compared in float32 with atol 1e-5 (logits of magnitude ~1; the two libraries order the
same float operations differently). Every adapter is randomised first (B != 0), so a mapping that
dropped or mis-scaled a factor would change the outputs far beyond the tolerance.
"""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_lowrank import (
    LoRA,
    adapter_layers,
    export_peft,
    import_peft,
    inject,
    load_adapter,
    save_adapter,
)
from lightning_lowrank.methods.adalora import AdaLoRA
from lightning_lowrank.methods.base import AdapterLayer
from lightning_lowrank.methods.dora import DoRA
from lightning_lowrank.methods.singlora import SingLoRA
from lightning_lowrank.methods.sltrain import SLTrain
from lightning_lowrank.methods.vera import VeRA
from lightning_lowrank.peft import PeftExportError, peft_adapter
from lightning_lowrank.schedules.delta_lora import DeltaLoRA
from lightning_lowrank.schedules.lora_drop import LoRADrop
from tests.conftest import assert_unchanged, snapshot, tiny_bert, tiny_gpt2

peft = pytest.importorskip("peft")

ATOL = 1e-5
BUILDERS = {"bert": tiny_bert, "gpt2": tiny_gpt2}
LINEAR_TARGETS = {"bert": ["query", "value", "dense"], "gpt2": ["c_attn", "c_proj", "c_fc"]}
EMBEDDINGS = {"bert": "word_embeddings", "gpt2": "wte"}


def _ids() -> torch.Tensor:
    return torch.tensor([[1, 5, 9, 3, 60, 2, 7], [4, 4, 0, 33, 12, 8, 63]])


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids()).logits


@torch.no_grad()
def _randomise(params, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _randomise_ours(model: nn.Module, seed: int = 1) -> None:
    # additive noise on every adapter parameter: B leaves zero, DoRA's m stays near ||W0||
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for name, p in layer.named_parameters():
                if not name.startswith("base."):
                    p.add_(torch.randn(p.shape, generator=gen) * 0.3)


def _randomise_peft(model: nn.Module) -> None:
    _randomise(p for n, p in model.named_parameters() if "lora_" in n)


def _from_pretrained(arch: str, directory) -> nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(BUILDERS[arch](), str(directory)).eval()


# --- export: a model here -> PEFT ----------------------------------------------------------------


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
@pytest.mark.parametrize(
    "method",
    [
        LoRA(rank=4, alpha=8),
        LoRA(rank=4, alpha=6, scaling="rslora"),
        LoRA(rank=2, alpha=4, train_a=False),  # LoRA-FA: a plain pair in PEFT
    ],
    ids=["lora", "rslora", "lora-fa"],
)
def test_export_loads_in_peft_with_same_outputs(arch, method, tmp_path):
    model = BUILDERS[arch]()
    base = _logits(model)
    inject(model, method, target_modules=LINEAR_TARGETS[arch])
    _randomise_ours(model)
    ours = _logits(model)
    assert (ours - base).abs().max() > 100 * ATOL  # the adapter matters

    export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["r"] == method.rank and config["lora_alpha"] == method.alpha
    assert config["use_rslora"] == (method.scaling == "rslora")
    assert config["fan_in_fan_out"] == (arch == "gpt2")
    assert config["target_modules"] == sorted(LINEAR_TARGETS[arch])
    theirs = _logits(_from_pretrained(arch, tmp_path))
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_export_embeddings_and_per_layer_ranks(arch, tmp_path):
    model = BUILDERS[arch]()
    targets = [EMBEDDINGS[arch], LINEAR_TARGETS[arch][0]]
    names = inject(model, LoRA(rank=4, alpha=8), target_modules=targets)
    _randomise_ours(model)
    # give one layer its own rank and alpha, as a loaded AdaLoRA or PEFT rank_pattern would
    odd = names[-1]
    layer = adapter_layers(model)[odd]
    replacement = type(layer)(layer.base, layer.config, rank=2, alpha=3.0)
    _randomise(replacement.adapter_state_dict().values(), seed=5)
    parent, _, child = odd.rpartition(".")
    setattr(model.get_submodule(parent), child, replacement)
    ours = _logits(model)

    export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {odd: 2} and config["alpha_pattern"] == {odd: 3.0}
    keys = load_file(tmp_path / "adapter_model.safetensors")
    emb = f"base_model.model.{names[0]}"
    assert keys[f"{emb}.lora_embedding_A"].shape == (4, 64)
    assert keys[f"{emb}.lora_embedding_B"].shape == (16, 4)
    theirs = _logits(_from_pretrained(arch, tmp_path))
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)


class Wrapper(L.LightningModule):
    """A LightningModule holding the transformers model as ``self.model``, with a layer of its
    own outside it."""

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.model = hf_model
        self.extra = nn.Linear(2, 2)

    def forward(self, input_ids):
        return self.model(input_ids=input_ids)


def test_export_names_keys_relative_to_the_transformers_model(tmp_path):
    wrapper = Wrapper(tiny_bert())
    inject(
        wrapper,
        LoRA(rank=4, alpha=8),
        target_modules=["query", "value"],
        train_modules=["classifier"],
    )
    _randomise_ours(wrapper)
    _randomise(wrapper.model.classifier.parameters(), seed=7)  # a trained head
    ours = _logits(wrapper)

    export_peft(wrapper, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"]
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.classifier.weight" in keys
    assert all(k.startswith("base_model.model.bert.") or "classifier" in k for k in keys)
    theirs = _logits(_from_pretrained("bert", tmp_path))
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)


def _set_step(model: nn.Module, step: int) -> None:
    for layer in adapter_layers(model).values():
        layer.set_step(step)


def _mask_adalora(model: nn.Module) -> None:
    """Prune AdaLoRA slots as the allocator does (mask 0, lambda 0): a different number per
    layer, one layer entirely."""
    with torch.no_grad():
        for i, layer in enumerate(adapter_layers(model).values()):
            pruned = slice(0, layer.rank) if i == 1 else slice(0, i % layer.rank)
            layer.rank_mask[pruned] = 0
            layer.lora_E[pruned] = 0


# method, targets per arch, and what to do after randomising (a ramp value, a pruning pattern)
EXACT_METHODS = {
    "dora": (lambda: DoRA(rank=4, alpha=8), "with-embedding", None),
    "dora-rslora": (lambda: DoRA(rank=4, alpha=6, scaling="rslora"), "linear", None),
    "singlora": (lambda: SingLoRA(rank=4, alpha=8, ramp_steps=10), "linear", 4),
    "singlora-full-ramp": (lambda: SingLoRA(rank=4, alpha=8, ramp_steps=10), "with-embedding", 20),
    "dora-singlora": (lambda: DoRA(rank=4, alpha=8, delta="singlora", ramp_steps=10), "linear", 7),
    "adalora": (lambda: AdaLoRA(init_rank=6, target_rank=3, alpha=8), "linear", "prune"),
    "vera": (lambda: VeRA(rank=8, d_init=1.0), "linear", None),
}


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
@pytest.mark.parametrize("case", list(EXACT_METHODS))
def test_export_of_every_exact_method_loads_in_peft(arch, case, tmp_path):
    make, targets, after = EXACT_METHODS[case]
    model = BUILDERS[arch]()
    base = _logits(model)
    target_modules = LINEAR_TARGETS[arch] + (
        [EMBEDDINGS[arch]] if targets == "with-embedding" else []
    )
    inject(model, make(), target_modules=target_modules)
    _randomise_ours(model)
    if after == "prune":
        _mask_adalora(model)
    elif after is not None:
        _set_step(model, after)  # SingLoRA's ramp u(t) = min(t / 10, 1)
    ours = _logits(model)
    assert (ours - base).abs().max() > 100 * ATOL

    export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] == case.startswith("dora")
    if case == "adalora":
        # per-layer ranks after truncation; the fully pruned layer is left out
        ranks = {n: layer.live_rank() for n, layer in adapter_layers(model).items()}
        written = {
            k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            for k in load_file(tmp_path / "adapter_model.safetensors")
            if k.endswith("lora_A.weight")
        }
        assert written == {n for n, r in ranks.items() if r > 0}
        assert {n: config["rank_pattern"].get(n, config["r"]) for n in written} == {
            n: ranks[n] for n in written
        }
    theirs = _logits(_from_pretrained(arch, tmp_path))
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
    # and back: imported as LoRA / DoRA pairs, the model computes the same again
    fresh = BUILDERS[arch]()
    import_peft(fresh, tmp_path)
    torch.testing.assert_close(_logits(fresh), ours, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["share", "drop"])
def test_export_after_lora_drop_writes_per_layer_copies(mode, tmp_path):
    model = tiny_bert()
    inject(model, LoRA(rank=4, alpha=8), target_modules=LINEAR_TARGETS["bert"])
    _randomise_ours(model)
    layers = adapter_layers(model)
    drop = LoRADrop(threshold=0.5, sample_steps=1, mode=mode, log_table=False)
    drop.setup(model, layers, total_steps=10)
    model.train()
    model(input_ids=_ids())  # the sampling phase measures the adapters' outputs
    model.eval()
    drop.after_optimizer_step(model, layers, step=1)  # the switch: share or drop the others
    assert drop.groups
    _randomise_ours(model, seed=3)  # train on: shared pairs move together
    ours = _logits(model)

    export_peft(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    host, member = drop.groups[0][:2]
    if mode == "share":
        a = "base_model.model.{}.lora_A.weight"
        assert torch.equal(tensors[a.format(host)], tensors[a.format(member)])
    else:  # dropped layers add nothing: they are left out
        assert not any(k.startswith(f"base_model.model.{host}.") for k in tensors)
    theirs = _logits(_from_pretrained("bert", tmp_path))
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
    # a model rebuilt from this library's adapter file (members hold the host's Parameters)
    # exports the same files
    save_adapter(model, tmp_path / "adapter.safetensors")
    fresh = tiny_bert()
    load_adapter(fresh, tmp_path / "adapter.safetensors")
    export_peft(fresh, tmp_path / "again")
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert again.keys() == tensors.keys()
    assert all(torch.equal(again[k], v) for k, v in tensors.items())


class Nested(nn.Module):
    """A plain module where one adapted name ends with another: ``q`` and ``inner.q``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q = nn.Linear(8, 8)
        self.inner = nn.Module()
        self.inner.q = nn.Linear(8, 8)
        self.other = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.other(self.inner.q(self.q(x)))


def test_per_layer_ranks_of_nested_names_use_anchored_patterns(tmp_path):
    from peft import PeftModel

    model = Nested()
    inject(model, LoRA(rank=4, alpha=8), target_modules=["q", "other"])
    layer = adapter_layers(model)["q"]
    model.q = type(layer)(layer.base, layer.config, rank=2)  # "q" differs, "inner.q" does not
    _randomise_ours(model)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(x)

    export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    # a plain key "q" would also match "inner.q" in PEFT's end-of-name regex
    assert config["rank_pattern"] == {"^q": 2}
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(Nested(), str(tmp_path))(x)
        fresh = Nested()
        import_peft(fresh, tmp_path)
        back = fresh(x)
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
    torch.testing.assert_close(back, ours, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "method",
    [SingLoRA(rank=4, alpha=8, ramp_steps=4), DoRA(rank=4, alpha=8)],
    ids=["singlora", "dora"],
)
def test_trained_with_the_callback_then_exported(method, tmp_path):
    """A few real optimizer steps through LowRankCallback (adapters, a new head, SingLoRA's ramp
    at u = 3/4), then the export loads in PEFT with the same outputs."""
    from torch.utils.data import DataLoader

    from lightning_lowrank import LowRankCallback
    from lightning_lowrank.demos import TextClassifier

    module = TextClassifier(tiny_bert(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    batches = [
        {
            "input_ids": torch.randint(1, 64, (4, 7), generator=gen),
            "labels": torch.tensor([0, 1, 2, 1]),
        }
        for _ in range(3)
    ]
    trainer = L.Trainer(
        max_steps=3,
        callbacks=[
            LowRankCallback(method, target_modules=["query", "value"], train_modules=["classifier"])
        ],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, DataLoader(batches, batch_size=None))
    module.eval()
    ours = _logits(module.model)
    if isinstance(method, SingLoRA):  # the ramp stands between 0 and 1: u = 3 / 4
        assert {int(layer.step) for layer in adapter_layers(module).values()} == {3}

    export_peft(module, tmp_path)
    theirs = _logits(_from_pretrained("bert", tmp_path))
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
    # the trained head travels as modules_to_save, and the adapters did move
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == [
        "classifier"
    ]
    assert (ours - _logits(tiny_bert())).abs().max() > 100 * ATOL


# --- import: PEFT -> a model here ----------------------------------------------------------------


def _peft_adapter(arch: str, directory, **kwargs) -> torch.Tensor:
    """Save a randomised PEFT LoRA adapter to ``directory``; return PEFT's logits."""
    from peft import LoraConfig, get_peft_model

    kwargs.setdefault("target_modules", LINEAR_TARGETS[arch])
    peft_model = get_peft_model(
        BUILDERS[arch](), LoraConfig(fan_in_fan_out=arch == "gpt2", **kwargs)
    ).eval()
    _randomise_peft(peft_model)
    peft_model.save_pretrained(str(directory))
    return _logits(peft_model)


IMPORT_OPTIONS = {
    "lora": {"bert": {"r": 4, "lora_alpha": 8}, "gpt2": {"r": 4, "lora_alpha": 8}},
    "rslora": {
        "bert": {"r": 4, "lora_alpha": 6, "use_rslora": True},
        "gpt2": {"r": 4, "lora_alpha": 6, "use_rslora": True},
    },
    "rank-pattern": {
        "bert": {"r": 4, "lora_alpha": 8, "rank_pattern": {"0.attention.self.query": 2}},
        "gpt2": {"r": 4, "lora_alpha": 8, "rank_pattern": {"h.1.attn.c_attn": 3}},
    },
    "alpha-pattern": {
        "bert": {"r": 2, "lora_alpha": 8, "alpha_pattern": {"value": 2}},
        "gpt2": {"r": 2, "lora_alpha": 8, "alpha_pattern": {"c_fc": 3}},
    },
}


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
@pytest.mark.parametrize("option", list(IMPORT_OPTIONS))
def test_import_gives_peft_outputs(arch, option, tmp_path):
    expected = _peft_adapter(arch, tmp_path, **IMPORT_OPTIONS[option][arch])
    model = BUILDERS[arch]()
    names = import_peft(model, tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(f"base_model.model.{n}.lora_A.weight" for n in names) == sorted(
        k for k in keys if k.endswith("lora_A.weight")
    )
    torch.testing.assert_close(_logits(model), expected, atol=ATOL, rtol=0)
    # the adapters train, the base does not
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_import_embeddings_and_modules_to_save(arch, tmp_path):
    save = {"bert": ["classifier"], "gpt2": ["ln_f"]}[arch]
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        BUILDERS[arch](),
        LoraConfig(r=4, lora_alpha=8, target_modules=[EMBEDDINGS[arch]], modules_to_save=save),
    ).eval()
    _randomise_peft(peft_model)
    _randomise((p for n, p in peft_model.named_parameters() if "modules_to_save" in n), seed=9)
    peft_model.save_pretrained(str(tmp_path))
    expected = _logits(peft_model)

    wrapper = Wrapper(BUILDERS[arch]())
    names = import_peft(wrapper, tmp_path)
    assert names == [
        f"model.{n}" for n, m in BUILDERS[arch]().named_modules() if n.endswith(EMBEDDINGS[arch])
    ]
    torch.testing.assert_close(_logits(wrapper), expected, atol=ATOL, rtol=0)
    head = wrapper.model.get_submodule(
        next(n for n, _ in wrapper.model.named_modules() if n.endswith(save[0]))
    )
    assert all(p.requires_grad for p in head.parameters())


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_import_dora_gives_peft_outputs(arch, tmp_path):
    targets = LINEAR_TARGETS[arch] + [EMBEDDINGS[arch]]
    expected = _peft_adapter(
        arch,
        tmp_path,
        r=4,
        lora_alpha=8,
        use_dora=True,
        target_modules=targets,
        rank_pattern={LINEAR_TARGETS[arch][0]: 2},
    )
    model = BUILDERS[arch]()
    import_peft(model, tmp_path)
    layers = adapter_layers(model)
    assert all(type(layer).__name__ == "DoRALayer" for layer in layers.values())
    torch.testing.assert_close(_logits(model), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_imported_per_layer_ranks_survive_save_and_load_adapter(use_dora, tmp_path):
    expected = _peft_adapter(
        "gpt2",
        tmp_path,
        r=4,
        lora_alpha=8,
        use_dora=use_dora,
        rank_pattern={"h.1.attn.c_attn": 2},
        alpha_pattern={"c_fc": 3},
    )
    model = tiny_gpt2()
    import_peft(model, tmp_path)
    save_adapter(model, tmp_path / "ours.safetensors")
    fresh = tiny_gpt2()
    load_adapter(fresh, tmp_path / "ours.safetensors")
    assert adapter_layers(fresh)["transformer.h.1.attn.c_attn"].lora_A.shape == (2, 16)
    torch.testing.assert_close(_logits(fresh), expected, atol=ATOL, rtol=0)


def test_round_trip_here_peft_here(tmp_path):
    model = tiny_gpt2()
    inject(model, LoRA(rank=4, alpha=8, scaling="rslora"), target_modules=["c_attn", "wte"])
    _randomise_ours(model)
    export_peft(model, tmp_path)
    fresh = tiny_gpt2()
    import_peft(fresh, tmp_path)
    torch.testing.assert_close(_logits(fresh), _logits(model), atol=1e-6, rtol=0)
    assert adapter_layers(fresh)["transformer.wte"].config.scaling == "rslora"


# --- errors: clear messages, nothing written or changed ------------------------------------------


class FullDeltaLayer(AdapterLayer):
    """A method whose update is not a product of two factors (like SLTrain's sparse part)."""

    def __init__(self, base: nn.Module, config) -> None:
        super().__init__(base, config)
        self.delta = nn.Parameter(torch.zeros(self.out_features, self.in_features))

    def adapter_forward(self, x):
        return nn.functional.linear(x, self.delta)

    def delta_weight(self):
        return self.delta

    def param_sides(self):
        return {"delta": "B"}


def test_export_refuses_a_method_without_a_peft_form_and_writes_nothing(tmp_path):
    model = tiny_bert()
    inject(model, LoRA(rank=2), target_modules=["query"])
    name = next(iter(adapter_layers(model)))
    parent, _, child = name.rpartition(".")
    lora = adapter_layers(model)[name]
    setattr(model.get_submodule(parent), child, FullDeltaLayer(lora.base, lora.config))
    target = tmp_path / "out"
    with pytest.raises(PeftExportError, match="unload\\(model\\)"):
        export_peft(model, target)
    assert not target.exists()


def _swap_first_layer(model: nn.Module, make) -> None:
    name, layer = next(iter(adapter_layers(model).items()))
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, make(layer))


def test_export_refuses_sltrain_and_writes_nothing(tmp_path):
    model = tiny_bert()
    inject(model, SLTrain(rank=2, alpha=4), target_modules=["query"])
    with pytest.raises(PeftExportError, match="sparse part"):
        export_peft(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_delta_lora_base_delta_and_writes_nothing(tmp_path):
    model = tiny_bert()
    inject(model, LoRA(rank=2, alpha=4), target_modules=["query"])
    DeltaLoRA(scale=2.0, start_step=0).setup(model, adapter_layers(model), total_steps=None)
    (tmp_path / "out").mkdir()
    with pytest.raises(PeftExportError, match="Delta-LoRA.*unload\\(model\\)"):
        export_peft(model, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_export_without_adapters_raises(tmp_path):
    with pytest.raises(ValueError, match="inject"):
        export_peft(tiny_bert(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    assert not adapter_layers(model)
    assert_unchanged(model, before)


@pytest.fixture
def bert_adapter(tmp_path):
    _peft_adapter("bert", tmp_path, r=4, lora_alpha=8)
    return tmp_path


def _edit_config(directory, **changes) -> None:
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _edit_weights(directory, edit) -> None:
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _first_key(tensors, suffix):
    return next(k for k in sorted(tensors) if k.endswith(suffix))


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda d: _edit_config(d, peft_type="VERA"), "only PEFT LoRA adapters"),
        (lambda d: _edit_config(d, bias="all"), "bias='all'"),
        (lambda d: _edit_config(d, init_lora_weights="pissa"), "changed the base weights"),
        (lambda d: _edit_config(d, r=8), "rank 4 in the weights but 8"),
        (lambda d: (d / "adapter_config.json").write_text("{not json"), "not valid JSON"),
        (
            lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x00" * 40),
            "not a valid safetensors",
        ),
        (lambda d: (d / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors"),
        (
            lambda d: _edit_weights(
                d, lambda t: t.__setitem__(_first_key(t, "lora_B.weight"), torch.zeros(3, 4))
            ),
            "has shape \\(3, 4\\)",
        ),
        (
            lambda d: _edit_weights(
                d,
                lambda t: t.__setitem__(
                    _first_key(t, "lora_B.weight"), torch.full((16, 4), float("nan"))
                ),
            ),
            "non-finite",
        ),
        (
            lambda d: _edit_weights(
                d,
                lambda t: t.__setitem__(
                    "base_model.model.bert.nothing.lora_A.weight", torch.zeros(4, 16)
                ),
            ),
            "which this model lacks",
        ),
        (
            lambda d: _edit_weights(
                d, lambda t: t.__setitem__("base_model.model.bert.extra", torch.zeros(2))
            ),
            "unexpected key",
        ),
        (
            lambda d: _edit_weights(d, lambda t: t.pop(_first_key(t, "lora_A.weight"))),
            "are expected",
        ),
    ],
    ids=[
        "peft-type",
        "bias",
        "pissa",
        "rank-mismatch",
        "bad-json",
        "corrupt-file",
        "missing-file",
        "shape",
        "nan",
        "missing-module",
        "unknown-key",
        "missing-factor",
    ],
)
def test_import_errors_leave_the_model_untouched(bert_adapter, corrupt, message):
    corrupt(bert_adapter)
    model = tiny_bert()
    before = snapshot(model)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        import_peft(model, bert_adapter)
    _assert_untouched(model, before)


def test_import_refuses_a_pickled_adapter(bert_adapter):
    (bert_adapter / "adapter_model.safetensors").rename(bert_adapter / "adapter_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        import_peft(tiny_bert(), bert_adapter)


def test_import_into_a_model_with_adapters_raises(bert_adapter):
    model = tiny_bert()
    inject(model, LoRA(rank=2), target_modules=["key"])
    before = snapshot(model)
    with pytest.raises(ValueError, match="already has adapters"):
        import_peft(model, bert_adapter)
    assert list(adapter_layers(model)) == [n for n in adapter_layers(model) if n.endswith("key")]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_import_into_another_model_size_raises(bert_adapter):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    wider = BertForSequenceClassification(
        BertConfig(
            vocab_size=64,
            hidden_size=24,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
            num_labels=3,
        )
    )
    before = snapshot(wider)
    with pytest.raises(ValueError, match="another base model size"):
        import_peft(wider, bert_adapter)
    _assert_untouched(wider, before)


def test_peft_adapter_config_is_json_and_complete():
    model = tiny_gpt2()
    inject(model, LoRA(rank=4, alpha=8), target_modules=["c_attn"])
    config, tensors = peft_adapter(model)
    json.dumps(config)
    assert set(tensors) == {
        f"base_model.model.transformer.h.{i}.attn.c_attn.lora_{s}.weight"
        for i in (0, 1)
        for s in "AB"
    }
    assert config["target_modules"] == ["c_attn"] and config["use_dora"] is False
