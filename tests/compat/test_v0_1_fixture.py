"""Checkpoints written by ckptmgr 0.1 keep restoring: the on-disk format may grow, never break.

The files under tests/fixtures/v0_1/ were written once by the 0.1 code (see
make_fixture.py there); ``reference.pt`` holds the same state as plain torch.save.
"""
import json
import os
import shutil

import pytest
import torch
from torch import nn

import ckptmgr
from ckptmgr.cli import main as cli
from tests.manager.helpers import assert_same

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "v0_1")


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.fc2 = nn.Linear(6, 2)


def _fresh():
    torch.manual_seed(123)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


@pytest.fixture
def v01(tmp_path):
    dst = tmp_path / "v0_1"
    shutil.copytree(FIXTURE, dst)
    return str(dst)


@pytest.fixture(scope="module")
def reference():
    return torch.load(os.path.join(FIXTURE, "reference.pt"), weights_only=True)


@pytest.mark.parametrize("run", ["run", "run_sharded"])
def test_manager_restores_a_0_1_directory(v01, reference, run):
    model, opt, sched = _fresh()
    with ckptmgr.CheckpointManager(os.path.join(v01, run)) as mgr:
        restored = mgr.restore(model=model, optimizer=opt, scheduler=sched)
    assert restored.step == 3
    assert_same(reference["model"], model.state_dict())
    assert_same(reference["optimizer"]["state"], opt.state_dict()["state"])
    assert opt.state_dict()["param_groups"] == reference["optimizer"]["param_groups"]
    assert sched.state_dict() == reference["scheduler"]
    assert restored.extra["epoch"] == 3 and restored.extra["note"] == "v0.1"
    assert torch.equal(restored.extra["counts"], reference["extra"]["counts"])


def test_older_step_and_resume_of_a_0_1_directory(v01, reference):
    model, opt, sched = _fresh()
    with ckptmgr.CheckpointManager(os.path.join(v01, "run")) as mgr:
        assert mgr.all_steps() == [2, 3]
        assert mgr.restore(2, model=model).metrics == {"loss": 0.7}
    assert ckptmgr.resume_from_latest(os.path.join(v01, "run"), model=model, optimizer=opt, scheduler=sched) == 4
    assert_same(reference["model"], model.state_dict())


def test_a_new_save_into_a_0_1_directory_keeps_both(v01, reference):
    model, opt, sched = _fresh()
    with ckptmgr.CheckpointManager(os.path.join(v01, "run"), max_to_keep=None) as mgr:
        mgr.restore(model=model, optimizer=opt, scheduler=sched)
        mgr.save(4, model=model, optimizer=opt, scheduler=sched)
        assert mgr.all_steps() == [2, 3, 4]
        fresh, _, _ = _fresh()
        mgr.restore(3, model=fresh)
    assert_same(reference["model"], fresh.state_dict())


@pytest.mark.parametrize("name", ["run", "run/step_00000003", "run_sharded", "single.pth", "single.safetensors",
                                  "converted.safetensors"])
def test_load_checkpoint_reads_every_0_1_file(v01, reference, name):
    model, _, _ = _fresh()
    ckptmgr.load_checkpoint(model, os.path.join(v01, name), strict=True)
    assert_same(reference["model"], model.state_dict())


def test_cli_reads_0_1_directories(v01, capsys):
    assert cli(["verify", os.path.join(v01, "run")]) == 0
    assert cli(["verify", os.path.join(v01, "run_sharded")]) == 0
    capsys.readouterr()
    assert cli(["ls", os.path.join(v01, "run"), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [c["step"] for c in listing["checkpoints"]] == [2, 3]
    assert cli(["inspect", os.path.join(v01, "run"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["step"] == 3 and info["state_dict"]["tensors"] == len(TinyNet().state_dict())
    assert info["checksum"] == "sha256"  # what 0.1 wrote, verified with it


def test_0_1_single_pth_keeps_its_optimizer_and_meta(v01, reference):
    ckpt = ckptmgr.CheckpointLoader.load_checkpoint(os.path.join(v01, "single.pth"))
    assert ckpt["meta"]["epoch"] == 3
    assert_same(reference["optimizer"]["state"], ckpt["optimizer"]["state"])
