"""`ckptmgr ls`, `inspect` and `verify` on good and damaged inputs; none of them changes anything on disk."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

import ckptmgr
from tests.cli.conftest import flip_byte, small_model, tree

pytestmark = pytest.mark.timeout(120)


class Bomb:
    """Unpickling this touches a marker file: proof that pickle code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _pickle_bomb(tmp_path) -> tuple:
    path, marker = str(tmp_path / "bomb.pth"), str(tmp_path / "pickle-ran")
    torch.save({"state_dict": small_model().state_dict(), "payload": Bomb(marker)}, path)
    return path, marker


def _add_incomplete_entries(run_dir: str) -> None:
    os.makedirs(os.path.join(run_dir, ".tmp-step_00000050-" + "a" * 32))          # a crashed save
    os.makedirs(os.path.join(run_dir, "step_00000060"))                             # no manifest
    shutil.copytree(os.path.join(run_dir, "step_00000030"), os.path.join(run_dir, "step_00000070"))
    flip_byte(os.path.join(run_dir, "step_00000070", "manifest.json"), 100)        # a damaged manifest
    os.makedirs(os.path.join(run_dir, "notes"))                                     # foreign: never listed
    pathlib.Path(run_dir, "README.txt").write_text("mine")


# --------------------------------------------------------------------------- help and exit codes


def test_help_for_every_subcommand_and_usage_errors_exit_2(ckptmgr_cli):
    assert ckptmgr_cli("--help").code == 0
    for command in ("ls", "inspect", "verify", "convert", "publish", "prune", "download"):
        result = ckptmgr_cli(command, "--help")
        assert result.code == 0 and "usage: ckptmgr " + command in result.out
    assert ckptmgr_cli().code == 2
    assert ckptmgr_cli("frobnicate").code == 2
    assert ckptmgr_cli("ls").code == 2


def test_console_script_is_installed_and_returns_exit_codes(run_dir):
    script = os.path.join(os.path.dirname(sys.executable), "ckptmgr")
    ok = subprocess.run([script, "verify", run_dir], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    missing = subprocess.run([script, "ls", run_dir + "-nope"], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    usage = subprocess.run([script, "prune", run_dir, "--keep", "many"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "--keep" in usage.stderr


# --------------------------------------------------------------------------- ls


def test_ls_lists_committed_checkpoints(ckptmgr_cli, run_dir):
    before = tree(run_dir)
    result = ckptmgr_cli("ls", run_dir)
    assert result.code == 0, result
    assert "4 committed checkpoints (latest: step 40)" in result.out
    assert "loss=0.4" in result.out and "KiB" in result.out
    data = json.loads(ckptmgr_cli("ls", run_dir, "--json").out)
    assert [c["step"] for c in data["checkpoints"]] == [10, 20, 30, 40]
    assert data["checkpoints"][1]["metrics"] == {"loss": 0.4} and data["checkpoints"][0]["size"] > 0
    assert data["incomplete"] == []
    assert tree(run_dir) == before


def test_ls_shows_what_retention_keeps_and_why(ckptmgr_cli, run_dir):
    data = json.loads(ckptmgr_cli("ls", run_dir, "--json", "--keep", "1", "--keep-every", "30",
                                  "--best-metric", "loss", "--keep-best", "1").out)
    assert {c["step"]: c["kept_by"] for c in data["checkpoints"]} == {
        10: [], 20: ["best 1 by loss"], 30: ["every 30"], 40: ["last 1"]}
    text = ckptmgr_cli("ls", run_dir, "--keep", "2").out
    assert "KEPT BY" in text and "(prune would delete it)" in text


def test_ls_flags_incomplete_entries_and_ignores_foreign_ones(ckptmgr_cli, run_dir):
    _add_incomplete_entries(run_dir)
    before = tree(run_dir)
    result = ckptmgr_cli("ls", run_dir)
    assert result.code == 0
    assert "not committed" in result.out and "temporary" in result.out and "uncommitted" in result.out
    assert "damaged" in result.out and "notes" not in result.out and "README" not in result.out
    data = json.loads(ckptmgr_cli("ls", run_dir, "--json").out)
    assert {e["name"]: e["status"] for e in data["incomplete"]} == {
        ".tmp-step_00000050-" + "a" * 32: "temporary", "step_00000060": "uncommitted",
        "step_00000070": "damaged"}
    assert [c["step"] for c in data["checkpoints"]] == [10, 20, 30, 40]
    assert tree(run_dir) == before


def test_ls_of_a_missing_directory_fails(ckptmgr_cli, tmp_path):
    result = ckptmgr_cli("ls", tmp_path / "nope")
    assert result.code == 1 and "does not exist" in result.err and "not a directory" not in result.err


def test_ls_verify_and_inspect_on_s3(ckptmgr_cli, s3):
    with ckptmgr.CheckpointManager(f"{s3}/run", max_to_keep=2) as manager:
        for step in (1, 2, 3):
            manager.save(step, model=small_model(), metrics={"loss": 1.0 / step})
    data = json.loads(ckptmgr_cli("ls", f"{s3}/run", "--json").out)
    assert [c["step"] for c in data["checkpoints"]] == [2, 3]
    assert ckptmgr_cli("verify", f"{s3}/run").code == 0
    info = json.loads(ckptmgr_cli("inspect", f"{s3}/run", "--json").out)
    assert info["kind"] == "manager checkpoint" and info["step"] == 3 and info["state_dict"]["tensors"] == 9


# --------------------------------------------------------------------------- inspect


def test_inspect_manager_directory_and_step_directory(ckptmgr_cli, run_dir):
    before = tree(run_dir)
    result = ckptmgr_cli("inspect", run_dir)
    assert result.code == 0, result
    assert "step 40" in result.out and "0.weight" in result.out and "(8, 4)" in result.out
    assert "exp_avg" in result.out and "last_epoch" in result.out and "extra: epoch" in result.out
    info = json.loads(ckptmgr_cli("inspect", os.path.join(run_dir, "step_00000020"), "--json").out)
    assert info["step"] == 20 and info["metrics"] == {"loss": 0.4}
    assert info["optimizer"]["optimizer"]["param_groups"][0]["lr"] == 0.01 * 0.1 ** 0   # StepLR(10) after 2 steps
    assert info["optimizer"]["optimizer"]["state_keys"] == ["exp_avg", "exp_avg_sq", "step"]
    assert info["scheduler"]["scheduler"]["last_epoch"] == 2
    keys = {k["key"]: k for k in info["state_dict"]["keys"]}
    assert keys["0.weight"]["shape"] == [8, 4] and keys["1.num_batches_tracked"]["dtype"] == "int64"
    assert tree(run_dir) == before


def test_inspect_single_files_top_n_and_all(ckptmgr_cli, tmp_path):
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    model(torch.randn(4, 4)).sum().backward()
    opt.step()
    pth, st = str(tmp_path / "m.pth"), str(tmp_path / "m.safetensors")
    ckptmgr.save_checkpoint(model, pth, optimizer=opt, meta={"epoch": 3})
    ckptmgr.save_checkpoint(model, st)
    before = tree(str(tmp_path))
    out = ckptmgr_cli("inspect", pth, "--top", "2").out
    assert "epoch: 3" in out and "lr=0.5" in out and "momentum_buffer" in out and "7 more (--all" in out
    info = json.loads(ckptmgr_cli("inspect", st, "--json", "--all").out)
    assert info["state_dict"]["tensors"] == 9 and len(info["state_dict"]["keys"]) == 9
    assert tree(str(tmp_path)) == before


def test_inspect_any_registered_scheme(ckptmgr_cli, registry):
    registry.register_scheme("clitest://", lambda filename, map_location=None: {
        "state_dict": {"w": torch.zeros(2, 3, dtype=torch.float16)}, "meta": {"from": filename}})
    info = json.loads(ckptmgr_cli("inspect", "clitest://zoo/model", "--json").out)
    assert info["state_dict"]["keys"] == [{"key": "w", "shape": [2, 3], "dtype": "float16"}]
    assert info["meta"] == {"from": "clitest://zoo/model"}


def test_inspect_never_runs_pickle_code_unless_trusted(ckptmgr_cli, tmp_path):
    path, marker = _pickle_bomb(tmp_path)
    result = ckptmgr_cli("inspect", path)
    assert result.code == 1 and "--trust-pickle" in result.err
    assert not os.path.exists(marker)
    trusted = ckptmgr_cli("inspect", path, "--trust-pickle")
    assert trusted.code == 0 and "other top-level keys: payload" in trusted.out
    assert os.path.exists(marker)


def test_inspect_damaged_inputs_fail_with_a_clear_message(ckptmgr_cli, run_dir, tmp_path):
    pth = str(tmp_path / "m.pth")
    ckptmgr.save_checkpoint(small_model(), pth)
    with open(pth, "r+b") as fh:
        fh.truncate(100)
    result = ckptmgr_cli("inspect", pth)
    assert result.code == 1 and "m.pth" in result.err
    flip_byte(os.path.join(run_dir, "step_00000040", "model.safetensors"))
    result = ckptmgr_cli("inspect", os.path.join(run_dir, "step_00000040"))
    assert result.code == 1 and "model.safetensors" in result.err
    assert ckptmgr_cli("inspect", tmp_path / "absent.pth").code == 1


# --------------------------------------------------------------------------- verify


def test_verify_good_directory_and_step(ckptmgr_cli, run_dir):
    _add_incomplete_entries(run_dir)
    shutil.rmtree(os.path.join(run_dir, "step_00000070"))
    before = tree(run_dir)
    result = ckptmgr_cli("verify", run_dir)
    assert result.code == 0, result
    assert "all 4 intact" in result.out and "not committed (temporary" in result.out
    assert ckptmgr_cli("verify", os.path.join(run_dir, "step_00000010")).code == 0
    assert tree(run_dir) == before


@pytest.mark.parametrize("damage, message", [
    ("flip", "model.safetensors: xxh3"), ("truncate", "optimizer.safetensors: "), ("delete", "meta.json: missing"),
    ("manifest", "manifest.json: "),
])
def test_verify_names_the_damaged_file_and_exits_1(ckptmgr_cli, run_dir, damage, message):
    step = os.path.join(run_dir, "step_00000020")
    if damage == "flip":
        flip_byte(os.path.join(step, "model.safetensors"))
    elif damage == "truncate":
        with open(os.path.join(step, "optimizer.safetensors"), "r+b") as fh:
            fh.truncate(50)
    elif damage == "delete":
        os.unlink(os.path.join(step, "meta.json"))
    else:
        flip_byte(os.path.join(step, "manifest.json"), 50)
    before = tree(run_dir)
    result = ckptmgr_cli("verify", run_dir)
    assert result.code == 1, result
    assert "step_00000020  DAMAGED" in result.out and message in result.out and "1 of 4 damaged" in result.out
    data = json.loads(ckptmgr_cli("verify", step, "--json").out)
    assert data["ok"] is False and data["checked"][0]["problems"][0].startswith(message.split(":")[0])
    assert tree(run_dir) == before


def test_verify_single_files_by_the_hash_in_their_name(ckptmgr_cli, run_dir, tmp_path):
    result = ckptmgr_cli("publish", run_dir, tmp_path / "pub", "--name", "mlp")
    published = result.out.split()[1]
    assert ckptmgr_cli("verify", published).code == 0
    flip_byte(published)
    bad = ckptmgr_cli("verify", published)
    assert bad.code == 1 and "does not start with" in bad.out
    plain = str(tmp_path / "plain.pth")
    ckptmgr.save_checkpoint(small_model(), plain)
    result = ckptmgr_cli("verify", plain)
    assert result.code == 1 and "nothing to check it against" in result.err
    assert ckptmgr_cli("verify", tmp_path / "absent").code == 1
