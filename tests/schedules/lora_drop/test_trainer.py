"""LoRA-drop inside a Trainer: resume across the switch, the sampling fraction, a second fit after
a move, and DDP with 2 CPU ranks."""

from __future__ import annotations

import pytest
import torch

from lightning_lowrank import (
    LoRA,
    LoRADrop,
    LowRankCallback,
    adapter_layers,
    adapter_state_dict,
    retie_shared,
)
from lightning_lowrank.schedules.lora_drop import adapter_parameters
from tests.ddp_utils import run_ddp
from tests.schedules.lora_drop.helpers import StackModule, callback, fit, trainer


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["share", "drop"])
def test_resume_before_at_and_after_the_switch_equals_an_uninterrupted_run(tmp_path, mode):
    reference, ref_schedule = fit(7, mode=mode)
    assert ref_schedule.phase == "switched" and ref_schedule.groups  # something was shared
    expected = {k: v.detach().clone() for k, v in adapter_state_dict(reference).items()}
    for stop in (2, 3, 5):
        path = tmp_path / f"{mode}-{stop}.ckpt"
        fit(stop, save=path, mode=mode)
        resumed, schedule = fit(7, ckpt_path=path, mode=mode)
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
    trainer(4, cb).fit(module)
    assert schedule.switch_step == 2 and schedule.phase == "switched"


@pytest.mark.slow
def test_a_second_fit_after_a_move_trains_the_shared_adapter_as_one():
    module = StackModule()
    cb = callback(LoRADrop(threshold=0.6, sample_steps=3, log_table=False))
    trainer(6, cb).fit(module)
    layers = adapter_layers(module)
    members = {n: la.adapter_host for n, la in layers.items() if la.adapter_host is not None}
    assert members
    module.double()  # as Lightning's move to a GPU at the start of a fit would
    assert retie_shared(module) == 0  # nothing to re-tie: the sharing survived the move
    module.double().float()
    own = {
        (m, pname): p.detach().clone()
        for m in members
        for pname, p in adapter_parameters(layers[m]).items()
    }
    before = {m: host.delta_weight().detach().clone() for m, host in members.items()}
    trainer(3, cb, precision="32-true").fit(module)
    for m, host in members.items():  # the updates went to the host, which every member reads
        assert layers[m].adapter_host is host
        for pname, p in adapter_parameters(layers[m]).items():
            assert getattr(layers[m], pname) is adapter_parameters(host)[pname]
            torch.testing.assert_close(p, own[(m, pname)], rtol=0, atol=0)  # idle, untouched
        assert not torch.equal(host.delta_weight(), before[m])
        torch.testing.assert_close(layers[m].delta_weight(), host.delta_weight(), rtol=0, atol=0)


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["share", "drop"])
def test_ddp_ranks_agree_on_selection_and_adapters(tmp_path, mode):
    results = run_ddp(
        tmp_path,
        f"""
        import torch
        from tests.schedules.lora_drop.helpers import StackModule
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
