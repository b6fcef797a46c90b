"""What `ckptmgr` says and returns at the edges: nothing to list, nothing to verify, a closed pipe, --version."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import ckptmgr
from tests.cli.conftest import small_model

pytestmark = pytest.mark.timeout(120)


def test_ls_of_foreign_files_or_an_empty_directory_fails_like_verify(ckptmgr_cli, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    (foreign / "data").mkdir()
    for command in ("ls", "verify"):
        result = ckptmgr_cli(command, foreign)
        assert result.code == 1 and "holds no checkpoints" in result.err, (command, result)
    assert "2 other entries, none of them ckptmgr's" in ckptmgr_cli("ls", foreign).err
    assert ckptmgr_cli("ls", foreign, "--json").code == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    result = ckptmgr_cli("ls", empty)
    assert result.code == 1 and "it is empty" in result.err
    afile = tmp_path / "afile.txt"
    afile.write_text("x")
    assert "is a file, not a directory" in ckptmgr_cli("ls", afile).err


def test_verify_with_nothing_committed_fails(ckptmgr_cli, tmp_path):
    run = tmp_path / "run"
    (run / (".tmp-step_00000005-" + "a" * 32)).mkdir(parents=True)   # only a crashed save's leftovers
    result = ckptmgr_cli("verify", run)
    assert result.code == 1 and "nothing committed to verify" in result.err and "all 0 intact" not in result.out
    data = json.loads(ckptmgr_cli("verify", run, "--json").out)
    assert data["ok"] is False
    assert ckptmgr_cli("ls", run).code == 0                          # listing what is there is still a listing


def test_a_closed_pipe_ends_the_command_quietly(run_dir):
    child = subprocess.Popen([sys.executable, "-m", "ckptmgr.cli", "ls", run_dir], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    child.stdout.close()                                              # `ckptmgr ls DIR | head -0`
    err = child.stderr.read().decode()
    assert child.wait(timeout=60) == 0, err
    assert "BrokenPipe" not in err and "Broken pipe" not in err and "Exception ignored" not in err


def test_version_and_plain_text_help(ckptmgr_cli):
    result = ckptmgr_cli("--version")
    assert result.code == 0 and result.out.strip() == f"ckptmgr {ckptmgr.__version__}"
    text = ckptmgr_cli("--help").out + "".join(ckptmgr_cli(c, "--help").out for c in ("ls", "prune", "inspect"))
    for markup in ("``", ":mod:", ":func:", ":class:", "::"):
        assert markup not in text


def test_prune_refusal_says_what_it_refuses(ckptmgr_cli, run_dir):
    with ckptmgr.CheckpointManager(run_dir, max_to_keep=None) as job:
        job.save(50, model=small_model())
        result = ckptmgr_cli("prune", run_dir, "--keep", "1")
    assert result.code == 1 and "not pruning" in result.err and "refusing to save" not in result.err


def test_inspect_and_convert_take_the_state_dict_of_a_whole_pickled_module(ckptmgr_cli, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    path = tmp_path / "whole.pth"
    torch.save(model, path)                                           # the whole module, not its state_dict
    assert "--trust-pickle" in ckptmgr_cli("inspect", path).err       # it is still pickle code
    result = ckptmgr_cli("inspect", path, "--trust-pickle")
    assert result.code == 0 and "whole pickled Sequential module" in result.out
    assert "0.weight" in result.out and "no model state dict found" not in result.out
    out = tmp_path / "weights.safetensors"
    assert ckptmgr_cli("convert", path, out, "--trust-pickle").code == 0
    weights = load_file(str(out))
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    fresh = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    ckptmgr.load_checkpoint(fresh, str(path), strict=True, trust_pickle=True)
    assert torch.equal(fresh[0].weight, model[0].weight)
    assert os.path.getsize(out) > 0
