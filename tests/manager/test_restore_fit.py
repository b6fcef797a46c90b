"""A restore that cannot fit changes nothing: every check that needs no tensor data runs before any read.

SGD state restored into Adam used to overwrite the model, put SGD's param
groups into the Adam and fail later inside torch (``KeyError: 'step'``, then
``'betas'``). Now the class, the param groups, the scheduler class and (with
``strict``) the model's keys and shapes are checked from the files' headers
first, whatever ``in_place`` says, and the objects stay bit for bit as they were.
"""
import copy
import os
import random
import shutil

import pytest
import torch
from torch import nn

from ckptmgr import CheckpointFormatError, CheckpointManager, ChecksumError, KeyMismatchError
from tests.manager.helpers import assert_same

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "v0_1")


def _net(seed=0, width=6):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 2))


def _train(model, opt, steps=2):
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        opt.step()


def _snapshot(*objs):
    return [copy.deepcopy(o.state_dict()) for o in objs]


def _saved_sgd(directory):
    model = _net(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    _train(model, opt)
    with CheckpointManager(directory) as mgr:
        mgr.save(3, model=model, optimizer=opt, scheduler=sched)


@pytest.mark.parametrize("in_place", [True, False])
def test_sgd_state_into_adam_raises_before_touching_anything(ckpt_dir, in_place):
    _saved_sgd(ckpt_dir)
    model = _net(1)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    _train(model, opt)
    before = _snapshot(model, opt)
    rng = torch.get_rng_state()
    with pytest.raises(CheckpointFormatError) as info:
        CheckpointManager(ckpt_dir).restore(model=model, optimizer=opt, in_place=in_place)
    assert "checkpoint holds SGD state for optimizer 'optimizer'; got Adam" in str(info.value)
    assert_same(before, _snapshot(model, opt))
    assert torch.equal(rng, torch.get_rng_state())
    _train(model, opt)  # still a working Adam


def test_another_scheduler_class_raises_before_touching_anything(ckpt_dir):
    _saved_sgd(ckpt_dir)
    model = _net(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    before = _snapshot(model, opt, sched)
    with pytest.raises(CheckpointFormatError, match="StepLR state for scheduler 'scheduler'; got CosineAnnealingLR"):
        CheckpointManager(ckpt_dir).restore(model=model, optimizer=opt, scheduler=sched)
    assert_same(before, _snapshot(model, opt, sched))


def test_other_param_groups_raise_before_touching_anything(ckpt_dir):
    model = _net(0)
    opt = torch.optim.Adam([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.1}])
    _train(model, opt)
    with CheckpointManager(ckpt_dir) as mgr:
        mgr.save(1, model=model, optimizer=opt)
    model = _net(1)
    one_group = torch.optim.Adam(model.parameters())
    _train(model, one_group)
    before = _snapshot(model, one_group)
    with pytest.raises(CheckpointFormatError, match="has 2 param group"):
        CheckpointManager(ckpt_dir).restore(model=model, optimizer=one_group)
    assert_same(before, _snapshot(model, one_group))


def test_strict_model_mismatch_raises_before_reading_weights_in_place(ckpt_dir):
    with CheckpointManager(ckpt_dir) as mgr:
        mgr.save(1, model=_net(0))
    wider = nn.Sequential(_net(1), nn.Linear(2, 2))  # other keys; and its first layers would fit in place
    narrow = _net(1, width=5)                        # same keys, other shapes
    for model in (wider, narrow):
        before = _snapshot(model)
        with pytest.raises(KeyMismatchError, match="nothing was restored"):
            CheckpointManager(ckpt_dir).restore(model=model, in_place=True)
        assert_same(before, _snapshot(model))


def test_a_missing_optimizer_under_strict_raises_before_the_model_is_touched(ckpt_dir):
    with CheckpointManager(ckpt_dir) as mgr:
        mgr.save(1, model=_net(0))
    model = _net(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = _snapshot(model, opt)
    with pytest.raises(CheckpointFormatError, match="holds no optimizer state"):
        CheckpointManager(ckpt_dir).restore(model=model, optimizer=opt)
    assert_same(before, _snapshot(model, opt))


def test_an_in_place_read_that_fails_says_the_tensors_are_partly_overwritten(ckpt_dir):
    with CheckpointManager(ckpt_dir) as mgr:
        mgr.save(1, model=_net(0))
    path = os.path.join(ckpt_dir, "step_00000001", "model.safetensors")
    with open(path, "r+b") as fh:  # flip the last byte of tensor data: the header still parses
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last[0] ^ 0xFF]))
    with pytest.raises(ChecksumError, match="partly overwritten"):
        CheckpointManager(ckpt_dir).restore(1, model=_net(1), in_place=True)
    with pytest.raises(ChecksumError) as info:
        CheckpointManager(ckpt_dir).restore(1, model=_net(1), in_place=False)
    assert "partly overwritten" not in str(info.value)


def test_a_0_1_checkpoint_without_recorded_classes_is_told_apart_by_its_settings(tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(os.path.join(FIXTURE, "run"), run)  # AdamW state, written before classes were recorded
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(4, 6))
    model.add_module("bn", nn.BatchNorm1d(6))
    model.add_module("fc2", nn.Linear(6, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = _snapshot(model, opt)
    with pytest.raises(CheckpointFormatError, match="saved from another optimizer class"):
        CheckpointManager(run).restore(model=model, optimizer=opt)
    assert_same(before, _snapshot(model, opt))


def test_rng_false_leaves_the_process_rng_alone(ckpt_dir):
    model, target = _net(0), _net(2)
    with CheckpointManager(ckpt_dir) as mgr:
        mgr.save(1, model=model)
    saved_torch = torch.get_rng_state()
    torch.manual_seed(99)
    random.seed(99)
    mine, mine_py = torch.get_rng_state(), random.getstate()
    CheckpointManager(ckpt_dir).restore(model=target, rng=False)
    assert torch.equal(torch.get_rng_state(), mine) and random.getstate() == mine_py
    CheckpointManager(ckpt_dir).restore(model=target)
    assert torch.equal(torch.get_rng_state(), saved_torch)
