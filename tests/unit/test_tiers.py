"""Tiered checkpoint decisions on synthetic views: what counts, what is owed, what retention drops, who uploads."""
import pytest

from ckptmgr.distributed.nodes import NodeLayout
from ckptmgr.errors import CorruptCheckpointError
from ckptmgr.format.checksum import FileEntry
from ckptmgr.format.manifest import Manifest
from ckptmgr.step.localsave import mismatches, node_manifest
from ckptmgr.step.records import RankFiles
from ckptmgr.step.tierview import TierView, when
from ckptmgr.step.upload import assign, union, with_prefix

T1, T2, T3 = "2026-01-01T00:00:01.000000+00:00", "2026-01-01T00:00:02.000000+00:00", "2026-01-01T00:00:03+00:00"


def test_a_step_counts_locally_only_when_every_node_holds_the_same_save():
    view = TierView(persistent={1: T1}, nodes={0: {1: T1, 2: T2, 3: T3}, 2: {1: T1, 2: T2, 3: T1}})
    assert view.complete() == {1: T1, 2: T2}            # step 3: two different saves
    assert view.restorable() == [1, 2]
    assert view.pending() == [2]                         # committed on every node, not persistent
    assert view.holds(0, 3) is False and view.stale() == {0: [(3, T3)], 2: [(3, T1)]}


def test_the_newer_save_of_a_step_counts():
    forced = TierView(persistent={1: T1}, nodes={0: {1: T2}})
    assert forced.identity(1) == T2 and forced.pending() == [1] and not forced.is_persistent(1)
    stale = TierView(persistent={1: T2}, nodes={0: {1: T1}})
    assert stale.identity(1) == T2 and stale.pending() == [] and stale.stale() == {0: [(1, T1)]}
    assert when("not a time") < when(T1) < when(T3)


def test_local_retention_never_drops_an_owed_step_and_follows_the_persistent_drops():
    view = TierView(persistent={1: T1, 2: T1, 3: T1}, nodes={0: {1: T1, 2: T1, 3: T1, 4: T2}})
    assert view.pending() == [4]
    assert view.drops(keep=1) == {0: [(1, T1), (2, T1), (3, T1)]}   # 4 is the newest, kept, and owed anyway
    assert view.drops(keep=2) == {0: [(1, T1), (2, T1)]}
    assert view.drops(keep=0) == {0: [(1, T1), (2, T1), (3, T1)]}
    assert view.drops(keep=4, also=(2,)) == {0: [(2, T1)]}
    view.skip = [(4, T2)]                                           # its local files are damaged
    assert view.pending() == []


def _manifest(files, rng=None, time=T1):
    return Manifest(step=5, files={n: FileEntry(1, c * 64) for n, c in files.items()},
                    components={"model": "model.safetensors", "rng": rng or {}}, time=time)


def test_uploads_go_to_the_writer_if_its_node_holds_the_file_else_to_the_lowest_holder():
    layout = NodeLayout(0, [0, 0, 2, 2])
    rng = {str(r): f"rng-rank{r:05d}.safetensors" for r in range(4)}
    node0 = _manifest({"model.safetensors": "a", "rng-rank00000.safetensors": "b", "rng-rank00001.safetensors": "c"},
                      rng)
    node1 = _manifest({"model.safetensors": "a", "rng-rank00002.safetensors": "d", "rng-rank00003.safetensors": "e"},
                      rng)
    whole = union({0: node0, 2: node1}, "test")
    assert sorted(whole.files) == sorted(list(rng.values()) + ["model.safetensors"])
    assert assign({0: node0, 2: node1}, whole, layout) == {
        0: ["model.safetensors", "rng-rank00000.safetensors"], 1: ["rng-rank00001.safetensors"],
        2: ["rng-rank00002.safetensors"], 3: ["rng-rank00003.safetensors"]}
    # a restart where only node 0's disk holds a copy (of every file): node 1's files go up from node 0
    assert assign({0: whole}, whole, layout) == {
        0: ["model.safetensors", "rng-rank00000.safetensors", "rng-rank00002.safetensors",
            "rng-rank00003.safetensors"], 1: ["rng-rank00001.safetensors"], 2: [], 3: []}
    with pytest.raises(CorruptCheckpointError, match="differ"):
        union({0: node0, 2: _manifest({"model.safetensors": "f"}, rng)}, "test")


def test_a_prefix_renames_files_and_every_reference_to_them():
    manifest = _manifest({"model.safetensors": "a", "rng-rank00000.safetensors": "b"},
                         {"0": "rng-rank00000.safetensors"})
    moved = with_prefix(manifest, "rev-1/")
    assert sorted(moved.files) == ["rev-1/model.safetensors", "rev-1/rng-rank00000.safetensors"]
    assert moved.components == {"model": "rev-1/model.safetensors", "rng": {"0": "rev-1/rng-rank00000.safetensors"}}
    assert with_prefix(manifest, "") is manifest


def test_a_node_manifest_lists_that_nodes_files_with_rank_zeros_entries_for_replicated_ones():
    layout = NodeLayout(2, [0, 0, 2, 2])
    e = lambda c: FileEntry(3, c * 64)  # noqa: E731
    reports = [RankFiles({"model.safetensors": e("a"), "meta.json": e("m"), "rng-rank00000.safetensors": e("0")},
                         {"model": "model.safetensors", "meta": "meta.json"}, "rng-rank00000.safetensors"),
               RankFiles({"rng-rank00001.safetensors": e("1")}, {}, "rng-rank00001.safetensors"),
               RankFiles({"model.safetensors": e("a"), "meta.json": e("n"), "rng-rank00002.safetensors": e("2")},
                         {"model": "model.safetensors", "meta": "meta.json"}, "rng-rank00002.safetensors"),
               RankFiles({"rng-rank00003.safetensors": e("3")}, {}, "rng-rank00003.safetensors")]
    assert mismatches(reports, layout) == {2: {"meta.json"}}          # its meta holds another time
    mine = node_manifest(7, T1, {"loss": 1.0}, reports, layout, 2, left_out=set())
    assert sorted(mine.files) == ["meta.json", "model.safetensors", "rng-rank00002.safetensors",
                                  "rng-rank00003.safetensors"]
    assert mine.files["meta.json"] == e("m") and mine.world_size == 4 and mine.time == T1
    assert mine.rng_file(0) == "rng-rank00000.safetensors" and mine.metrics == {"loss": 1.0}
    left = node_manifest(7, T1, {}, reports, layout, 2, left_out={"meta.json"})
    assert "meta.json" not in left.files
