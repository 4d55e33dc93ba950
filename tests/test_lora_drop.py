"""LoRA-drop: importance, selection, sharing / dropping, optimizer state, files, resume and DDP."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lowrank import (
    DoRA,
    LoRA,
    LoRADrop,
    LowRankCallback,
    SingLoRA,
    adapter_layers,
    adapter_state_dict,
    inject,
    load_adapter,
    retie_shared,
    save_adapter,
    trainable_parameter_count,
)
from lightning_lowrank.schedules.lora_drop import adapter_parameters, select_layers, shape_groups
from tests.ddp_utils import run_ddp

TARGETS = r"blocks\.\d|head"


class Stack(nn.Module):
    """Four same-shape layers and a head of another shape."""

    def __init__(self, d: int = 8, classes: int = 3, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.Linear(d, d, dtype=dtype) for _ in range(4)])
        self.head = nn.Linear(d, classes, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        return self.head(x)


def _randomise_adapters(model: nn.Module, seed: int = 1) -> None:
    """Nonzero adapters (B is zero at init), so that every layer has an output to measure."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for p in adapter_parameters(layer).values():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def _switched(mode: str = "share", shared_init: str = "mean", method=None):
    """A Stack with adapters and a schedule switched on crafted importances: blocks.0 and head
    kept, blocks.1-3 unselected (one shape group)."""
    model = Stack()
    layers = {n: model.get_submodule(n) for n in inject(model, method or LoRA(rank=2), TARGETS)}
    _randomise_adapters(model)
    schedule = LoRADrop(
        threshold=0.9, sample_steps=1, mode=mode, shared_init=shared_init, log_table=False
    )
    schedule.setup(model, layers, None)
    schedule.importance = {
        "blocks.0": 5.0,
        "blocks.1": 0.4,
        "blocks.2": 0.3,
        "blocks.3": 0.3,
        "head": 4.0,
    }
    schedule.calls = dict.fromkeys(layers, 1)
    return model, layers, schedule


# --- importance --------------------------------------------------------------------------------
def test_importance_equals_float64_sum_of_squared_adapter_outputs():
    model = Stack(dtype=torch.float64)
    layers = {n: model.get_submodule(n) for n in inject(model, LoRA(rank=2, alpha=3.0), TARGETS)}
    _randomise_adapters(model)
    schedule = LoRADrop(sample_steps=10)
    schedule.setup(model, layers, None)
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    for name, layer in layers.items():
        layer.register_forward_pre_hook(lambda m, args, n=name: inputs[n].append(args[0].detach()))
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(3):
        model(torch.randn(5, 8, generator=g, dtype=torch.float64)).sum().backward()
    expected = {
        n: sum((x @ layers[n].delta_weight().T).square().sum().item() for x in xs)
        for n, xs in inputs.items()
    }
    # validation-style forwards (eval mode, or without grad) are not part of g
    model.eval()
    model(torch.randn(5, 8, dtype=torch.float64))
    model.train()
    with torch.no_grad():
        model(torch.randn(5, 8, dtype=torch.float64))
    schedule.after_optimizer_step(model, layers, 1)
    for name in layers:
        assert schedule.importance[name] == pytest.approx(expected[name], rel=1e-12)
        assert schedule.calls[name] == 1
    assert len({round(v, 6) for v in expected.values()}) == len(expected)  # a real ranking


# --- selection ---------------------------------------------------------------------------------
def test_cumulative_threshold_picks_expected_layers():
    importance = {"a": 0.05, "b": 0.5, "c": 0.15, "d": 0.3}
    assert select_layers(importance, 0.9) == ["b", "c", "d"]  # 0.5 + 0.3 + 0.15 crosses 0.9
    assert select_layers(importance, 0.8) == ["b", "d"]  # reaching the threshold is enough
    assert select_layers(importance, 0.81) == ["b", "c", "d"]
    assert select_layers(importance, 0.5) == ["b"]
    assert select_layers(importance, 1.0) == ["a", "b", "c", "d"]
    # unnormalised values select the same layers
    assert select_layers({k: 7 * v for k, v in importance.items()}, 0.9) == ["b", "c", "d"]
    with pytest.raises(ValueError, match="learning rate"):
        select_layers({"a": 0.0, "b": 0.0}, 0.9)


def test_shape_groups_keep_model_order():
    model = Stack()
    layers = {n: model.get_submodule(n) for n in inject(model, LoRA(rank=2), TARGETS)}
    assert shape_groups(layers, ["blocks.3", "head", "blocks.1"]) == [
        ["blocks.3", "blocks.1"],
        ["head"],
    ]


# --- the switch: sharing -------------------------------------------------------------------------
def test_switch_shares_storage_mean_init_and_parameter_count():
    model, layers, schedule = _switched()
    before = trainable_parameter_count(model)
    members = ["blocks.1", "blocks.2", "blocks.3"]
    old = {
        n: {k: p.detach().clone() for k, p in adapter_parameters(layers[n]).items()}
        for n in members
    }
    schedule.switch()
    assert schedule.selected == ["blocks.0", "head"]
    assert schedule.groups == [members]
    for pname in ("lora_A", "lora_B"):
        host = adapter_parameters(layers["blocks.1"])[pname]
        expected = torch.stack([old[n][pname] for n in members]).mean(dim=0)
        torch.testing.assert_close(host.detach(), expected, rtol=1e-6, atol=1e-7)
        for member in members[1:]:
            p = adapter_parameters(layers[member])[pname]
            assert p is not host and p.data_ptr() == host.data_ptr()  # own Parameter, tied storage
    torch.testing.assert_close(layers["blocks.2"].delta_weight(), layers["blocks.1"].delta_weight())
    torch.testing.assert_close(layers["blocks.3"].delta_weight(), layers["blocks.1"].delta_weight())
    per_layer = 2 * (8 + 8)  # rank 2, (8, 8) layers
    assert trainable_parameter_count(model) == before - 2 * per_layer
    assert schedule.parameters_after == schedule.parameters_before - 2 * per_layer
    assert [layers[n].shared_with for n in members] == [None, "blocks.1", "blocks.1"]


def test_fresh_shared_init_is_the_method_init_and_seeded():
    model, layers, schedule = _switched(shared_init="fresh")
    schedule.switch()
    host = adapter_parameters(layers["blocks.1"])
    assert torch.count_nonzero(host["lora_B"]) == 0  # LoRA's init: B = 0, a zero delta
    other, other_layers, other_schedule = _switched(shared_init="fresh")
    other_schedule.switch()
    torch.testing.assert_close(
        host["lora_A"], adapter_parameters(other_layers["blocks.1"])["lora_A"]
    )


def _step(model, x, y, opt, schedule=None, layers=None, step=0):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    if schedule is not None:
        schedule.before_optimizer_step(model, layers, step)
    opt.step()


def test_shared_gradient_is_the_sum_of_uses_and_optimizer_state_is_reset():
    model, layers, schedule = _switched()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    schedule.train_start(model, layers, 0, optimizers=[opt])
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    _step(model, x, y, opt)  # gives every adapter parameter an optimizer state
    schedule.switch()
    members = ["blocks.1", "blocks.2", "blocks.3"]
    for n in members:
        for p in adapter_parameters(layers[n]).values():
            assert p not in opt.state
    kept = adapter_parameters(layers["blocks.0"])["lora_A"]
    assert opt.state[kept]["step"] == 1

    # reference: the same model where the members hold the very same Parameter objects
    ref = Stack()
    ref_layers = {n: ref.get_submodule(n) for n in inject(ref, LoRA(rank=2), TARGETS)}
    ref.load_state_dict(model.state_dict())
    for n in members[1:]:
        for pname, p in adapter_parameters(ref_layers["blocks.1"]).items():
            setattr(ref_layers[n], pname, p)
    ref_opt = torch.optim.Adam([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    _step(ref, x, y, ref_opt)
    _step(model, x, y, opt, schedule, layers, 1)
    for n in members:
        assert all(
            p.grad is None for p in adapter_parameters(layers[n]).values() if n != "blocks.1"
        )
    for pname in ("lora_A", "lora_B"):
        shared = adapter_parameters(layers["blocks.1"])[pname]
        torch.testing.assert_close(shared, adapter_parameters(ref_layers["blocks.1"])[pname])
        assert adapter_parameters(layers["blocks.3"])[pname].data_ptr() == shared.data_ptr()
    for n in members:  # (the kept layers differ: their Adam moments were not reset)
        torch.testing.assert_close(layers[n](x), ref_layers[n](x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "method", [LoRA(rank=2), DoRA(rank=2), SingLoRA(rank=2)], ids=lambda m: type(m).__name__
)
def test_save_load_after_switch_round_trips_with_fewer_parameters(tmp_path, method):
    model, layers, schedule = _switched(method=method)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    schedule.train_start(model, layers, 0, optimizers=[opt])
    schedule.switch()
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    _step(model, x, y, opt, schedule, layers, 1)
    path = save_adapter(model, tmp_path / "drop.safetensors")
    with safe_open(str(path), framework="pt") as f:
        stored = sum(f.get_tensor(k).numel() for k in f.keys())
    full = sum(v.numel() for v in adapter_state_dict(model).values())
    member_share = sum(p.numel() for p in adapter_parameters(layers["blocks.2"]).values())
    assert stored == full - 2 * member_share

    fresh = Stack()
    load_adapter(fresh, path)
    model.eval()
    fresh.eval()
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    assert trainable_parameter_count(fresh) == trainable_parameter_count(model)
    assert trainable_parameter_count(fresh) < sum(
        p.numel() for p in adapter_state_dict(fresh).values()
    )
    fresh_layers = adapter_layers(fresh)
    host = adapter_parameters(fresh_layers["blocks.1"])
    for pname, p in adapter_parameters(fresh_layers["blocks.3"]).items():
        assert p is host[pname]  # re-tied: one Parameter object
    save_adapter(fresh, tmp_path / "again.safetensors")  # and saving it again keeps the sharing
    again = Stack()
    load_adapter(again, tmp_path / "again.safetensors")
    torch.testing.assert_close(again.eval()(x), model(x), rtol=0, atol=0)


def test_saving_a_submodule_names_the_shared_host_relative_to_it(tmp_path):
    outer = nn.Module()
    outer.net = Stack()
    names = inject(outer, LoRA(rank=2), r"net\.(blocks\.\d|head)")
    layers = {n: outer.get_submodule(n) for n in names}
    _randomise_adapters(outer)
    schedule = LoRADrop(sample_steps=1, log_table=False)
    schedule.setup(outer, layers, None)
    schedule.importance = dict(zip(names, [5.0, 0.4, 0.3, 0.3, 4.0], strict=True))
    schedule.calls = dict.fromkeys(names, 1)
    schedule.switch()
    assert layers["net.blocks.2"].shared_with == "net.blocks.1"
    path = save_adapter(outer.net, tmp_path / "net.safetensors")
    fresh = Stack()
    load_adapter(fresh, path)
    x = torch.randn(4, 8)
    torch.testing.assert_close(fresh.eval()(x), outer.net.eval()(x), rtol=0, atol=0)


# --- the plain variant: drop -------------------------------------------------------------------
def test_drop_mode_switches_adapters_off_and_files_leave_them_out(tmp_path):
    model, layers, schedule = _switched(mode="drop")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    schedule.train_start(model, layers, 0, optimizers=[opt])
    before = trainable_parameter_count(model)
    schedule.switch()
    dropped = ["blocks.1", "blocks.2", "blocks.3"]
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    for n in dropped:
        torch.testing.assert_close(layers[n](x), layers[n].base(x), rtol=0, atol=0)
        assert torch.count_nonzero(layers[n].delta_weight()) == 0
    frozen = {n: adapter_parameters(layers[n])["lora_B"].detach().clone() for n in dropped}
    _step(model, x, y, opt, schedule, layers, 1)
    for n in dropped:
        assert adapter_parameters(layers[n])["lora_B"].grad is None
        torch.testing.assert_close(
            adapter_parameters(layers[n])["lora_B"], frozen[n], rtol=0, atol=0
        )
    assert trainable_parameter_count(model) == before - 3 * 2 * (8 + 8)

    path = save_adapter(model, tmp_path / "drop.safetensors")
    fresh = Stack()
    assert sorted(load_adapter(fresh, path)) == ["blocks.0", "head"]
    model.eval()
    torch.testing.assert_close(fresh.eval()(x), model(x), rtol=0, atol=0)
    assert trainable_parameter_count(fresh) == trainable_parameter_count(model)
    # merging a dropped layer adds nothing
    w = layers["blocks.2"].base.weight.detach().clone()
    layers["blocks.2"].merge()
    torch.testing.assert_close(layers["blocks.2"].base.weight, w, rtol=0, atol=0)


# --- report and plot ---------------------------------------------------------------------------
def test_report_table_and_plot():
    import matplotlib

    matplotlib.use("Agg")
    _, _, schedule = _switched()
    schedule.switch()
    table = schedule.report()
    assert "kept 2 of 5 layers" in table
    lines = table.splitlines()
    assert lines[2].startswith("blocks.0") and lines[2].endswith("kept")  # most important first
    assert "shared #0 (3 layers)" in table
    ax = schedule.plot()
    assert len(ax.patches) == 5
    assert ax.get_legend() is not None


def test_warns_about_a_sampling_phase_longer_than_the_run():
    model = Stack()
    layers = {n: model.get_submodule(n) for n in inject(model, LoRA(rank=2), TARGETS)}
    with pytest.warns(UserWarning, match="sample_steps"):
        LoRADrop(sample_steps=10).setup(model, layers, 9)
    with pytest.raises(ValueError, match="threshold"):
        LoRADrop(threshold=0.0)


# --- inside a Trainer: resume across the switch ------------------------------------------------
class StackModule(L.LightningModule):
    def __init__(self, batch_size: int = 32) -> None:
        super().__init__()
        self.net = Stack()
        self.batch_size = batch_size

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.05, weight_decay=0.01)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(32, 8, generator=g)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size)


def _callback(schedule: LoRADrop) -> LowRankCallback:
    return LowRankCallback(
        LoRA(rank=2),
        target_modules=[f"blocks.{i}" for i in range(4)] + ["head"],
        schedules=[schedule],
    )


def _trainer(max_steps: int, cb: LowRankCallback, **kwargs) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
        **kwargs,
    )


def _fit(max_steps, ckpt_path=None, save=None, **drop_kwargs):
    module = StackModule()
    schedule = LoRADrop(threshold=0.6, sample_steps=3, log_table=False, **drop_kwargs)
    trainer = _trainer(max_steps, _callback(schedule))
    trainer.fit(module, ckpt_path=ckpt_path)
    if save is not None:
        trainer.save_checkpoint(save)
    return module, schedule


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["share", "drop"])
def test_resume_before_at_and_after_the_switch_equals_an_uninterrupted_run(tmp_path, mode):
    reference, ref_schedule = _fit(7, mode=mode)
    assert ref_schedule.phase == "switched" and ref_schedule.groups  # something was shared
    expected = {k: v.detach().clone() for k, v in adapter_state_dict(reference).items()}
    for stop in (2, 3, 5):
        path = tmp_path / f"{mode}-{stop}.ckpt"
        _fit(stop, save=path, mode=mode)
        resumed, schedule = _fit(7, ckpt_path=path, mode=mode)
        assert schedule.selected == ref_schedule.selected
        assert schedule.importance == ref_schedule.importance
        for key, value in adapter_state_dict(resumed).items():
            torch.testing.assert_close(
                value, expected[key], rtol=0, atol=0, msg=f"{key} after resume at {stop}"
            )


@pytest.mark.slow
def test_sample_fraction_is_a_fraction_of_an_epoch():
    module = StackModule(batch_size=4)  # 8 optimizer steps per epoch
    schedule = LoRADrop(sample_fraction=0.25, log_table=False)
    cb = LowRankCallback(
        LoRA(rank=2), target_modules=["blocks.0", "blocks.1"], schedules=[schedule]
    )
    _trainer(4, cb).fit(module)
    assert schedule.switch_step == 2 and schedule.phase == "switched"


# --- DDP -----------------------------------------------------------------------------------------
@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["share", "drop"])
def test_ddp_ranks_agree_on_selection_and_adapters(tmp_path, mode):
    results = run_ddp(
        tmp_path,
        f"""
        import torch
        from tests.test_lora_drop import StackModule
        from lightning_lowrank import LowRankCallback, LoRA, LoRADrop, adapter_state_dict

        module = StackModule(batch_size=4)
        schedule = LoRADrop(threshold=0.6, sample_steps=2, mode={mode!r}, log_table=False)
        targets = [f"blocks.{{i}}" for i in range(4)] + ["head"]
        cb = LowRankCallback(LoRA(rank=2), target_modules=targets, schedules=[schedule])
        trainer = ddp_trainer(max_steps=4, callbacks=[cb])
        trainer.fit(module)
        save_rank_result({{
            "importance": schedule.importance,
            "selected": schedule.selected,
            "groups": schedule.groups,
            "state": {{k: v.detach().clone() for k, v in adapter_state_dict(module).items()}},
        }})
        """,
    )
    a, b = results
    assert a["selected"] == b["selected"] and a["groups"] == b["groups"] and a["groups"]
    assert a["importance"] == b["importance"]
    for key in a["state"]:
        torch.testing.assert_close(a["state"][key], b["state"][key], rtol=0, atol=0)


# --- device and dtype moves --------------------------------------------------------------------
def _tied(layers, members=("blocks.2", "blocks.3"), host="blocks.1") -> bool:
    theirs = adapter_parameters(layers[host])
    return all(
        p.data_ptr() == theirs[n].data_ptr()
        for m in members
        for n, p in adapter_parameters(layers[m]).items()
    )


def test_a_move_unties_shared_storage_and_retie_restores_it(tmp_path):
    model, layers, schedule = _switched()
    schedule.switch()
    assert _tied(layers)
    model.double()  # converts every Parameter on its own, as .to(device) / .cuda() / .cpu() do
    assert not _tied(layers)
    # saving still finds the host (by name: the values are still equal) and stores it once
    path = save_adapter(model, tmp_path / "moved.safetensors")
    fresh = Stack().double()
    load_adapter(fresh, path)
    x = torch.randn(4, 8, dtype=torch.float64)
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x), rtol=0, atol=0)

    assert retie_shared(model) == 2
    assert _tied(layers) and retie_shared(model) == 0
    # tied again: one update of the host is seen by every member
    with torch.no_grad():
        adapter_parameters(layers["blocks.1"])["lora_B"].add_(1.0)
    torch.testing.assert_close(layers["blocks.3"].delta_weight(), layers["blocks.1"].delta_weight())


def test_untied_copies_that_diverged_are_an_error(tmp_path):
    model, layers, schedule = _switched()
    schedule.switch()
    model.double()
    with torch.no_grad():  # as if one untied copy had been trained on its own
        adapter_parameters(layers["blocks.3"])["lora_A"].add_(0.1)
    with pytest.raises(ValueError, match="different values of 'lora_A'.*retie_shared"):
        save_adapter(model, tmp_path / "diverged.safetensors")
    with pytest.raises(ValueError, match="different values"):
        retie_shared(model)


@pytest.mark.slow
def test_a_second_fit_after_a_move_trains_the_shared_adapter_as_one():
    module = StackModule()
    cb = _callback(LoRADrop(threshold=0.6, sample_steps=3, log_table=False))
    _trainer(6, cb).fit(module)
    layers = adapter_layers(module)
    members = {n: la.shared_with for n, la in layers.items() if la.shared_with}
    assert members
    module.double()  # unties, as Lightning's move to a GPU at the start of a fit would
    assert retie_shared(module) > 0  # (it was untied) ...
    module.double().float()  # ... and untie once more for the fit below
    _trainer(3, cb, precision="32-true").fit(module)
    for m, host in members.items():  # re-tied in on_fit_start: the updates went to one storage
        for pname, p in adapter_parameters(layers[m]).items():
            assert p.data_ptr() == adapter_parameters(layers[host])[pname].data_ptr()
