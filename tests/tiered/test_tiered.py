"""Tiered checkpoints in one process: a local tier on disk, a moto S3 bucket (through a logging proxy) behind it."""
from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch
from torch import nn

import ckptmgr
from ckptmgr import CheckpointExistsError, CheckpointManager, DirectoryInUseError, cli, faults
from tests.cli.conftest import flip_byte
from tests.tiered.conftest import data_gets

pytestmark = pytest.mark.timeout(120)


def model(value: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    with torch.no_grad():
        net[0].weight.fill_(value)
    return net


def weight(net: nn.Module) -> float:
    return float(net[0].weight.detach()[0, 0])


def steps_in(url: str, options) -> list:
    """Committed steps of the persistent tier alone (a plain manager on it)."""
    return CheckpointManager(url, storage_options=options).all_steps()


def local_steps(local: str) -> list:
    return sorted(int(n[5:]) for n in os.listdir(local) if n.startswith("step_")) if os.path.isdir(local) else []


@pytest.fixture
def tiers(s3, s3_options, tmp_path):
    """``(persistent URL, local_dir, storage_options)`` of a fresh tiered manager directory."""
    return f"{s3}/run", str(tmp_path / "local"), s3_options


def _save_three(url, local, options, **kwargs):
    with CheckpointManager(url, max_to_keep=3, local_dir=local, storage_options=options, **kwargs) as mgr:
        for step in (1, 2, 3):
            path = mgr.save(step, model=model(step), metrics={"loss": 1.0 / step})
            assert path == os.path.join(local, f"step_{step:08d}")   # save returns with the local commit
        mgr.wait()                                                   # ... wait() once it is persistent
        assert mgr.all_steps() == [1, 2, 3]


def test_save_uploads_in_the_background_and_restore_reads_only_the_local_tier(tiers, proxy):
    url, local, options = tiers
    _save_three(url, local, options)
    assert steps_in(url, options) == [1, 2, 3]
    assert local_steps(local) == [3]                                 # local_max_to_keep=1
    since = len(proxy.requests)
    with CheckpointManager(url, local_dir=local, storage_options=options) as mgr:
        net = model()
        got = mgr.restore(model=net)
        assert got.step == 3 and got.path == os.path.join(local, "step_00000003") and weight(net) == 3.0
        assert data_gets(proxy, since) == []                         # no data file came from S3
        older = mgr.restore(2, model=net)                            # not on this node any more
        assert older.path == f"{url}/step_00000002" and weight(net) == 2.0
        assert data_gets(proxy, since)                               # ... so it came from S3


def test_a_wiped_local_tier_restores_from_the_persistent_tier(tiers, proxy):
    url, local, options = tiers
    _save_three(url, local, options)
    shutil.rmtree(local)                                             # a replaced node
    since = len(proxy.requests)
    with CheckpointManager(url, local_dir=local, storage_options=options) as mgr:
        net = model()
        got = mgr.restore(model=net)
    assert got.step == 3 and got.path == f"{url}/step_00000003" and weight(net) == 3.0
    assert any(p.endswith("/model.safetensors") and "/step_00000003/" in p for p in data_gets(proxy, since))


def test_a_damaged_local_file_falls_back_to_the_persistent_copy_of_the_same_step(tiers, proxy, caplog):
    url, local, options = tiers
    _save_three(url, local, options)
    flip_byte(os.path.join(local, "step_00000003", "model.safetensors"), 200)
    since = len(proxy.requests)
    with caplog.at_level(logging.WARNING), CheckpointManager(url, local_dir=local, storage_options=options) as mgr:
        net = model()
        got = mgr.restore(model=net)
    assert got.step == 3 and weight(net) == 3.0                      # the same step, not step 2
    assert got.path == f"{url}/step_00000003"
    assert "local copy of step 3 is damaged" in caplog.text
    assert data_gets(proxy, since)


def test_an_upload_error_surfaces_like_an_async_error_and_the_only_copy_is_kept_until_uploaded(
        tiers, monkeypatch):
    url, local, options = tiers
    monkeypatch.setattr(faults, "_hits", {})
    monkeypatch.setenv("CKPTMGR_FAULT_POINT", "upload.start")
    monkeypatch.setenv("CKPTMGR_FAULT_ACTION", "raise")
    mgr = CheckpointManager(url, local_dir=local, local_max_to_keep=0, storage_options=options)
    mgr.save(1, model=model(1))                                      # committed locally; its upload fails
    with pytest.raises(faults.InjectedFault):
        mgr.wait()
    assert mgr.all_steps() == [1] and steps_in(url, options) == []   # restorable, from the local tier only
    assert local_steps(local) == [1]                                 # local_max_to_keep=0 never drops it
    mgr.close()
    monkeypatch.delenv("CKPTMGR_FAULT_POINT")
    with CheckpointManager(url, local_dir=local, local_max_to_keep=0, storage_options=options) as mgr:
        assert mgr.all_steps() == [1]
        net = model()
        assert mgr.restore(model=net).step == 1 and weight(net) == 1.0
    assert steps_in(url, options) == [1]                             # the next manager uploaded it
    assert local_steps(local) == []                                  # ... and only then dropped the local copy


def test_a_failed_upload_is_retried_with_the_next_save(tiers, monkeypatch):
    url, local, options = tiers
    monkeypatch.setattr(faults, "_hits", {})
    monkeypatch.setenv("CKPTMGR_FAULT_POINT", "upload.start")
    monkeypatch.setenv("CKPTMGR_FAULT_ACTION", "raise")
    with CheckpointManager(url, local_dir=local, storage_options=options) as mgr:
        mgr.save(1, model=model(1))
        with pytest.raises(faults.InjectedFault):
            mgr.save(2, model=model(2))                              # raised once step 2 is committed locally
        mgr.wait()
        assert steps_in(url, options) == [1, 2]
    assert local_steps(local) == [2]


def test_async_tiered_saves_and_retention_per_tier(tiers):
    url, local, options = tiers
    with CheckpointManager(url, max_to_keep=2, local_dir=local, local_max_to_keep=2, async_save=True,
                           storage_options=options) as mgr:
        net = model()
        for step in range(1, 6):
            with torch.no_grad():
                net[0].weight.fill_(step)
            mgr.save(step, model=net)
        mgr.wait()
        assert mgr.all_steps() == [4, 5]
    assert steps_in(url, options) == [4, 5] and local_steps(local) == [4, 5]
    with CheckpointManager(url, local_dir=local, storage_options=options) as mgr:
        assert mgr.restore(model=net).step == 5 and weight(net) == 5.0


def test_force_replaces_the_step_in_both_tiers(tiers):
    url, local, options = tiers
    with CheckpointManager(url, local_dir=local, storage_options=options) as mgr:
        mgr.save(1, model=model(1))
        mgr.wait()
        with pytest.raises(CheckpointExistsError):
            mgr.save(1, model=model(2))
        mgr.save(1, model=model(2), force=True)
        mgr.wait()
    net = model()
    assert CheckpointManager(url, storage_options=options).restore(model=net).step == 1 and weight(net) == 2.0
    shutil.rmtree(local)
    with CheckpointManager(url, local_dir=local, storage_options=options) as mgr:
        assert mgr.restore(model=net).path == f"{url}/step_00000001" and weight(net) == 2.0


def test_ls_shows_where_each_step_is(tiers, capsys, monkeypatch):
    url, local, options = tiers
    with CheckpointManager(url, max_to_keep=None, local_dir=local, storage_options=options) as mgr:
        mgr.save(1, model=model(1))
        mgr.save(2, model=model(2))
        mgr.wait()
        monkeypatch.setattr(faults, "_hits", {})
        monkeypatch.setenv("CKPTMGR_FAULT_POINT", "upload.start")
        monkeypatch.setenv("CKPTMGR_FAULT_ACTION", "raise")
        mgr.save(3, model=model(3))
        with pytest.raises(faults.InjectedFault):
            mgr.wait()
        monkeypatch.delenv("CKPTMGR_FAULT_POINT")
        monkeypatch.setenv("AWS_ENDPOINT_URL", options["endpoint_url"])
        capsys.readouterr()
        assert cli.main(["ls", url, "--local-dir", local]) == 0
        out = capsys.readouterr().out
        rows = {line.split()[0]: line for line in out.splitlines()[2:]}
        assert rows["1"].rstrip().endswith("persistent") and rows["2"].rstrip().endswith("both")
        assert rows["3"].rstrip().endswith("local")
        assert cli.main(["ls", url, "--local-dir", local, "--json"]) == 0
        import json
        where = {c["step"]: c["where"] for c in json.loads(capsys.readouterr().out)["checkpoints"]}
        assert where == {1: "persistent", 2: "both", 3: "local"}


def test_a_local_tier_belongs_to_one_persistent_directory(tiers, s3):
    url, local, options = tiers
    with CheckpointManager(url, local_dir=local, storage_options=options) as mgr:
        mgr.save(1, model=model(1))
    with pytest.raises(DirectoryInUseError, match="local tier of"):
        CheckpointManager(f"{s3}/other", local_dir=local, storage_options=options)


def test_bad_local_dir_arguments(tiers, s3):
    url, local, options = tiers
    with pytest.raises(ValueError, match="own disk"):
        CheckpointManager(url, local_dir=f"{s3}/local", storage_options=options)
    with pytest.raises(ValueError, match="differ"):
        CheckpointManager(local, local_dir=local)
    with pytest.raises(ValueError, match="local_max_to_keep"):
        CheckpointManager(url, local_dir=local, local_max_to_keep=-1, storage_options=options)
    assert ckptmgr.resume_from_latest(url, model=model(), local_dir=local, storage_options=options) == 0


def test_a_sharded_step_goes_through_both_tiers(tmp_path):
    persistent, local = str(tmp_path / "persistent"), str(tmp_path / "local")
    torch.manual_seed(0)
    net = nn.Linear(4, 4)
    opt = torch.optim.Adam(net.parameters())
    net(torch.ones(1, 4)).sum().backward()
    opt.step()
    with CheckpointManager(persistent, local_dir=local, sharded=True) as mgr:
        mgr.save(1, model=net, optimizer=opt)
    names = ["__0_0.distcp", "dcp.metadata", "manifest.json", "meta.json", "rng-rank00000.safetensors"]
    assert sorted(os.listdir(os.path.join(local, "step_00000001"))) == names
    assert sorted(os.listdir(os.path.join(persistent, "step_00000001"))) == names
    for where in ("local", "persistent"):
        if where == "persistent":
            shutil.rmtree(local)
        fresh = nn.Linear(4, 4)
        fresh_opt = torch.optim.Adam(fresh.parameters())
        with CheckpointManager(persistent, local_dir=local, sharded=True) as mgr:
            got = mgr.restore(model=fresh, optimizer=fresh_opt)
        assert got.path == os.path.join(local if where == "local" else persistent, "step_00000001")
        assert torch.equal(fresh.weight, net.weight)
        assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_with_the_object_store_unreachable_a_job_restores_from_the_local_tiers(tiers):
    url, local, options = tiers
    _save_three(url, local, options)
    from tests.support.multiproc import free_port
    dead = {"endpoint_url": f"http://127.0.0.1:{free_port()}", "key": "testing", "secret": "testing",
            "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}, "connect_timeout": 1}}
    mgr = CheckpointManager(url, local_dir=local, storage_options=dead)
    net = model()
    got = mgr.restore(model=net)
    assert got.step == 3 and got.path == os.path.join(local, "step_00000003") and weight(net) == 3.0
    with pytest.raises(ckptmgr.StorageError, match="listing"):   # the upload owed (as it seems) fails, typed
        mgr.close()
