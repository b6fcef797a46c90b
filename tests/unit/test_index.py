"""The step index: one listing per refresh, each manifest read once, damage reported once."""
import logging

from ckptmgr.format.checksum import FileEntry
from ckptmgr.format.manifest import MANIFEST_NAME, Manifest
from ckptmgr.io.access import open_store
from ckptmgr.step.index import StepIndex, read_manifests
from ckptmgr.step.names import step_name


def _commit(store, step, metrics=None):
    manifest = Manifest(step=step, files={"a.bin": FileEntry(1, "00" * 32)}, components={}, metrics=metrics or {})
    store.write_bytes(f"{step_name(step)}/{MANIFEST_NAME}", manifest.to_bytes())


def test_manifests_are_read_once_and_new_steps_found(tmp_path):
    store = open_store(str(tmp_path))
    for step in (1, 2, 3):
        _commit(store, step, {"loss": step / 10})
    index = StepIndex(store)
    assert list(index.refresh()) == [1, 2, 3] and index.manifest_reads == 3
    _commit(store, 4)
    assert list(index.refresh()) == [1, 2, 3, 4] and index.manifest_reads == 4   # only the new one
    assert index.known()[2].metrics == {"loss": 0.2}
    store.remove(step_name(1), recursive=True)
    assert list(index.refresh()) == [2, 3, 4]


def test_uncommitted_damaged_and_foreign_entries(tmp_path, caplog):
    store = open_store(str(tmp_path))
    _commit(store, 1)
    store.write_bytes("step_00000002/a.bin", b"x")                     # no manifest: uncommitted
    store.write_bytes(f"step_00000003/{MANIFEST_NAME}", b"{torn")       # damaged
    _commit(store, 5)
    store.rename_dir("step_00000005", "step_00000009")                 # a manifest for another step
    store.write_bytes("step_000000010/x", b"")                         # not one of our names
    index = StepIndex(store)
    with caplog.at_level(logging.WARNING, logger="ckptmgr.step.index"):
        assert list(index.refresh()) == [1]
        index.refresh()
    assert index.uncommitted == [2]
    warned = [r.getMessage() for r in caplog.records]
    assert sum("step 3" in m for m in warned) == 1 and sum("step 9" in m for m in warned) == 1   # once each
    outcomes = read_manifests(store, [1, 2, 3, 9])
    assert isinstance(outcomes[1], Manifest) and isinstance(outcomes[2], FileNotFoundError)
    assert isinstance(outcomes[3], Exception) and "records step 5" in str(outcomes[9])


def test_add_and_discard_change_the_cached_view_without_storage(tmp_path):
    index = StepIndex(open_store(str(tmp_path)))
    index.add(7, {"loss": 1.0})
    assert list(index.known()) == [7]
    index.discard(7)
    assert index.known() == {}
