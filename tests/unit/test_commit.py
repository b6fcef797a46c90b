"""The two commit protocols, driven directly: a step is visible only after commit, and gone at once when uncommitted."""
import os

import pytest

from ckptmgr.errors import CheckpointExistsError
from ckptmgr.format.checksum import FileEntry
from ckptmgr.format.manifest import MANIFEST_NAME, Manifest
from ckptmgr.io.access import open_store
from ckptmgr.io.local import LocalStore
from ckptmgr.step.commit import ManifestLastCommit, RenameCommit, protocol_for, run_reclaims
from ckptmgr.step.files import probe
from ckptmgr.step.index import StepIndex


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(str(tmp_path / "run"))
    return open_store(f"memory://ckptmgr-commit-{os.urandom(4).hex()}/run")


def _write_step(store, protocol, step, payload=b"data", force=False):
    plan = protocol.prepare(step, force)
    name = f"{plan.prefix}weights.bin"
    store.sub(plan.root).write_bytes(name, payload)
    import hashlib
    manifest = Manifest(step=step, files={name: FileEntry(len(payload), hashlib.sha256(payload).hexdigest())},
                        components={"weights": name})
    return plan, manifest


def test_the_store_kind_picks_the_protocol(store):
    protocol = protocol_for(store)
    assert isinstance(protocol, RenameCommit if isinstance(store, LocalStore) else ManifestLastCommit)


def test_nothing_is_visible_before_the_commit_and_everything_after(store):
    protocol = protocol_for(store)
    plan, manifest = _write_step(store, protocol, 3)
    assert StepIndex(store).refresh() == {}                       # data written, no manifest: not a step
    protocol.commit(plan, manifest)
    assert list(StepIndex(store).refresh()) == [3]
    assert store.read_bytes("step_00000003/weights.bin") == b"data"
    assert MANIFEST_NAME in store.listdir("step_00000003")


def test_abort_leaves_nothing(store):
    protocol = protocol_for(store)
    plan, _ = _write_step(store, protocol, 4)
    protocol.abort(plan)
    assert store.list_files() == {}


def test_a_committed_step_needs_force_and_stays_valid_until_the_new_one_commits(store):
    protocol = protocol_for(store)
    protocol.commit(*_write_step(store, protocol, 5, b"old"))
    with pytest.raises(CheckpointExistsError):
        protocol.prepare(5, force=False)
    plan, manifest = _write_step(store, protocol, 5, b"new!", force=True)
    assert probe(store.sub("step_00000005")) == "committed"      # the old one still restores meanwhile
    assert store.read_bytes("step_00000005/weights.bin") == b"old"
    protocol.commit(plan, manifest)
    name = manifest.file_for("weights")
    assert store.read_bytes(f"step_00000005/{name}") == b"new!"
    assert set(store.list_files("step_00000005")) == {name, MANIFEST_NAME}   # the old revision is gone


def test_uncommit_hides_the_step_at_once_and_reclaim_frees_it(store):
    protocol = protocol_for(store)
    protocol.commit(*_write_step(store, protocol, 6))
    reclaim = protocol.uncommit(6)
    assert StepIndex(store).refresh() == {}
    run_reclaims([reclaim])
    assert store.list_files() == {}


def test_leftovers_are_cleaned_and_foreign_files_kept(store):
    protocol = protocol_for(store)
    plan, _ = _write_step(store, protocol, 7)                      # a save that crashed before its commit
    store.write_bytes("notes.txt", b"mine")
    index = StepIndex(store)
    index.refresh()
    removed = protocol.clean_leftovers(index.names, index.uncommitted)
    assert removed == [plan.write_dir.rstrip("/")]
    assert store.list_files() == {"notes.txt": 4}


def test_an_interrupted_swap_is_rolled_back(tmp_path):
    store = open_store(str(tmp_path / "run"))
    protocol = RenameCommit(store)
    protocol.commit(*_write_step(store, protocol, 8, b"committed"))
    old = ".old-step_00000008-" + "a" * 32                          # a crash between the two renames
    store.rename_dir("step_00000008", old)
    protocol.clean_leftovers(store.listdir())
    assert store.read_bytes("step_00000008/weights.bin") == b"committed"
    assert store.listdir() == ["step_00000008"]
