"""CheckpointManager on local disk: commit, listing, force, leftovers, retention, errors, loading."""
import errno
import os
import shutil

import pytest
import torch

import ckptmgr
from ckptmgr import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointManager,
    CheckpointNotFoundError,
    UnserializableStateError,
)
from ckptmgr.format.manifest import FileEntry, Manifest
from ckptmgr.io.local import LocalStore
from tests.conftest import ConvNet
from tests.manager.helpers import assert_same, entries, filled, tmp_names


def _weights_value(model):
    return float(next(model.parameters()).detach().flatten()[0])


def test_latest_all_and_empty_directory(ckpt_dir, convnet):
    mgr = CheckpointManager(ckpt_dir)
    assert mgr.all_steps() == [] and mgr.latest_step() is None and mgr.best_step() is None
    assert mgr.restore(model=convnet) is None
    for step in (5, 20, 10):
        mgr.save(step, model=convnet)
    assert mgr.all_steps() == [5, 10, 20] and mgr.latest_step() == 20
    assert CheckpointManager(ckpt_dir).all_steps() == [5, 10, 20]   # a fresh manager sees the same


def test_only_committed_and_well_named_steps_are_listed(ckpt_dir, convnet):
    mgr = CheckpointManager(ckpt_dir)
    mgr.save(1, model=convnet)
    mgr.save(2, model=convnet)
    os.makedirs(os.path.join(ckpt_dir, "step_00000003"))                       # never committed
    shutil.copytree(os.path.join(ckpt_dir, "step_00000002"), os.path.join(ckpt_dir, "step_000000004"))
    shutil.copytree(os.path.join(ckpt_dir, "step_00000002"), os.path.join(ckpt_dir, "step_00000005"))
    with open(os.path.join(ckpt_dir, "step_00000006"), "w") as fh:             # a file, not a directory
        fh.write("x")
    assert CheckpointManager(ckpt_dir).all_steps() == [1, 2]  # 5's manifest says step 2: not trusted


def test_saving_a_committed_step_needs_force(ckpt_dir, convnet):
    mgr = CheckpointManager(ckpt_dir)
    mgr.save(1, model=filled(convnet, 1.0))
    with pytest.raises(CheckpointExistsError, match="force=True"):
        mgr.save(1, model=filled(convnet, 2.0))
    fresh = ConvNet()
    mgr.restore(model=fresh)
    assert _weights_value(fresh) == 1.0
    mgr.save(1, model=filled(convnet, 3.0), force=True)
    mgr.restore(model=fresh)
    assert _weights_value(fresh) == 3.0
    assert tmp_names(ckpt_dir) == [] and entries(ckpt_dir) == ["step_00000001"]


def test_force_without_atomic_exchange_and_recovery(ckpt_dir, convnet, monkeypatch):
    mgr = CheckpointManager(ckpt_dir)
    mgr.save(1, model=filled(convnet, 1.0))
    # A kernel or filesystem without renameat2(RENAME_EXCHANGE): two renames instead.
    monkeypatch.setattr(LocalStore, "exchange_dirs", lambda self, a, b: False)
    mgr.save(1, model=filled(convnet, 2.0), force=True)
    fresh = ConvNet()
    mgr.restore(model=fresh)
    assert _weights_value(fresh) == 2.0 and tmp_names(ckpt_dir) == []
    # A crash between the two renames leaves the old copy under .old-<name>-<uuid>: the restarted
    # job's first save puts it back (roll back to the committed old version).
    old = os.path.join(ckpt_dir, ".old-step_00000001-" + "a" * 32)
    os.rename(os.path.join(ckpt_dir, "step_00000001"), old)
    mgr.close()
    mgr = CheckpointManager(ckpt_dir)
    assert mgr.all_steps() == []
    mgr.save(2, model=filled(convnet, 5.0))
    assert mgr.all_steps() == [1, 2] and tmp_names(ckpt_dir) == []
    mgr.restore(1, model=fresh)
    assert _weights_value(fresh) == 2.0


def test_leftovers_of_crashed_saves_are_cleaned_and_nothing_else(ckpt_dir, convnet):
    with CheckpointManager(ckpt_dir) as first_job:
        first_job.save(1, model=convnet)
    ours = [".tmp-step_00000002-" + "0123456789abcdef" * 2, ".tmp-step_00000001-" + "f" * 32]
    foreign_dirs = [".tmp-step_2", ".tmp-step_00000002-xyz", "step_2", "tmp", ".tmp-step_00000002-" + "A" * 32,
                    "step_00000009.bak"]
    foreign_files = ["notes.txt", ".tmp-step_00000003-" + "1" * 32 + ".txt", "step_00000001.json"]
    for name in ours + foreign_dirs:
        os.makedirs(os.path.join(ckpt_dir, name, "sub"))
    for name in foreign_files:
        with open(os.path.join(ckpt_dir, name), "w") as fh:
            fh.write("keep me")
    mgr = CheckpointManager(ckpt_dir)  # the restarted job's first save tidies up
    mgr.save(2, model=convnet)
    left = set(entries(ckpt_dir))
    assert not left & set(ours)
    assert left == set(foreign_dirs) | set(foreign_files) | {"step_00000001", "step_00000002"}


def test_only_the_first_save_lists_the_directory(ckpt_dir, convnet, monkeypatch):
    mgr = CheckpointManager(ckpt_dir, max_to_keep=2)
    listings = []
    real = LocalStore.listdir
    monkeypatch.setattr(LocalStore, "listdir", lambda self, name="": listings.append(name) or real(self, name))
    mgr.save(1, model=convnet)
    first = len(listings)  # the claim and the leftover cleanup list the directory once each
    assert 1 <= first <= 2
    for step in range(2, 6):
        mgr.save(step, model=convnet)
        assert len(listings) == first  # later saves know the directory from the index: no listing, whatever it holds
    assert mgr.all_steps() == [4, 5] and len(listings) == first + 1
    mgr.close()
    assert entries(ckpt_dir) == ["step_00000004", "step_00000005"]


def test_a_delete_that_failed_is_cleaned_up_by_the_next_save(ckpt_dir, convnet, monkeypatch, caplog):
    """Later saves do not list the directory, unless a removal failed: then the next one lists and cleans."""
    mgr = CheckpointManager(ckpt_dir, max_to_keep=1)
    mgr.save(1, model=convnet)
    real = LocalStore.remove
    failed = []

    def remove_once_failing(self, name="", recursive=False):
        if recursive and name.startswith(".tmp-step_00000001") and not failed:
            failed.append(name)
            raise OSError(errno.EIO, "injected failure")
        return real(self, name, recursive)
    monkeypatch.setattr(LocalStore, "remove", remove_once_failing)
    mgr.save(2, model=convnet)   # retention drops step 1; freeing its space fails
    mgr._reclaimer.wait()        # the background delete has run (and failed)
    assert failed and os.path.isdir(os.path.join(ckpt_dir, failed[0])) and "could not free" in caplog.text
    mgr.save(3, model=convnet)   # lists again and removes the leftover
    mgr.close()
    assert entries(ckpt_dir) == ["step_00000003"]


def test_max_to_keep_three_over_ten_saves_keeps_foreign_files(ckpt_dir, convnet):
    os.makedirs(os.path.join(ckpt_dir, "logs"))
    with open(os.path.join(ckpt_dir, "notes.txt"), "w") as fh:
        fh.write("mine")
    mgr = CheckpointManager(ckpt_dir, max_to_keep=3)
    for step in range(1, 11):
        mgr.save(step, model=convnet)
    assert mgr.all_steps() == [8, 9, 10]
    mgr.close()  # dropped steps leave listings at once; their space is freed in the background
    assert entries(ckpt_dir) == ["logs", "notes.txt", "step_00000008", "step_00000009", "step_00000010"]


def test_keep_every_and_keep_best_combine(ckpt_dir, convnet):
    mgr = CheckpointManager(ckpt_dir, max_to_keep=2, keep_every_n_steps=4, best_metric="acc", best_mode="max",
                            keep_best=1)
    accs = {1: 0.1, 2: 0.2, 3: 0.9, 4: 0.3, 5: 0.4, 6: 0.5, 7: None, 8: 0.6, 9: 0.7, 10: 0.8}
    for step, acc in accs.items():
        mgr.save(step, model=convnet, metrics={} if acc is None else {"acc": acc})
    assert mgr.all_steps() == [3, 4, 8, 9, 10]      # best (3), every 4th (4, 8), newest two (9, 10)
    assert mgr.best_step() == 3
    assert CheckpointManager(ckpt_dir, best_metric="acc", best_mode="min").best_step() == 4


def test_a_lower_step_just_saved_is_never_deleted(ckpt_dir, convnet):
    mgr = CheckpointManager(ckpt_dir, max_to_keep=2)
    for step in (1, 2, 3, 4, 5):
        mgr.save(step, model=convnet)
    mgr.save(2, model=convnet)
    assert mgr.all_steps() == [2, 4, 5]
    mgr.save(6, model=convnet)
    assert mgr.all_steps() == [5, 6]


def test_listing_reads_each_manifest_once_per_manager(ckpt_dir, convnet):
    os.makedirs(ckpt_dir)
    for step in range(1000):   # 1000 committed (data-less) checkpoints
        path = os.path.join(ckpt_dir, f"step_{step:08d}")
        os.makedirs(path)
        with open(os.path.join(path, "manifest.json"), "wb") as fh:
            fh.write(Manifest(step=step, files={}, components={}, metrics={"loss": step}).to_bytes())
    mgr = CheckpointManager(ckpt_dir, max_to_keep=None, best_metric="loss", keep_best=3)
    for step in range(1000, 1005):
        mgr.save(step, model=convnet, metrics={"loss": step})
        assert mgr.index.manifest_reads == 1000
    assert mgr.latest_step() == 1004 and mgr.best_step() == 0 and len(mgr.all_steps()) == 1005
    assert mgr.index.manifest_reads == 1000
    mgr.close()  # one writer per directory: the second manager saves once the first is closed
    mgr2 = CheckpointManager(ckpt_dir, max_to_keep=5)
    mgr2.save(1005, model=convnet)
    assert mgr2.all_steps() == [1001, 1002, 1003, 1004, 1005] and mgr2.index.manifest_reads == 1005


def test_failed_save_commits_nothing_and_leaves_no_temp(ckpt_dir, convnet):
    mgr = CheckpointManager(ckpt_dir)
    mgr.save(1, model=convnet)

    class Exploding:
        def state_dict(self):
            raise RuntimeError("boom in state_dict")

        def load_state_dict(self, state):
            pass
    with pytest.raises(RuntimeError, match="boom"):
        mgr.save(2, model=convnet, extra={"x": Exploding()})
    with pytest.raises(UnserializableStateError, match="extra.fn"):
        mgr.save(2, model=convnet, extra={"fn": print})
    with pytest.raises(UnserializableStateError):
        mgr.save(2, model=convnet, extra={"t": torch.zeros(2, layout=torch.sparse_coo)})   # fails mid-write
    assert mgr.all_steps() == [1] and tmp_names(ckpt_dir) == [] and entries(ckpt_dir) == ["step_00000001"]


def test_write_failure_after_some_files_leaves_nothing(ckpt_dir, convnet, monkeypatch):
    from ckptmgr.step import format_base as formats
    real = formats.write_component
    calls = []

    def flaky(dir_uri, base, obj, *args, **kwargs):
        calls.append(base)
        if base == "meta":
            raise OSError(28, "No space left on device")
        return real(dir_uri, base, obj, *args, **kwargs)
    monkeypatch.setattr(formats, "write_component", flaky)
    mgr = CheckpointManager(ckpt_dir)
    with pytest.raises(OSError, match="No space"):
        mgr.save(1, model=convnet, extra={"epoch": 1})
    assert "extra" in calls and mgr.all_steps() == [] and entries(ckpt_dir) == []


def test_restore_explicit_steps(ckpt_dir, convnet):
    mgr = CheckpointManager(ckpt_dir)
    mgr.save(1, model=filled(convnet, 1.0))
    mgr.save(2, model=filled(convnet, 2.0))
    fresh = ConvNet()
    assert mgr.restore(1, model=fresh).step == 1 and _weights_value(fresh) == 1.0
    with pytest.raises(CheckpointNotFoundError, match="step 3"):
        mgr.restore(3, model=fresh)


def test_resume_from_latest(ckpt_dir, convnet):
    assert ckptmgr.resume_from_latest(ckpt_dir, model=convnet) == 0
    opt = torch.optim.SGD(convnet.parameters(), lr=0.1, momentum=0.9)
    CheckpointManager(ckpt_dir).save(41, model=convnet, optimizer=opt, extra={"epoch": 2})
    fresh = ConvNet()
    assert ckptmgr.resume_from_latest(ckpt_dir, model=fresh, optimizer=torch.optim.SGD(fresh.parameters(), lr=1),
                                      verify=False) == 42
    assert_same(convnet.state_dict(), fresh.state_dict())


def test_load_checkpoint_reads_manager_directories(ckpt_dir, convnet):
    mgr = CheckpointManager(ckpt_dir)
    mgr.save(100, model=filled(ConvNet(), 1.0), meta={"who": "me"})
    mgr.save(200, model=convnet, metrics={"loss": 0.5})
    fresh = ConvNet()
    ckpt = ckptmgr.load_checkpoint(fresh, ckpt_dir, strict=True)
    assert ckpt["step"] == 200 and ckpt["metrics"] == {"loss": 0.5}
    assert_same(convnet.state_dict(), fresh.state_dict())
    ckpt = ckptmgr.load_checkpoint(fresh, os.path.join(ckpt_dir, "step_00000100"), strict=True)
    assert ckpt["step"] == 100 and ckpt["meta"]["user"] == {"who": "me"} and _weights_value(fresh) == 1.0
    assert ckptmgr.load_checkpoint(fresh, "file://" + ckpt_dir + "/")["step"] == 200
    backbone = ckptmgr.load_checkpoint_with_prefix("bn", ckpt_dir)
    assert_same(backbone["running_mean"], convnet.bn.running_mean)


def test_load_checkpoint_errors_for_directories(tmp_path, convnet):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointNotFoundError, match="no committed checkpoint"):
        ckptmgr.load_checkpoint(convnet, str(empty))
    (tmp_path / "step_00000001").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="never committed"):
        ckptmgr.load_checkpoint(convnet, str(tmp_path / "step_00000001"))


def test_context_manager_closes(ckpt_dir, convnet):
    with CheckpointManager(ckpt_dir) as mgr:
        mgr.save(1, model=convnet)
        assert mgr.latest_step() == 1   # a sync save is committed when it returns
    with pytest.raises(CheckpointError, match="closed"):
        mgr.save(2, model=convnet)
    mgr.close()  # closing twice is harmless


@pytest.mark.parametrize("step,exc", [(-1, ValueError), (1.5, TypeError), (True, TypeError), ("3", TypeError)])
def test_bad_steps(ckpt_dir, convnet, step, exc):
    with pytest.raises(exc):
        CheckpointManager(ckpt_dir).save(step, model=convnet)


def test_bad_arguments(ckpt_dir, convnet):
    with pytest.raises(ValueError):
        CheckpointManager(ckpt_dir, max_to_keep=0)
    with pytest.raises(ValueError):
        CheckpointManager(ckpt_dir, keep_best=1)
    mgr = CheckpointManager(ckpt_dir)
    with pytest.raises(TypeError):
        mgr.save(1, model={"w": torch.zeros(1)})
    with pytest.raises(TypeError):
        mgr.save(1, model=convnet, optimizer=[torch.optim.SGD(convnet.parameters(), lr=1)])
    with pytest.raises(TypeError):
        mgr.save(1, model=convnet, metrics={"loss": [1, 2]})
    with pytest.raises(TypeError):
        mgr.save(1, model=convnet, meta="not a dict")
    assert mgr.all_steps() == []


def test_manifest_format_is_self_checked():
    manifest = Manifest(step=3, files={"a.json": FileEntry(2, "0" * 64)}, components={"extra": "a.json"},
                        metrics={"loss": 1.5})
    data = manifest.to_bytes()
    assert Manifest.from_bytes(data) == manifest
    with pytest.raises(ckptmgr.ChecksumError):
        Manifest.from_bytes(data.replace(b"1.5", b"1.6"))
    bad = Manifest(step=3, files={"../x": FileEntry(1, "0" * 64)}, components={})
    with pytest.raises(ckptmgr.CorruptCheckpointError, match="invalid file entry"):
        Manifest.from_bytes(bad.to_bytes())
    newer = Manifest(step=3, files={}, components={}, format_version=99)
    with pytest.raises(ckptmgr.CheckpointFormatError, match="upgrade"):
        Manifest.from_bytes(newer.to_bytes())


def test_other_fsspec_filesystems_work_too(convnet):
    import fsspec
    url = "memory://ckptmgr-test-run"
    mgr = CheckpointManager(url, max_to_keep=2)
    for step in (1, 2, 3):
        mgr.save(step, model=filled(convnet, float(step)))
    assert mgr.all_steps() == [2, 3]
    fresh = ConvNet()
    assert mgr.restore(model=fresh).step == 3 and _weights_value(fresh) == 3.0
    assert ckptmgr.load_checkpoint(fresh, url + "/step_00000002")["step"] == 2
    fsspec.filesystem("memory").rm("/ckptmgr-test-run", recursive=True)


def test_a_foreign_file_with_a_step_name_is_never_replaced(ckpt_dir, convnet):
    mgr = CheckpointManager(ckpt_dir)
    mgr.save(1, model=convnet)
    with open(os.path.join(ckpt_dir, "step_00000002"), "w") as fh:
        fh.write("not yours")
    with pytest.raises(ckptmgr.StorageError, match="not a checkpoint directory"):
        mgr.save(2, model=convnet, force=True)
    with open(os.path.join(ckpt_dir, "step_00000002")) as fh:
        assert fh.read() == "not yours"
    assert mgr.all_steps() == [1] and tmp_names(ckpt_dir) == []
