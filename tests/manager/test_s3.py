"""CheckpointManager on S3 (a real moto server over HTTP): commit order, retention, force, loading."""
import json

import pytest
import s3fs
import torch

import ckptmgr
from ckptmgr import CheckpointExistsError, CheckpointManager, ChecksumError, StorageError
from tests.conftest import ConvNet
from tests.manager.helpers import assert_same, filled


def _fs():
    return s3fs.S3FileSystem(skip_instance_cache=True)


def _names(url):
    fs = _fs()
    names = (p.rsplit("/", 1)[-1] for p in fs.ls(url.replace("s3://", ""), detail=False))
    return sorted(n for n in names if not n.startswith(".ckptmgr"))  # the manager's lease object aside


def test_save_restore_and_retention_on_s3(s3, convnet):
    run = f"{s3}/runs/a"
    fs = _fs()
    fs.pipe(f"{run[5:]}/notes.txt", b"foreign")
    fs.pipe(f"{run[5:]}/logs/events.txt", b"foreign too")
    opt = torch.optim.AdamW(convnet.parameters(), lr=1e-3)
    convnet(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    mgr = CheckpointManager(run, max_to_keep=3)
    for step in range(1, 11):
        mgr.save(step, model=convnet, optimizer=opt, metrics={"loss": 1.0 / step})
    assert mgr.all_steps() == [8, 9, 10]
    assert _names(run) == ["logs", "notes.txt", "step_00000008", "step_00000009", "step_00000010"]
    assert fs.cat(f"{run[5:]}/logs/events.txt") == b"foreign too"
    fresh = ConvNet()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    restored = CheckpointManager(run).restore(model=fresh, optimizer=fresh_opt)
    assert restored.step == 10 and restored.path == f"{run}/step_00000010" and restored.metrics == {"loss": 0.1}
    assert_same(convnet.state_dict(), fresh.state_dict())
    assert_same(opt.state_dict(), fresh_opt.state_dict())


def test_keep_every_and_best_on_s3(s3, convnet):
    mgr = CheckpointManager(f"{s3}/b", max_to_keep=1, keep_every_n_steps=3, best_metric="loss", keep_best=1)
    for step, loss in enumerate([0.9, 0.2, 0.8, 0.7, 0.6, 0.5, 0.4], start=1):
        mgr.save(step, model=convnet, metrics={"loss": loss})
    assert mgr.all_steps() == [2, 3, 6, 7] and mgr.best_step() == 2


def test_force_on_s3_switches_atomically_and_drops_old_objects(s3, convnet):
    run = f"{s3}/c"
    mgr = CheckpointManager(run)
    mgr.save(1, model=filled(convnet, 1.0))
    with pytest.raises(CheckpointExistsError):
        mgr.save(1, model=filled(convnet, 2.0))
    mgr.save(1, model=filled(convnet, 3.0), force=True)
    fs = _fs()
    files = sorted(p.split("step_00000001/", 1)[1] for p in fs.find(f"{run[5:]}/step_00000001"))
    assert "manifest.json" in files and len(files) == 4           # manifest + model, meta, rng of the new revision
    assert all(f == "manifest.json" or f.startswith("rev-") for f in files)
    fresh = ConvNet()
    mgr.restore(model=fresh)
    assert float(fresh.conv.weight.detach().flatten()[0]) == 3.0
    mgr.save(1, model=filled(convnet, 4.0), force=True)             # a second forced revision
    mgr.restore(model=fresh)
    assert float(fresh.conv.weight.detach().flatten()[0]) == 4.0
    assert len(fs.find(f"{run[5:]}/step_00000001")) == 4


def test_uncommitted_uploads_are_invisible_and_cleaned(s3, convnet):
    run = f"{s3}/d"
    mgr = CheckpointManager(run)
    mgr.save(1, model=convnet)
    fs = _fs()
    # a save that died after uploading data objects but before the manifest
    fs.pipe(f"{run[5:]}/step_00000002/model.safetensors", b"partial")
    fs.pipe(f"{run[5:]}/step_00000003/rng-rank00000.safetensors", b"partial")
    assert mgr.all_steps() == [1] and mgr.latest_step() == 1
    mgr.close()
    mgr = CheckpointManager(run)  # the restarted job's first save removes them
    mgr.save(3, model=convnet)
    assert mgr.all_steps() == [1, 3] and _names(run) == ["step_00000001", "step_00000003"]


def test_corrupt_object_falls_back_on_s3(s3, convnet):
    run = f"{s3}/e"
    mgr = CheckpointManager(run)
    mgr.save(1, model=filled(ConvNet(), 1.0))
    mgr.save(2, model=convnet)
    fs = _fs()
    model_file = json.loads(fs.cat(f"{run[5:]}/step_00000002/manifest.json"))["components"]["model"]
    key = f"{run[5:]}/step_00000002/{model_file}"     # under the save's own rev-<id>/ prefix on S3
    data = bytearray(fs.cat(key))
    data[-1] ^= 0x01
    fs.pipe(key, bytes(data))
    with pytest.raises(ChecksumError):
        mgr.restore(2, model=ConvNet())
    fresh = ConvNet()
    assert mgr.restore(model=fresh).step == 1 and float(fresh.conv.weight.detach().flatten()[0]) == 1.0
    assert ckptmgr.load_checkpoint(fresh, run)["step"] == 1


def test_load_checkpoint_from_s3_manager_directories(s3, convnet):
    run = f"{s3}/f"
    mgr = CheckpointManager(run)
    mgr.save(100, model=filled(ConvNet(), 1.0))
    mgr.save(200, model=convnet)
    fresh = ConvNet()
    assert ckptmgr.load_checkpoint(fresh, run, strict=True)["step"] == 200
    assert_same(convnet.state_dict(), fresh.state_dict())
    assert ckptmgr.load_checkpoint(fresh, f"{run}/step_00000100/", strict=True)["step"] == 100
    assert ckptmgr.resume_from_latest(run, model=fresh) == 201


def test_a_missing_bucket_is_named_not_blamed_on_retries(s3, convnet):
    missing = "s3://ckpt-no-such-bucket-" + s3.rsplit("-", 1)[-1] + "/run"
    with pytest.raises(StorageError) as info:
        CheckpointManager(missing).save(1, model=convnet)
    text = str(info.value)
    assert "bucket does not exist" in text and "retries" not in text


def test_close_releases_the_lease_so_a_restart_takes_over_quietly(s3, convnet, caplog):
    import json
    import subprocess
    import sys

    from ckptmgr import DirectoryInUseError
    from ckptmgr.step.ownership import OWNER_NAME
    fs = s3fs.S3FileSystem()
    run = f"{s3}/lease"
    with caplog.at_level("INFO", logger="ckptmgr.step.ownership"):
        with CheckpointManager(run) as first:
            first.save(1, model=convnet)
            assert fs.exists(f"{run}/{OWNER_NAME}")
        assert not fs.exists(f"{run}/{OWNER_NAME}")              # close() gave it up
        with CheckpointManager(run) as restarted:
            restarted.save(2, model=convnet)
        assert not [r for r in caplog.records if "taking over" in r.getMessage()]
        # a lease left by a process of this host that is gone (killed, preempted): taken over at INFO
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
        import socket
        fs.pipe(f"{run}/{OWNER_NAME}", json.dumps({"token": "x", "host": socket.gethostname(),
                                                   "pid": int(dead.stdout), "time": 0}).encode())
        with CheckpointManager(run) as after_crash:
            after_crash.save(3, model=convnet)
        quiet = [r for r in caplog.records if "taking over" in r.getMessage()]
        assert quiet and all(r.levelname == "INFO" for r in quiet)
        caplog.clear()
        live = CheckpointManager(run)                              # a job that still runs...
        live.save(4, model=convnet)
        with CheckpointManager(run) as newer:                      # ...and a second one on the same directory
            newer.save(5, model=convnet)
            assert [r.levelname for r in caplog.records if "taking over" in r.getMessage()] == ["WARNING"]
            with pytest.raises(DirectoryInUseError):
                live.save(6, model=convnet)
            live.close()
            assert fs.exists(f"{run}/{OWNER_NAME}")                # the older job never deletes a lease not its own
