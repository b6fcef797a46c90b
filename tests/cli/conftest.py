"""Fixtures for the CLI tests: a real manager directory, a runner for the command, and tree snapshots."""
from __future__ import annotations

import hashlib
import os
import shutil
from typing import Dict, Tuple

import pytest
import torch
from torch import nn

from ckptmgr import CheckpointManager, cli

LOSSES = {10: 0.9, 20: 0.4, 30: 0.6, 40: 0.7}   # step 20 is the best, step 40 the latest


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


@pytest.fixture(scope="session")
def _template(tmp_path_factory) -> str:
    directory = str(tmp_path_factory.mktemp("template") / "run")
    model = small_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
    with CheckpointManager(directory, max_to_keep=None) as manager:
        for step, loss in LOSSES.items():
            model(torch.randn(4, 4)).sum().backward()
            opt.step()
            sched.step()
            manager.save(step, model=model, optimizer=opt, scheduler=sched, extra={"epoch": step // 10},
                         metrics={"loss": loss})
    return directory


@pytest.fixture
def run_dir(_template, tmp_path) -> str:
    """A fresh copy of a manager directory with steps 10, 20, 30, 40 (metrics ``loss``)."""
    target = str(tmp_path / "run")
    shutil.copytree(_template, target)
    return target


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def __repr__(self) -> str:
        return f"Result(code={self.code}, out={self.out[-800:]!r}, err={self.err[-800:]!r})"


@pytest.fixture
def ckptmgr_cli(capsys):
    """Run ``ckptmgr ARGS...`` in this process; returns a Result(code, out, err)."""
    def run(*args: str) -> Result:
        capsys.readouterr()
        code = cli.main([str(a) for a in args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)
    return run


def tree(root: str) -> Dict[str, Tuple[int, str]]:
    """Every file and directory under ``root``: name -> (mtime_ns, sha256 of the content or 'dir')."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = (os.stat(path).st_mtime_ns, "dir")
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = (os.stat(path).st_mtime_ns, hashlib.sha256(fh.read()).hexdigest())
    out["."] = (os.stat(root).st_mtime_ns, "dir")
    return out


def flip_byte(path: str, offset: int = -1) -> None:
    """Change one byte in place (same size): silent corruption."""
    with open(path, "r+b") as fh:
        fh.seek(offset, os.SEEK_END if offset < 0 else os.SEEK_SET)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0xFF]))
