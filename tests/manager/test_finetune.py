"""Fine-tuning: trainable-only saves (save_frozen=False) and selective restore (exclude=...)."""
from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from safetensors import safe_open
from torch import nn

import ckptmgr
from ckptmgr.errors import CheckpointFormatError, FrozenParametersError, KeyMismatchError
from tests.manager.helpers import SmallNet, assert_same


class AdapterNet(nn.Module):
    """A big frozen base (Linear + BatchNorm) and a small trainable adapter."""

    def __init__(self, width: int = 256, rank: int = 4):
        super().__init__()
        self.base = nn.Linear(width, width)
        self.norm = nn.BatchNorm1d(width)
        self.adapter_down = nn.Linear(width, rank, bias=False)
        self.adapter_up = nn.Linear(rank, width, bias=False)

    def forward(self, x):
        h = self.norm(self.base(x))
        return h + self.adapter_up(self.adapter_down(h))


def _base_weights(seed: int = 0, width: int = 256) -> dict:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in AdapterNet(width).state_dict().items() if k.startswith("base.")}


def _fine_tuned(width: int = 256):
    """A model whose base holds the pretrained weights (frozen) and whose adapter and BN stats were trained."""
    torch.manual_seed(1)
    model = AdapterNet(width)
    model.load_state_dict(_base_weights(width=width), strict=False)
    model.base.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(torch.randn(8, width)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _fresh_with_base(width: int = 256, base_width: int = 256):
    torch.manual_seed(99)  # adapter initialised differently from the trained one
    model = AdapterNet(width)
    if base_width == width:
        model.load_state_dict(_base_weights(width=width), strict=False)
    model.base.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, opt


def _model_file(directory: str, step: int) -> str:
    return os.path.join(directory, f"step_{step:08d}", "model.safetensors")


def _manifest(directory: str, step: int) -> dict:
    with open(os.path.join(directory, f"step_{step:08d}", "manifest.json")) as fh:
        return json.load(fh)


# --------------------------------------------------------------------------- save_frozen=False


def test_trainable_only_save_is_small_and_holds_only_the_adapter_and_buffers(tmp_path):
    model, opt = _fine_tuned()
    full, slim = str(tmp_path / "full"), str(tmp_path / "slim")
    with ckptmgr.CheckpointManager(full) as manager:
        manager.save(1, model=model, optimizer=opt)
    with ckptmgr.CheckpointManager(slim, save_frozen=False) as manager:
        manager.save(1, model=model, optimizer=opt)
    assert os.path.getsize(_model_file(slim, 1)) * 10 < os.path.getsize(_model_file(full, 1))
    with safe_open(_model_file(slim, 1), "pt") as fh:
        keys = set(fh.keys())
    assert keys == {"norm.weight", "norm.bias", "norm.running_mean", "norm.running_var", "norm.num_batches_tracked",
                    "adapter_down.weight", "adapter_up.weight"}
    record = _manifest(slim, 1)["components"]["frozen"]
    assert record == {"params": {"base.weight": [256, 256], "base.bias": [256]}}
    assert "frozen" not in _manifest(full, 1)["components"]  # a plain save is written as before


def test_restore_into_a_fresh_model_with_the_original_base_is_bit_exact(tmp_path):
    model, opt = _fine_tuned()
    with ckptmgr.CheckpointManager(str(tmp_path), save_frozen=False) as manager:
        manager.save(7, model=model, optimizer=opt)
    fresh, fresh_opt = _fresh_with_base()
    base_before = {k: v.clone() for k, v in fresh.state_dict().items() if k.startswith("base.")}
    with ckptmgr.CheckpointManager(str(tmp_path), save_frozen=False) as manager:
        restored = manager.restore(model=fresh, optimizer=fresh_opt)  # strict=True: frozen keys are not missing
    assert restored.step == 7
    assert_same(model.state_dict(), fresh.state_dict())
    assert_same(opt.state_dict()["state"], fresh_opt.state_dict()["state"])
    assert_same(base_before, {k: v for k, v in fresh.state_dict().items() if k.startswith("base.")})


@pytest.mark.parametrize("in_place", [True, False])
def test_a_base_of_another_shape_raises_the_frozen_error(tmp_path, in_place):
    model, opt = _fine_tuned()
    with ckptmgr.CheckpointManager(str(tmp_path), save_frozen=False) as manager:
        manager.save(1, model=model, optimizer=opt)
    other = AdapterNet(width=256)
    other.base = nn.Linear(256, 128)  # another base: a different shape under the recorded name
    with pytest.raises(FrozenParametersError, match=r"base.weight: model shape \(128, 256\).*\(256, 256\)") as info:
        ckptmgr.resume_from_latest(str(tmp_path), model=other, in_place=in_place)
    assert isinstance(info.value, KeyMismatchError) and "base weights" in info.value.hint


def test_a_base_missing_a_recorded_parameter_raises_and_strict_false_only_warns(tmp_path, caplog):
    model, opt = _fine_tuned()
    with ckptmgr.CheckpointManager(str(tmp_path), save_frozen=False) as manager:
        manager.save(1, model=model)
    other = AdapterNet(width=256)
    other.base = nn.Linear(256, 256, bias=False)
    with pytest.raises(FrozenParametersError, match="base.bias: absent from the model"):
        ckptmgr.resume_from_latest(str(tmp_path), model=other)
    with caplog.at_level(logging.WARNING):
        assert ckptmgr.resume_from_latest(str(tmp_path), model=other, strict=False) == 2
    assert "base.bias: absent from the model" in caplog.text
    assert_same(model.adapter_up.weight.detach(), other.adapter_up.weight.detach())


def test_other_missing_keys_still_fail_a_strict_restore(tmp_path):
    model, _ = _fine_tuned()
    with ckptmgr.CheckpointManager(str(tmp_path), save_frozen=False) as manager:
        manager.save(1, model=model)
    bigger = AdapterNet()
    bigger.extra_head = nn.Linear(2, 2)
    with pytest.raises(KeyMismatchError, match="extra_head.weight") as info:
        ckptmgr.resume_from_latest(str(tmp_path), model=bigger)
    assert not isinstance(info.value, FrozenParametersError)


def test_async_trainable_only_save_and_nothing_frozen_writes_a_plain_step(tmp_path):
    model, opt = _fine_tuned()
    with ckptmgr.CheckpointManager(str(tmp_path / "async"), save_frozen=False, async_save=True) as manager:
        manager.save(1, model=model, optimizer=opt)
    assert _manifest(str(tmp_path / "async"), 1)["components"]["frozen"]["params"]["base.weight"] == [256, 256]
    fresh, _ = _fresh_with_base()
    assert ckptmgr.resume_from_latest(str(tmp_path / "async"), model=fresh) == 2
    assert_same(model.state_dict(), fresh.state_dict())
    plain_model = SmallNet()  # every parameter trains: nothing is left out, nothing recorded
    with ckptmgr.CheckpointManager(str(tmp_path / "plain"), save_frozen=False) as manager:
        manager.save(1, model=plain_model)
    assert "frozen" not in _manifest(str(tmp_path / "plain"), 1)["components"]
    with safe_open(_model_file(str(tmp_path / "plain"), 1), "pt") as fh:
        assert set(fh.keys()) == set(plain_model.state_dict())


def test_save_frozen_false_refuses_a_sharded_save(tmp_path):
    model, _ = _fine_tuned()
    with ckptmgr.CheckpointManager(str(tmp_path), save_frozen=False, sharded=True) as manager:
        with pytest.raises(CheckpointFormatError, match="save_frozen=False is for plain saves"):
            manager.save(1, model=model)
    assert manager.all_steps() == []


# --------------------------------------------------------------------------- exclude


def _train(model, opt, sched, steps=2):
    for _ in range(steps):
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()


def _setup():
    torch.manual_seed(0)
    model = SmallNet()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _train(model, opt, sched)
    return model, opt, sched


def _clone(tree):
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {k: _clone(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_clone(v) for v in tree]
    return tree


@pytest.mark.parametrize("in_place", [True, False])
def test_exclude_optimizer_and_fc2_leaves_them_untouched_and_restores_the_rest(tmp_path, caplog, in_place):
    model, opt, sched = _setup()
    saved_model, saved_sched = _clone(model.state_dict()), sched.state_dict()
    with ckptmgr.CheckpointManager(str(tmp_path)) as manager:
        manager.save(5, model=model, optimizer=opt, scheduler=sched)
    _train(model, opt, sched, steps=3)  # everything moves on
    live_fc2 = _clone({k: v for k, v in model.state_dict().items() if k.startswith("fc2.")})
    live_opt = _clone(opt.state_dict())
    with caplog.at_level(logging.INFO, logger="ckptmgr"):
        with ckptmgr.CheckpointManager(str(tmp_path)) as manager:
            restored = manager.restore(model=model, optimizer=opt, scheduler=sched, in_place=in_place,
                                       exclude=("optimizer", "re:^fc2\\."))
    assert restored.step == 5
    now = model.state_dict()
    assert_same(live_fc2, {k: v for k, v in now.items() if k.startswith("fc2.")})
    assert_same(live_opt, opt.state_dict())
    assert_same({k: v for k, v in saved_model.items() if not k.startswith("fc2.")},
                {k: v for k, v in now.items() if not k.startswith("fc2.")})
    assert sched.state_dict() == saved_sched
    assert "left untouched (exclude): optimizer" in caplog.text
    assert "model keys left untouched (exclude re:^fc2\\.): fc2.bias, fc2.weight" in caplog.text


def test_exclude_rng_extra_and_scheduler(tmp_path):
    model, opt, sched = _setup()
    counter = torch.tensor([1.0])
    with ckptmgr.CheckpointManager(str(tmp_path)) as manager:
        manager.save(1, model=model, scheduler=sched, extra={"epoch": 3, "counter": counter})
    _train(model, opt, sched)
    live_sched = sched.state_dict()
    torch.manual_seed(1234)
    rng_before = torch.get_rng_state()
    with ckptmgr.CheckpointManager(str(tmp_path)) as manager:
        restored = manager.restore(model=model, scheduler=sched, extra={"epoch": None},
                                   exclude=["rng", "extra", "scheduler"])
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert restored.extra == {}
    assert sched.state_dict() == live_sched
    with ckptmgr.CheckpointManager(str(tmp_path)) as manager:  # a single name works as well
        assert manager.restore(model=model, scheduler=sched, exclude="rng").extra["epoch"] == 3


def test_exclude_model_restores_only_the_other_components(tmp_path):
    model, opt, sched = _setup()
    with ckptmgr.CheckpointManager(str(tmp_path)) as manager:
        manager.save(1, model=model, optimizer=opt)
    saved_opt = _clone(opt.state_dict())
    other = SmallNet(width=32)  # would not even fit
    live = _clone(other.state_dict())
    other_opt = torch.optim.Adam(model.parameters(), lr=0.1)
    with ckptmgr.CheckpointManager(str(tmp_path)) as manager:
        manager.restore(model=other, optimizer=other_opt, exclude=("model",))
    assert_same(live, other.state_dict())
    assert_same(saved_opt["state"], other_opt.state_dict()["state"])


@pytest.mark.parametrize("bad, message", [("optimiser", "unknown entry 'optimiser'"),
                                          ("re:([", "not a valid regular expression"),
                                          (("optimizer", 3), "unknown entry 3")])
def test_exclude_rejects_unknown_entries_before_touching_anything(tmp_path, bad, message):
    model, opt, sched = _setup()
    with ckptmgr.CheckpointManager(str(tmp_path)) as manager:
        manager.save(1, model=model, optimizer=opt)
    _train(model, opt, sched)
    live = _clone(model.state_dict())
    with ckptmgr.CheckpointManager(str(tmp_path)) as manager:
        with pytest.raises(CheckpointFormatError, match=message) as info:
            manager.restore(model=model, optimizer=opt, exclude=bad)
    assert "re:PATTERN" in info.value.hint or "re:^head" in info.value.hint
    assert_same(live, model.state_dict())
