"""A LoRA variant defined in a user's own module (``user_variant.py``) works end to end: inject,
train (a plain loop and ``Trainer.fit`` with ``LowRankCallback``), save/load onto a fresh model,
PEFT export and import, LightningCLI's ``class_path``; and config names cannot clash."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import types
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from lightning_lowrank import (
    LoRA,
    LowRankCallback,
    adapter_layers,
    export_peft,
    import_peft,
    inject,
    load_adapter,
    save_adapter,
)
from lightning_lowrank.methods import (
    CONFIG_TYPES,
    AdapterConfig,
    ConfigNameClash,
    LoRALayer,
    config_from_dict,
)
from lightning_lowrank.methods import registry as methods_registry
from lightning_lowrank.peft import read_peft
from tests.conftest import MLP
from tests.methods.user_variant import MyLoRA, MyLoRALayer

REPO = Path(__file__).resolve().parents[2]
TARGETS = ["fc1", "fc2"]


def _ids(seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 20, (6, 5), generator=torch.Generator().manual_seed(seed))


def _trained(config: AdapterConfig, steps: int = 5) -> MLP:
    torch.manual_seed(0)
    model = MLP().double()
    inject(model, config, target_modules=TARGETS)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    for step in range(steps):
        loss = nn.functional.cross_entropy(model(_ids(step)), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture
def registry():
    """Restores the config registry after a test that defines throwaway configs."""
    saved = dict(methods_registry._REGISTRY)
    yield
    methods_registry._REGISTRY.clear()
    methods_registry._REGISTRY.update(saved)


def test_the_variant_registers_by_name_with_its_own_layer_and_init():
    assert CONFIG_TYPES["MyLoRA"] is MyLoRA
    assert CONFIG_TYPES["LoRA"] is LoRA
    config = MyLoRA(rank=3, alpha=6.0, a_std=0.5)
    assert config_from_dict(config.to_dict()) == config
    torch.manual_seed(0)
    model = MLP().double()
    inject(model, config, target_modules=TARGETS)
    layers = adapter_layers(model)
    assert set(layers) == set(TARGETS)
    for layer in layers.values():
        assert type(layer) is MyLoRALayer
        # N(0, 0.5^2), not Kaiming-uniform: |A| exceeds the uniform bound 1/sqrt(in) somewhere
        assert layer.lora_A.abs().max() > 1 / layer.in_features**0.5
        assert 0.3 < float(layer.lora_A.detach().std()) < 0.7
        assert float(layer.fan_in) == layer.in_features
        assert torch.count_nonzero(layer.lora_B) == 0
        assert set(layer.param_sides()) == {"lora_A", "lora_B"}


def test_trains_saves_and_loads_onto_a_fresh_model(tmp_path):
    config = MyLoRA(rank=3, alpha=6.0, a_std=0.3)
    model = _trained(config)
    layer = adapter_layers(model)["fc1"]
    assert torch.count_nonzero(layer.lora_B) > 0  # the optimizer steps moved B
    expected = model(_ids())
    path = save_adapter(model, tmp_path / "adapter.safetensors")
    torch.manual_seed(0)
    fresh = MLP().double().eval()
    assert not torch.equal(fresh(_ids()), expected)
    assert sorted(load_adapter(fresh, path)) == TARGETS
    for name, loaded in adapter_layers(fresh).items():
        assert type(loaded) is MyLoRALayer and loaded.config == config
        for key, value in adapter_layers(model)[name].adapter_state_dict().items():
            assert torch.equal(loaded.adapter_state_dict()[key], value), key
    torch.testing.assert_close(fresh(_ids()), expected, rtol=0, atol=0)


def test_loads_once_its_module_is_imported(tmp_path):
    """In a new interpreter the file names an unknown method until the user's module is
    imported; then it loads to the same outputs."""
    model = _trained(MyLoRA(rank=2, alpha=4.0))
    path = save_adapter(model, tmp_path / "adapter.safetensors")
    torch.save(model(_ids()), tmp_path / "expected.pt")
    script = f"""
import importlib, torch
from tests.conftest import MLP
from lightning_lowrank import load_adapter
torch.manual_seed(0)
fresh = MLP().double().eval()
try:
    load_adapter(fresh, {str(path)!r})
except ValueError as err:
    assert "MyLoRA" in str(err) and "import" in str(err), err
else:
    raise AssertionError("loaded before the module defining MyLoRA was imported")
importlib.import_module("tests.methods.user_variant")
load_adapter(fresh, {str(path)!r})
ids = torch.randint(0, 20, (6, 5), generator=torch.Generator().manual_seed(3))
torch.testing.assert_close(fresh(ids), torch.load({str(tmp_path / "expected.pt")!r}), rtol=0, atol=0)
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_exports_to_peft_exactly_and_imports_back(tmp_path):
    model = _trained(MyLoRA(rank=3, alpha=6.0, a_std=0.3))
    export_peft(model, tmp_path)
    config, tensors = read_peft(tmp_path)
    assert (config["r"], config["lora_alpha"], config["use_dora"]) == (3, 6.0, False)
    for name, layer in adapter_layers(model).items():
        key = f"base_model.model.{name}"
        assert torch.equal(tensors[f"{key}.lora_A.weight"], layer.lora_A.detach())
        assert torch.equal(tensors[f"{key}.lora_B.weight"], layer.lora_B.detach())
    torch.manual_seed(0)
    fresh = MLP().double().eval()
    assert sorted(import_peft(fresh, tmp_path)) == TARGETS
    assert all(type(la) is LoRALayer for la in adapter_layers(fresh).values())
    torch.testing.assert_close(fresh(_ids()), model(_ids()), rtol=0, atol=0)


class _Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = MLP()

    def training_step(self, batch, batch_idx):
        ids, labels = batch
        return nn.functional.cross_entropy(self.model(ids), labels)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=1e-2)


def test_trainer_fit_with_the_callback_then_save_load_and_export(tmp_path):
    from torch.utils.data import DataLoader

    config = MyLoRA(rank=2, alpha=4.0, a_std=0.1)
    module = _Classifier()
    batches = [(_ids(i), torch.tensor([0, 1, 2, 0, 1, 2])) for i in range(3)]
    trainer = L.Trainer(
        max_steps=3,
        callbacks=[LowRankCallback(config, target_modules=TARGETS)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, DataLoader(batches, batch_size=None))
    layers = adapter_layers(module)
    assert {type(la) for la in layers.values()} == {MyLoRALayer}
    assert all(torch.count_nonzero(la.lora_B) > 0 for la in layers.values())
    module.eval()
    expected = module.model(_ids())
    path = save_adapter(module.model, tmp_path / "adapter.safetensors")
    torch.manual_seed(0)
    fresh = MLP().eval()
    load_adapter(fresh, path)
    torch.testing.assert_close(fresh(_ids()), expected, rtol=0, atol=0)
    export_peft(module.model, tmp_path / "peft")
    torch.manual_seed(0)
    imported = MLP().eval()
    import_peft(imported, tmp_path / "peft")
    torch.testing.assert_close(imported(_ids()), expected, rtol=1e-6, atol=1e-6)


def test_lightning_cli_class_path_resolves_the_users_config(tmp_path, monkeypatch):
    yaml = pytest.importorskip("yaml")
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

    config = MyLoRA(rank=2, alpha=4.0, a_std=0.25)
    fields = {k: v for k, v in config.to_dict().items() if k != "type"}
    spec = {
        "trainer": {
            "logger": False,
            "callbacks": [
                {
                    "class_path": "lightning_lowrank.LowRankCallback",
                    "init_args": {
                        "method": {
                            "class_path": "tests.methods.user_variant.MyLoRA",
                            "init_args": fields,
                        },
                        "target_modules": ["layer"],
                    },
                }
            ],
        }
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(spec))
    monkeypatch.setattr("sys.argv", ["train.py"])
    cli = LightningCLI(
        BoringModel,
        BoringDataModule,
        run=False,
        args=["--config", str(path)],
        save_config_callback=None,
    )
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, LowRankCallback)]
    assert type(callback.method) is MyLoRA
    assert callback.method == config


def test_a_clashing_name_raises_and_keeps_the_registered_class(registry):
    with pytest.raises(ConfigNameClash, match="'LoRA' is taken by lightning_lowrank.methods.lora"):

        @dataclasses.dataclass
        class LoRA(AdapterConfig):  # noqa: F811 - the clash is the point
            rank: int = 1

    assert CONFIG_TYPES["LoRA"].__module__ == "lightning_lowrank.methods.lora"
    with pytest.raises(ConfigNameClash, match="MyLoRA"):
        type("MyLoRA", (MyLoRA,), {"__module__": "someone_else"})
    assert CONFIG_TYPES["MyLoRA"] is MyLoRA


def test_redefining_the_same_class_replaces_it(registry, monkeypatch):
    """A notebook cell run twice (same module, same qualified name) is not a clash."""
    cell = types.ModuleType("notebook_cell")
    monkeypatch.setitem(sys.modules, "notebook_cell", cell)
    source = (
        "from dataclasses import dataclass\n"
        "from tests.methods.user_variant import MyLoRA\n"
        "@dataclass\n"
        "class CellLoRA(MyLoRA):\n"
        "    extra: int = 1\n"
    )
    exec(source, cell.__dict__)
    first = cell.CellLoRA
    exec(source, cell.__dict__)
    assert cell.CellLoRA is not first
    assert CONFIG_TYPES["CellLoRA"] is cell.CellLoRA
    assert config_from_dict(cell.CellLoRA(rank=2, extra=3).to_dict()) == cell.CellLoRA(
        rank=2, extra=3
    )


def test_register_false_keeps_a_config_out_of_the_registry(registry):
    @dataclasses.dataclass
    class Draft(MyLoRA, register=False):
        pass

    assert "Draft" not in CONFIG_TYPES
    with pytest.raises(ValueError, match="unknown adapter method 'Draft'.*import it first"):
        config_from_dict(Draft(rank=2).to_dict())


def test_the_registry_is_read_only():
    with pytest.raises(TypeError):
        CONFIG_TYPES["MyLoRA"] = LoRA  # type: ignore[index]
