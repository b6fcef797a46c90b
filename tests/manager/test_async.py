"""Async saves: staging, back-pressure, errors that surface later, clean shutdown."""
import threading
import time

import pytest
import torch

from ckptmgr import CheckpointManager, StorageError
from ckptmgr.step.formats import PlainFormat
from tests.conftest import ConvNet


def _writer_threads():
    return [t for t in threading.enumerate() if t.name.startswith("ckptmgr-writer")]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_async_round_trip_sees_the_state_at_save_time(ckpt_dir, convnet):
    opt = torch.optim.AdamW(convnet.parameters(), lr=0.1)
    convnet(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    before = _state(convnet)
    moments = opt.state_dict()["state"][0]["exp_avg"].clone()
    with CheckpointManager(ckpt_dir, async_save=True) as mgr:
        mgr.save(1, model=convnet, optimizer=opt, extra={"epoch": 4})
        # the loop carries on at once and changes everything in place
        with torch.no_grad():
            for p in convnet.parameters():
                p.add_(100.0)
        convnet(torch.randn(2, 3, 8, 8)).sum().backward()
        opt.step()
        mgr.wait()
        assert mgr.latest_step() == 1
    fresh = ConvNet()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    restored = CheckpointManager(ckpt_dir).restore(model=fresh, optimizer=fresh_opt)
    assert restored.step == 1 and restored.extra["epoch"] == 4
    for key, value in before.items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], moments)


def test_staging_buffers_are_reused(ckpt_dir, convnet):
    with CheckpointManager(ckpt_dir, async_save=True, max_to_keep=2) as mgr:
        mgr.save(1, model=convnet)
        mgr.wait()
        first = {name: buf.data_ptr() for name, buf in mgr._staging._buffers.items()}
        size = mgr._staging.nbytes
        for step in range(2, 6):
            mgr.save(step, model=convnet)
        mgr.wait()
        assert {name: buf.data_ptr() for name, buf in mgr._staging._buffers.items()} == first
        assert mgr._staging.nbytes == size > 0
        assert mgr.all_steps() == [4, 5]


def test_background_error_surfaces_on_next_save_wait_and_close(ckpt_dir, convnet, monkeypatch):
    mgr = CheckpointManager(ckpt_dir, async_save=True)
    mgr.save(1, model=convnet)
    mgr.wait()

    def disk_full(*args, **kwargs):
        raise StorageError("writing failed: out of space")
    monkeypatch.setattr(PlainFormat, "write", disk_full)
    mgr.save(2, model=convnet)          # returns: the failure happens in the background
    with pytest.raises(StorageError, match="out of space"):
        mgr.save(3, model=convnet)      # ...and is raised here, not lost
    assert mgr.all_steps() == [1]       # nothing partial was committed
    mgr.save(4, model=convnet)          # the manager stays usable (4 is queued, fails in the background)
    with pytest.raises(StorageError):
        mgr.wait()
    mgr.save(5, model=convnet)
    with pytest.raises(StorageError):
        mgr.close()
    assert not _writer_threads()
    monkeypatch.undo()
    assert CheckpointManager(ckpt_dir).all_steps() == [1]


def test_second_save_waits_for_the_first(ckpt_dir, convnet, monkeypatch):
    real = PlainFormat.write
    release = threading.Event()
    finished = []

    def slow(*args, **kwargs):
        release.wait(10)
        result = real(*args, **kwargs)
        finished.append(time.monotonic())
        return result
    monkeypatch.setattr(PlainFormat, "write", slow)
    with CheckpointManager(ckpt_dir, async_save=True) as mgr:
        mgr.save(1, model=convnet)           # returns while the writer is blocked
        threading.Timer(0.3, release.set).start()
        start = time.monotonic()
        mgr.save(2, model=convnet)           # must wait for save 1 to be written
        returned = time.monotonic()
        assert finished and finished[0] <= returned and returned - start >= 0.25
    assert CheckpointManager(ckpt_dir).all_steps() == [1, 2]


def test_close_leaves_no_thread_and_collect_errors_are_immediate(ckpt_dir, convnet):
    mgr = CheckpointManager(ckpt_dir, async_save=True)
    with pytest.raises(TypeError):
        mgr.save(1, model=convnet, extra={"cfg": object()})   # single process: raised at once
    mgr.save(2, model=convnet)
    mgr.close()
    assert not _writer_threads()
    assert CheckpointManager(ckpt_dir).all_steps() == [2]


def test_restore_waits_for_a_pending_save(ckpt_dir, convnet):
    mgr = CheckpointManager(ckpt_dir, async_save=True)
    mgr.save(7, model=convnet)
    restored = mgr.restore(model=ConvNet())   # sees step 7 even though save() returned before committing
    assert restored.step == 7
    mgr.close()

