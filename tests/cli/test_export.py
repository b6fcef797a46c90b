"""Export: `ckptmgr convert --dtype --max-shard-size` to Hugging Face-style shards, atomically; `publish --dtype`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import ckptmgr
from ckptmgr.errors import CheckpointExistsError
from ckptmgr.faults import InjectedFault
from tests.manager.helpers import assert_same

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "v0_1")
INDEX = "model.safetensors.index.json"


def _model() -> nn.Module:
    """Three 64x64 Linear layers (16 KiB of fp32 weight each, 8 KiB in bf16) and a BatchNorm."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.Linear(64, 64), nn.Linear(64, 64))
    model(torch.randn(4, 64))
    return model


@pytest.fixture
def source(tmp_path):
    """A manager directory (one step, with optimizer state) and the model and optimizer saved in it."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    directory = str(tmp_path / "run")
    with ckptmgr.CheckpointManager(directory) as manager:
        manager.save(5, model=model, optimizer=opt)
    return directory, model, opt


def _bf16(state):
    return {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}


def _read_shards(directory: str):
    with open(os.path.join(directory, INDEX)) as fh:
        index = json.load(fh)
    union = {}
    for name in sorted(set(index["weight_map"].values())):
        shard = load_file(os.path.join(directory, name))
        assert {k for k, f in index["weight_map"].items() if f == name} == set(shard)
        union.update(shard)
    return index, union


def test_three_shard_export_in_bf16(ckptmgr_cli, source, tmp_path):
    run, model, _ = source
    dst = str(tmp_path / "hf")
    result = ckptmgr_cli("convert", run, dst, "--dtype", "bfloat16", "--max-shard-size", "10KB", "--json")
    assert result.code == 0, result
    names = sorted(os.listdir(dst))
    assert names == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                     "model-00003-of-00003.safetensors", INDEX]
    index, union = _read_shards(dst)
    state = model.state_dict()
    assert set(index["weight_map"]) == set(state)
    assert_same(_bf16(state), union)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in union.values())
    assert json.loads(result.out)["files"] == names[:3] + [INDEX]
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no temporary directory left


def test_shard_directory_loads_back_and_warm_starts_a_run(source, tmp_path):
    run, model, _ = source
    dst = str(tmp_path / "hf")
    written = ckptmgr.export(run, dst, max_shard_size=20_000)
    assert written.files[-1] == INDEX and len(written.files) == 4  # one 16 KiB layer (and what follows it) per shard
    again = _model()
    for p in again.parameters():
        nn.init.zeros_(p)
    checkpoint = ckptmgr.load_checkpoint(again, dst, strict=True)
    assert_same(model.state_dict(), again.state_dict())
    assert checkpoint["meta"]["step"] == 5
    fresh = _model()
    for p in fresh.parameters():
        nn.init.zeros_(p)
    assert ckptmgr.resume_from_latest(str(tmp_path / "finetune"), model=fresh, init_from=dst) == 0
    assert_same(model.state_dict(), fresh.state_dict())


def test_export_with_optimizer_and_to_one_file(source, tmp_path):
    run, model, opt = source
    dst = str(tmp_path / "hf")
    ckptmgr.export(run, dst, include_optimizer=True, dtype=torch.float16)
    exported = ckptmgr.CheckpointLoader.load_checkpoint(os.path.join(dst, "optimizer.safetensors"))
    assert_same(opt.state_dict()["state"], exported["optimizer"]["state"])  # optimizer state is never cast
    one = str(tmp_path / "weights.safetensors")
    written = ckptmgr.export(run, one, dtype="bf16")
    assert written.files == ["weights.safetensors"]
    assert_same(_bf16(model.state_dict()), load_file(one))


def test_export_of_a_sharded_checkpoint(tmp_path):
    reference = torch.load(os.path.join(FIXTURE, "reference.pt"), weights_only=True)
    dst = str(tmp_path / "hf")
    ckptmgr.export(os.path.join(FIXTURE, "run_sharded"), dst, dtype="bfloat16", max_shard_size=1)
    index, union = _read_shards(dst)
    assert len(set(index["weight_map"].values())) == len(reference["model"])  # one tensor per shard
    assert_same(_bf16(reference["model"]), union)


def _export_in_child(src: str, dst: str, env: dict) -> subprocess.CompletedProcess:
    code = f"import ckptmgr; ckptmgr.export({src!r}, {dst!r}, max_shard_size='20KB', force=True)"
    return subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True,
                          timeout=120)


def test_kill_mid_export_leaves_no_partial_destination(source, tmp_path):
    run, model, _ = source
    dst = str(tmp_path / "hf")
    child = _export_in_child(run, dst, {"CKPTMGR_FAULT_POINT": "export.after_file:2"})
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert not os.path.exists(dst)
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".hf.tmp-")]
    assert len(leftovers) == 1 and len(os.listdir(tmp_path / leftovers[0])) == 2  # killed after two shards
    ckptmgr.export(run, dst, max_shard_size="20KB")  # the next export removes the leftover
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []
    assert_same(model.state_dict(), _read_shards(dst)[1])


def test_kill_while_replacing_keeps_the_old_export(source, tmp_path):
    run, model, _ = source
    dst = str(tmp_path / "hf")
    ckptmgr.export(run, dst, dtype="bfloat16")
    before = sorted(os.listdir(dst))
    # three shards and the index are complete in the temporary directory; the swap has not happened
    child = _export_in_child(run, dst, {"CKPTMGR_FAULT_POINT": "export.after_file:4"})
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert sorted(os.listdir(dst)) == before
    assert_same(_bf16(model.state_dict()), _read_shards(dst)[1])


def test_a_failed_export_removes_what_it_wrote(source, tmp_path, monkeypatch):
    run, _, _ = source
    monkeypatch.setenv("CKPTMGR_FAULT_POINT", "export.after_file:2")
    monkeypatch.setenv("CKPTMGR_FAULT_ACTION", "raise")
    monkeypatch.setattr("ckptmgr.faults._hits", {})
    with pytest.raises(InjectedFault):
        ckptmgr.export(run, str(tmp_path / "hf"), max_shard_size="10KB")
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_export_to_s3_writes_the_index_last_and_cleans_up_a_failure(source, s3, monkeypatch):
    import s3fs
    run, model, _ = source
    fs = s3fs.S3FileSystem()
    monkeypatch.setenv("CKPTMGR_FAULT_POINT", "export.after_file:2")
    monkeypatch.setenv("CKPTMGR_FAULT_ACTION", "raise")
    monkeypatch.setattr("ckptmgr.faults._hits", {})
    with pytest.raises(InjectedFault):
        ckptmgr.export(run, f"{s3}/hf", max_shard_size="20KB")
    assert fs.ls(s3.removeprefix("s3://"), refresh=True) == []
    monkeypatch.delenv("CKPTMGR_FAULT_POINT")
    ckptmgr.export(run, f"{s3}/hf", max_shard_size="20KB")
    assert len(fs.ls(f"{s3}/hf", refresh=True)) == 4
    again = _model()
    ckptmgr.load_checkpoint(again, f"{s3}/hf", strict=True)
    assert_same(model.state_dict(), again.state_dict())
    with pytest.raises(CheckpointExistsError):
        ckptmgr.export(run, f"{s3}/hf")
    ckptmgr.export(run, f"{s3}/hf", force=True)  # one shard now: the old ones go
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3}/hf", refresh=True)) == [
        "model-00001-of-00001.safetensors", INDEX]


def test_convert_usage_errors_and_existing_destinations(ckptmgr_cli, source, tmp_path):
    run, _, _ = source
    assert ckptmgr_cli("convert", run, tmp_path / "w.safetensors", "--max-shard-size", "1GB").code == 2
    assert ckptmgr_cli("convert", run, tmp_path / "hf", "--dtype", "int8").code == 2
    assert ckptmgr_cli("convert", run, tmp_path / "hf", "--max-shard-size", "lots").code == 2
    assert ckptmgr_cli("convert", run, tmp_path / "w.txt").code == 2
    assert not os.path.exists(tmp_path / "hf")
    assert ckptmgr_cli("convert", run, tmp_path / "hf").code == 0
    before = sorted(os.listdir(tmp_path / "hf"))
    result = ckptmgr_cli("convert", run, tmp_path / "hf", "--max-shard-size", "10KB")
    assert result.code == 1 and "exists" in result.err
    assert sorted(os.listdir(tmp_path / "hf")) == before
    assert ckptmgr_cli("convert", run, tmp_path / "v1.2", "--max-shard-size", "20KB").code == 0  # no extension
    assert len(os.listdir(tmp_path / "v1.2")) == 4


def test_publish_with_dtype(ckptmgr_cli, source, tmp_path):
    run, model, _ = source
    result = ckptmgr_cli("publish", run, tmp_path / "hub", "--dtype", "float16", "--json")
    assert result.code == 0, result
    path = json.loads(result.out)["path"]
    published = torch.load(path, weights_only=True)["state_dict"]
    assert_same({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()},
                dict(published))
    assert ckptmgr_cli("publish", run, tmp_path / "hub", "--dtype", "float8").code == 2
