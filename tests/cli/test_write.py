"""`ckptmgr convert`, `publish`, `prune` and `download`: what they write, and what they refuse to touch."""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import ckptmgr
from ckptmgr.hub.cache import hash_prefix
from ckptmgr.step.ownership import LOCK_NAME, OWNER_NAME
from tests.cli.conftest import flip_byte, small_model, tree
from tests.cli.test_read_only import _add_incomplete_entries, _pickle_bomb

pytestmark = pytest.mark.timeout(120)


def _latest_weights(run_dir: str) -> dict:
    return ckptmgr.CheckpointLoader.load_checkpoint(run_dir)["state_dict"]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- convert


def test_convert_manager_checkpoint_to_pth_and_safetensors_and_back(ckptmgr_cli, run_dir, tmp_path):
    weights = _latest_weights(run_dir)
    before = tree(run_dir)
    pth, st, back = tmp_path / "w.pth", tmp_path / "w.safetensors", tmp_path / "back.pth"
    assert ckptmgr_cli("convert", run_dir, pth).code == 0
    loaded = torch.load(pth, weights_only=True)
    assert set(loaded) == {"meta", "state_dict"} and loaded["meta"]["step"] == 40
    assert _same(loaded["state_dict"], weights)
    assert ckptmgr_cli("convert", pth, st).code == 0
    assert _same(load_file(str(st)), weights)                       # any safetensors reader can use it
    result = ckptmgr_cli("convert", st, back, "--json")
    assert result.code == 0 and json.loads(result.out)["tensors"] == len(weights)
    assert _same(torch.load(back, weights_only=True)["state_dict"], weights)
    model = small_model()
    ckptmgr.load_checkpoint(model, str(back), strict=True)
    assert tree(run_dir) == before


def test_one_safetensors_layout_keeps_meta_through_every_path(ckptmgr_cli, run_dir, tmp_path):
    """save_checkpoint and convert write the same layout (bare keys, meta in the header); every reader keeps meta."""
    model = small_model()
    saved = tmp_path / "saved.safetensors"
    ckptmgr.save_checkpoint(model, str(saved), meta={"epoch": 3})
    assert set(load_file(str(saved))) == set(model.state_dict())      # bare keys, for any safetensors tool
    assert ckptmgr.load_checkpoint(small_model(), str(saved), strict=True)["meta"]["epoch"] == 3
    converted, back = tmp_path / "converted.safetensors", tmp_path / "back.pth"
    assert ckptmgr_cli("convert", run_dir, converted).code == 0
    assert set(load_file(str(converted))) == set(model.state_dict())
    assert ckptmgr.load_checkpoint(small_model(), str(converted), strict=True)["meta"]["step"] == 40
    for source, key, value in ((saved, "epoch", 3), (converted, "step", 40)):
        result = ckptmgr_cli("inspect", source, "--json")
        assert result.code == 0 and json.loads(result.out)["meta"][key] == value
        assert ckptmgr_cli("convert", source, back, "--force").code == 0
        assert torch.load(back, weights_only=True)["meta"][key] == value


@pytest.mark.parametrize("name", ["single.safetensors", "converted.safetensors"])
def test_0_1_safetensors_layouts_keep_their_meta_through_inspect_and_convert(ckptmgr_cli, tmp_path, name):
    source = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "v0_1", name)
    result = ckptmgr_cli("inspect", source, "--json")
    assert result.code == 0 and json.loads(result.out)["meta"]
    back = tmp_path / "back.pth"
    assert ckptmgr_cli("convert", source, back).code == 0
    assert torch.load(back, weights_only=True)["meta"] == json.loads(result.out)["meta"]


def test_convert_refuses_to_overwrite_unknown_formats_and_pickle(ckptmgr_cli, run_dir, tmp_path):
    dst = tmp_path / "w.pth"
    dst.write_bytes(b"keep me")
    result = ckptmgr_cli("convert", run_dir, dst)
    assert result.code == 1 and "--force" in result.err and dst.read_bytes() == b"keep me"
    assert ckptmgr_cli("convert", run_dir, dst, "--force").code == 0
    result = ckptmgr_cli("convert", run_dir, tmp_path / "w.txt")
    assert result.code == 2 and ".safetensors" in result.err
    bomb, marker = _pickle_bomb(tmp_path)
    result = ckptmgr_cli("convert", bomb, tmp_path / "safe.safetensors")
    assert result.code == 1 and "--trust-pickle" in result.err
    assert not os.path.exists(marker) and not os.path.exists(tmp_path / "safe.safetensors")
    assert ckptmgr_cli("convert", bomb, tmp_path / "safe.safetensors", "--trust-pickle").code == 0
    assert set(load_file(str(tmp_path / "safe.safetensors"))) == set(small_model().state_dict())


def test_convert_of_a_damaged_source_writes_nothing(ckptmgr_cli, run_dir, tmp_path):
    for step in ("10", "20", "30", "40"):
        flip_byte(os.path.join(run_dir, f"step_000000{step}", "model.safetensors"))
    result = ckptmgr_cli("convert", run_dir, tmp_path / "w.pth")
    assert result.code == 1 and "damaged" in result.err
    assert not os.path.exists(tmp_path / "w.pth")
    assert [n for n in os.listdir(tmp_path) if n != "run"] == []    # no temp file left either


# --------------------------------------------------------------------------- publish


def test_publish_strips_optimizer_state_and_names_the_file_by_its_hash(ckptmgr_cli, run_dir, tmp_path):
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 4)).sum().backward()
    opt.step()
    src = str(tmp_path / "resnet-0123abcd.pth")               # republishing drops the old hash from the name
    ckptmgr.save_checkpoint(model, src, optimizer=opt, meta={"epoch": 7})
    result = ckptmgr_cli("publish", src, tmp_path / "hub")
    assert result.code == 0, result
    path = result.out.split()[1]
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert f"sha256 {digest}" in result.out
    assert os.path.basename(path) == f"resnet-{digest[:8]}.pth" and hash_prefix(path) == digest[:8]
    loaded = torch.load(path, weights_only=True)
    assert "optimizer" not in loaded and loaded["meta"]["epoch"] == 7
    assert _same(loaded["state_dict"], model.state_dict())
    info = json.loads(ckptmgr_cli("publish", run_dir, tmp_path / "hub", "--json").out)
    assert os.path.basename(info["path"]) == f"run-{info['sha256'][:8]}.pth"
    step = json.loads(ckptmgr_cli("publish", os.path.join(run_dir, "step_00000020"), tmp_path / "hub", "--json").out)
    assert os.path.basename(step["path"]).startswith("run-step_00000020-")
    assert _same(torch.load(info["path"], weights_only=True)["state_dict"], _latest_weights(run_dir))


def test_publish_rejects_bad_names_and_bad_sources(ckptmgr_cli, run_dir, tmp_path):
    assert ckptmgr_cli("publish", run_dir, tmp_path / "hub", "--name", "../evil").code == 2
    assert ckptmgr_cli("publish", tmp_path / "absent.pth", tmp_path / "hub").code == 1
    torn = tmp_path / "torn.pth"
    ckptmgr.save_checkpoint(small_model(), str(torn))
    torn.write_bytes(torn.read_bytes()[:-200])
    result = ckptmgr_cli("publish", torn, tmp_path / "hub")
    assert result.code == 1 and "torn.pth" in result.err
    assert not os.path.exists(tmp_path / "hub") or os.listdir(tmp_path / "hub") == []


# --------------------------------------------------------------------------- prune


def test_prune_dry_run_changes_nothing(ckptmgr_cli, run_dir):
    before = tree(run_dir)
    result = ckptmgr_cli("prune", run_dir, "--keep", "2", "--dry-run")
    assert result.code == 0 and "would delete 2 checkpoint(s): steps [10, 20]" in result.out
    assert tree(run_dir) == before


def test_prune_applies_retention_and_never_touches_foreign_or_uncommitted_entries(ckptmgr_cli, run_dir):
    _add_incomplete_entries(run_dir)
    untouched = {k: v for k, v in tree(run_dir).items()   # all but the steps and prune's own writer lock
                 if not k.startswith(("step_00000010", "step_00000020", "step_00000030", "step_00000040",
                                      LOCK_NAME, OWNER_NAME))}
    untouched.pop(".")
    result = ckptmgr_cli("prune", run_dir, "--keep", "1", "--best-metric", "loss", "--keep-best", "1", "--json")
    assert result.code == 0, result
    data = json.loads(result.out)
    assert data["deleted"] == [10, 30] and data["kept"] == [20, 40]
    after = tree(run_dir)
    assert all(after.get(k) == v for k, v in untouched.items())          # byte for byte, mtime for mtime
    assert ckptmgr.CheckpointManager(run_dir).all_steps() == [20, 40]
    assert not [n for n in os.listdir(run_dir) if n.startswith(".tmp-") and "a" * 32 not in n]   # no trash left


def test_prune_refuses_a_directory_a_job_is_saving_into(ckptmgr_cli, run_dir):
    with ckptmgr.CheckpointManager(run_dir, max_to_keep=None) as job:
        job.save(50, model=small_model())
        before = tree(run_dir)
        result = ckptmgr_cli("prune", run_dir, "--keep", "1")
        assert result.code == 1 and "not pruning" in result.err and "in use" in result.err
        assert tree(run_dir) == before
    assert ckptmgr_cli("prune", run_dir, "--keep", "1").code == 0
    assert ckptmgr.CheckpointManager(run_dir).all_steps() == [50]


def test_prune_keep_every_and_usage_errors(ckptmgr_cli, run_dir, tmp_path):
    assert ckptmgr_cli("prune", run_dir, "--keep", "1", "--keep-every", "20").code == 0
    assert ckptmgr.CheckpointManager(run_dir).all_steps() == [20, 40]
    before = tree(run_dir)
    for args in (("--keep", "0"), ("--keep-best", "1", "--keep", "1")):
        result = ckptmgr_cli("prune", run_dir, *args)
        assert result.code == 2, (args, result)
    assert "--keep must be a positive int" in ckptmgr_cli("prune", run_dir, "--keep", "0").err
    assert tree(run_dir) == before
    assert ckptmgr_cli("prune", tmp_path / "absent", "--keep", "1").code == 1


def test_ls_and_prune_use_the_policy_recorded_with_the_run(ckptmgr_cli, tmp_path):
    run = str(tmp_path / "run")
    model = small_model()
    with ckptmgr.CheckpointManager(run, max_to_keep=None, keep_every_n_steps=20, best_metric="loss",
                                   keep_best=1) as mgr:
        for step, loss in ((10, 0.1), (20, 0.5), (30, 0.7), (40, 0.9)):
            mgr.save(step, model=model, metrics={"loss": loss})
    with ckptmgr.CheckpointManager(run, max_to_keep=1, keep_every_n_steps=20, best_metric="loss", keep_best=1) as mgr:
        mgr.save(50, model=model, metrics={"loss": 0.8})   # the job's own policy now: last 1, every 20, best 1
    assert ckptmgr.CheckpointManager(run).all_steps() == [10, 20, 40, 50]
    listing = ckptmgr_cli("ls", run)
    assert listing.code == 0 and "retention recorded with the run: last 1, every 20, best 1 by loss" in listing.out
    assert json.loads(ckptmgr_cli("ls", run, "--json").out)["retention"]["keep_best"] == 1
    result = ckptmgr_cli("prune", run, "--json")              # no flags: the run's own rule deletes nothing more
    assert result.code == 0 and json.loads(result.out)["delete"] == []
    assert ckptmgr_cli("prune", run, "--keep", "1", "--dry-run", "--json").code == 0   # flags still win
    assert json.loads(ckptmgr_cli("prune", run, "--keep", "1", "--json").out)["deleted"] == [10, 20, 40]


def test_prune_without_flags_of_a_run_that_recorded_no_policy_is_a_usage_error(ckptmgr_cli, tmp_path):
    run = str(tmp_path / "v0_1")
    shutil.copytree(os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "v0_1", "run"), run)
    result = ckptmgr_cli("prune", run)
    assert result.code == 2 and "--keep" in result.err and "records no retention policy" in result.err


# --------------------------------------------------------------------------- download


def test_download_fills_the_cache_once_and_prints_the_path(ckptmgr_cli, http_server, tmp_path):
    data = b"weights" * 1000
    name = f"/models/net-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    url = http_server.add(name, data)
    result = ckptmgr_cli("download", url)
    assert result.code == 0, result
    path = result.out.strip()
    assert path.startswith(os.environ["CKPTMGR_HOME"]) and open(path, "rb").read() == data
    again = json.loads(ckptmgr_cli("download", url, "--json").out)
    assert again["path"] == path and again["size"] == len(data)
    assert http_server.gets(name) == 1


def test_download_failures_exit_1_and_cache_nothing(ckptmgr_cli, http_server):
    bad = http_server.add("/models/net-00000000.pth", b"not what the name promises")
    result = ckptmgr_cli("download", bad)
    assert result.code == 1 and "sha256" in result.err
    assert ckptmgr_cli("download", bad, "--no-check-hash").code == 0
    missing = ckptmgr_cli("download", http_server.url("/models/absent.pth"))
    assert missing.code == 1 and "absent.pth" in missing.err
    cache = os.path.join(os.environ["CKPTMGR_HOME"], "hub", "checkpoints")
    assert [n for n in os.listdir(cache) if "absent" in n or n.startswith(".")] == []
    assert ckptmgr_cli("download", "nosuchscheme://x").code == 1


def test_download_of_a_local_file_prints_it(ckptmgr_cli, tmp_path):
    path = tmp_path / "m.pth"
    shutil.copyfile(__file__, path)
    result = ckptmgr_cli("download", path)
    assert result.code == 0 and result.out.strip() == str(path)
