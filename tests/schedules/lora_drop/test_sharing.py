"""LoRA-drop's switch (``schedules/lora_drop/sharing.py``): ties without shared storage, disabled
layers, optimizer state, adapter files and device / dtype moves."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from torch import nn

from lightning_lowrank import (
    DoRA,
    LoRA,
    LoRADrop,
    SingLoRA,
    adapter_layers,
    adapter_state_dict,
    inject,
    load_adapter,
    retie_shared,
    save_adapter,
    trainable_parameter_count,
)
from lightning_lowrank.schedules.lora_drop import adapter_parameters
from tests.schedules.lora_drop.helpers import (
    MEMBERS,
    TARGETS,
    Stack,
    randomise_adapters,
    step,
    switched,
)


def _computes_with_host(layers, members=("blocks.2", "blocks.3"), host="blocks.1") -> bool:
    """Every member reads the host's very Parameter objects (and keeps its own registered)."""
    theirs = adapter_parameters(layers[host])
    return all(
        layers[m].adapter_host is layers[host]
        and getattr(layers[m], n) is theirs[n]
        and adapter_parameters(layers[m])[n] is not theirs[n]
        for m in members
        for n in theirs
    )


# --- the switch: sharing -------------------------------------------------------------------------
def test_switch_ties_members_mean_init_and_parameter_count():
    model, layers, schedule = switched()
    before = trainable_parameter_count(model)
    old = {
        n: {k: p.detach().clone() for k, p in adapter_parameters(layers[n]).items()}
        for n in MEMBERS
    }
    names_before = [n for n, _ in model.named_parameters()]
    schedule.switch()
    assert schedule.selected == ["blocks.0", "head"]
    assert schedule.groups == [MEMBERS]
    for pname in ("lora_A", "lora_B"):
        host = adapter_parameters(layers["blocks.1"])[pname]
        expected = torch.stack([old[n][pname] for n in MEMBERS]).mean(dim=0)
        torch.testing.assert_close(host.detach(), expected, rtol=1e-6, atol=1e-7)
        for member in MEMBERS[1:]:
            p = adapter_parameters(layers[member])[pname]
            assert p is not host  # own Parameter, still registered (DDP's reducer holds it)
            assert p.data_ptr() != host.data_ptr()  # no shared storage ...
            assert getattr(layers[member], pname) is host  # ... the member computes with the host's
    assert [n for n, _ in model.named_parameters()] == names_before  # nothing added or removed
    torch.testing.assert_close(layers["blocks.2"].delta_weight(), layers["blocks.1"].delta_weight())
    torch.testing.assert_close(layers["blocks.3"].delta_weight(), layers["blocks.1"].delta_weight())
    per_layer = 2 * (8 + 8)  # rank 2, (8, 8) layers
    assert trainable_parameter_count(model) == before - 2 * per_layer
    assert schedule.parameters_after == schedule.parameters_before - 2 * per_layer
    host_layer = layers["blocks.1"]
    assert [layers[n].adapter_host for n in MEMBERS] == [None, host_layer, host_layer]


def test_fresh_shared_init_is_the_method_init_and_seeded():
    model, layers, schedule = switched(shared_init="fresh")
    schedule.switch()
    host = adapter_parameters(layers["blocks.1"])
    assert torch.count_nonzero(host["lora_B"]) == 0  # LoRA's init: B = 0, a zero delta
    other, other_layers, other_schedule = switched(shared_init="fresh")
    other_schedule.switch()
    torch.testing.assert_close(
        host["lora_A"], adapter_parameters(other_layers["blocks.1"])["lora_A"]
    )


def _reference_with_shared_parameters(model):
    """The same model where the members hold the host's very Parameter objects."""
    ref = Stack()
    ref_layers = {n: ref.get_submodule(n) for n in inject(ref, LoRA(rank=2), TARGETS)}
    ref.load_state_dict(model.state_dict())
    for n in MEMBERS[1:]:
        for pname, p in adapter_parameters(ref_layers["blocks.1"]).items():
            setattr(ref_layers[n], pname, p)
    return ref, ref_layers


def test_shared_gradient_is_the_sum_of_uses_and_optimizer_state_is_reset():
    model, layers, schedule = switched()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    schedule.train_start(model, layers, 0, optimizers=[opt])
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    step(model, x, y, opt)  # gives every adapter parameter an optimizer state
    schedule.switch()
    for n in MEMBERS:
        for p in adapter_parameters(layers[n]).values():
            assert p not in opt.state
    kept = adapter_parameters(layers["blocks.0"])["lora_A"]
    assert opt.state[kept]["step"] == 1

    ref, ref_layers = _reference_with_shared_parameters(model)
    ref_opt = torch.optim.Adam([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    step(ref, x, y, ref_opt)
    step(model, x, y, opt, schedule, layers, 1)
    for n in MEMBERS:
        assert all(
            p.grad is None for p in adapter_parameters(layers[n]).values() if n != "blocks.1"
        )
    for pname in ("lora_A", "lora_B"):
        shared = adapter_parameters(layers["blocks.1"])[pname]
        torch.testing.assert_close(shared, adapter_parameters(ref_layers["blocks.1"])[pname])
        assert getattr(layers["blocks.3"], pname) is shared
    for n in MEMBERS:  # (the kept layers differ: their Adam moments were not reset)
        torch.testing.assert_close(layers[n](x), ref_layers[n](x), rtol=1e-5, atol=1e-6)


def test_the_gradient_reaches_the_host_once_as_the_sum_of_its_uses():
    model, layers, schedule = switched(dtype=torch.float64)
    schedule.switch()
    ref, ref_layers = _reference_with_shared_parameters(model.float())
    model.double()
    ref.double()
    host = layers["blocks.1"]
    accumulations = {n: 0 for n in ("lora_A", "lora_B")}
    for pname in accumulations:

        def count(p, pname=pname):
            accumulations[pname] += 1

        getattr(host, pname).register_post_accumulate_grad_hook(count)
    x = torch.randn(6, 8, dtype=torch.float64)
    model(x).square().sum().backward()
    ref(x).square().sum().backward()
    assert accumulations == {"lora_A": 1, "lora_B": 1}  # one accumulation: one DDP all-reduce
    for pname in accumulations:
        torch.testing.assert_close(
            getattr(host, pname).grad,
            getattr(ref_layers["blocks.1"], pname).grad,
            rtol=1e-12,
            atol=1e-12,
        )
        for member in MEMBERS[1:]:  # the members' own (idle) parameters: an exact zero
            own = adapter_parameters(layers[member])[pname].grad
            assert own is not None and torch.count_nonzero(own) == 0


def test_member_and_host_give_the_same_delta_after_optimizer_steps():
    model, layers, schedule = switched()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    schedule.train_start(model, layers, 0, optimizers=[opt])
    schedule.switch()
    own = {n: adapter_parameters(layers[n])["lora_B"].detach().clone() for n in MEMBERS[1:]}
    start = layers["blocks.1"].delta_weight().detach().clone()
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    for i in range(3):
        step(model, x, y, opt, schedule, layers, i + 1)
    assert not torch.allclose(layers["blocks.1"].delta_weight(), start)  # the host trained
    for member in MEMBERS[1:]:
        torch.testing.assert_close(
            layers[member].delta_weight(), layers["blocks.1"].delta_weight(), rtol=0, atol=0
        )
        # the idle copies got no update, not even weight decay
        torch.testing.assert_close(
            adapter_parameters(layers[member])["lora_B"], own[member], rtol=0, atol=0
        )


def test_share_adapter_refuses_mismatched_layers_and_chains_changing_nothing():
    model, layers, schedule = switched()
    with pytest.raises(ValueError, match="one adapter shape"):
        layers["blocks.1"].share_adapter(layers["head"])
    with pytest.raises(ValueError, match="its own adapter"):
        layers["blocks.1"].share_adapter(layers["blocks.1"])
    assert layers["blocks.1"].adapter_host is None
    layers["blocks.2"].share_adapter(layers["blocks.1"])
    with pytest.raises(ValueError, match="no chains"):
        layers["blocks.3"].share_adapter(layers["blocks.2"])
    assert layers["blocks.3"].adapter_host is None
    layers["blocks.2"].share_adapter(None)  # and untied: its own parameters again
    assert layers["blocks.2"].lora_A is adapter_parameters(layers["blocks.2"])["lora_A"]


def test_state_dict_of_a_member_shows_the_host_values():
    model, layers, schedule = switched()
    schedule.switch()
    state = model.state_dict()
    for member in MEMBERS[1:]:
        for pname in ("lora_A", "lora_B"):
            torch.testing.assert_close(
                state[f"{member}.{pname}"], state[f"blocks.1.{pname}"], rtol=0, atol=0
            )
    # a plain state_dict copy into an untied model computes the same
    plain = Stack()
    inject(plain, LoRA(rank=2), TARGETS)
    plain.load_state_dict(state)
    x = torch.randn(4, 8)
    torch.testing.assert_close(plain.eval()(x), model.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "method", [LoRA(rank=2), DoRA(rank=2), SingLoRA(rank=2)], ids=lambda m: type(m).__name__
)
def test_save_load_after_switch_round_trips_with_fewer_parameters(tmp_path, method):
    model, layers, schedule = switched(method=method)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    schedule.train_start(model, layers, 0, optimizers=[opt])
    schedule.switch()
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    step(model, x, y, opt, schedule, layers, 1)
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
    member = fresh_layers["blocks.3"]
    assert member.adapter_host is fresh_layers["blocks.1"]  # tied as in training
    for pname, p in adapter_parameters(member).items():
        assert getattr(member, pname) is host[pname]  # computes with one Parameter object
        assert not p.requires_grad  # the idle own copy is frozen (loading precedes any wrapping)
    save_adapter(fresh, tmp_path / "again.safetensors")  # and saving it again keeps the sharing
    again = Stack()
    load_adapter(again, tmp_path / "again.safetensors")
    torch.testing.assert_close(again.eval()(x), model(x), rtol=0, atol=0)


def test_saving_a_submodule_names_the_shared_host_relative_to_it(tmp_path):
    outer = nn.Module()
    outer.net = Stack()
    names = inject(outer, LoRA(rank=2), r"net\.(blocks\.\d|head)")
    layers = {n: outer.get_submodule(n) for n in names}
    randomise_adapters(outer)
    schedule = LoRADrop(sample_steps=1, log_table=False)
    schedule.setup(outer, layers, None)
    schedule.importance = dict(zip(names, [5.0, 0.4, 0.3, 0.3, 4.0], strict=True))
    schedule.calls = dict.fromkeys(names, 1)
    schedule.switch()
    assert layers["net.blocks.2"].adapter_host is layers["net.blocks.1"]
    path = save_adapter(outer.net, tmp_path / "net.safetensors")
    fresh = Stack()
    load_adapter(fresh, path)
    x = torch.randn(4, 8)
    torch.testing.assert_close(fresh.eval()(x), outer.net.eval()(x), rtol=0, atol=0)
    # saving only a member, without its host, is refused
    with pytest.raises(ValueError, match="not among the layers being saved"):
        save_adapter(outer.net.blocks[2], tmp_path / "member.safetensors")


# --- the plain variant: drop -------------------------------------------------------------------
def test_drop_mode_switches_adapters_off_and_files_leave_them_out(tmp_path):
    model, layers, schedule = switched(mode="drop")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    schedule.train_start(model, layers, 0, optimizers=[opt])
    before = trainable_parameter_count(model)
    schedule.switch()
    dropped = MEMBERS
    assert [layers[n].disabled for n in layers] == [False, True, True, True, False]
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    for n in dropped:
        torch.testing.assert_close(layers[n](x), layers[n].base(x), rtol=0, atol=0)
        assert torch.count_nonzero(layers[n].delta_weight()) == 0
    frozen = {n: adapter_parameters(layers[n])["lora_B"].detach().clone() for n in dropped}
    step(model, x, y, opt, schedule, layers, 1)
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


# --- device and dtype moves --------------------------------------------------------------------
@pytest.mark.parametrize("move", ["double", "to"])
def test_a_move_keeps_the_sharing_without_a_retie(tmp_path, move):
    model, layers, schedule = switched()
    schedule.switch()
    assert _computes_with_host(layers)
    # converts every Parameter on its own, as .to(device) / .cuda() / .cpu() do
    model.double() if move == "double" else model.to(torch.float64)
    assert _computes_with_host(layers)
    assert retie_shared(model) == 0  # nothing to re-tie
    path = save_adapter(model, tmp_path / "moved.safetensors")
    fresh = Stack().double()
    load_adapter(fresh, path)
    x = torch.randn(4, 8, dtype=torch.float64)
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x), rtol=0, atol=0)
    # one update of the host is seen by every member
    with torch.no_grad():
        adapter_parameters(layers["blocks.1"])["lora_B"].add_(1.0)
    torch.testing.assert_close(layers["blocks.3"].delta_weight(), layers["blocks.1"].delta_weight())


def test_a_members_idle_copy_changes_nothing(tmp_path):
    model, layers, schedule = switched()
    schedule.switch()
    model.double()
    x = torch.randn(4, 8, dtype=torch.float64)
    out = model.eval()(x)
    with torch.no_grad():  # what an untied copy trained on its own would have been
        adapter_parameters(layers["blocks.3"])["lora_A"].add_(0.1)
    torch.testing.assert_close(model(x), out, rtol=0, atol=0)
    path = save_adapter(model, tmp_path / "idle.safetensors")
    fresh = Stack().double()
    load_adapter(fresh, path)
    torch.testing.assert_close(fresh.eval()(x), out, rtol=0, atol=0)
