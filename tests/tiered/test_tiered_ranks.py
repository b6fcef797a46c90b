"""Tiered checkpoints on 2 real gloo ranks, each rank its own "node" with its own local disk.

The saves are async (the local commit runs on the writer thread, the upload on
its own thread, each with its own process group). Cheaper than the torchrun
launches of tests/integration/test_tiered_nodes.py, so the node-level rules are
checked here: what each node's copy holds, that a node that fails to commit
makes the others roll theirs back, that replicated files are the same bytes on
every node (rank-dependent ``extra`` and ``meta`` are replaced by rank 0's),
that each rank reads its own node's copy, and that a wiped node reads the
persistent copy while the other reads locally.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

from tests.support.multiproc import run_ranks

pytestmark = pytest.mark.timeout(240)

ENV = {"CKPTMGR_DIST_TIMEOUT": "30", "OMP_NUM_THREADS": "1"}


def _files(directory):
    out = {}
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as fh:
            out[name] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _job(rank, world, persistent, local_root):
    import torch

    from ckptmgr import CheckpointManager
    from ckptmgr.distributed import barrier

    os.environ["GROUP_RANK"] = str(rank)   # each rank on its own node
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    local = os.path.join(local_root, f"node{rank}")
    with CheckpointManager(persistent, max_to_keep=3, local_dir=local, async_save=True) as mgr:
        for step in (1, 2):
            with torch.no_grad():
                net.weight.fill_(step)
            mgr.save(step, model=net, optimizer=opt, extra={"rank": rank, "step": step}, meta={"rank": rank})
        mgr.wait()
        steps = mgr.all_steps()
    node_files = _files(os.path.join(local, "step_00000002"))
    # node 1 fails before its local commit, node 0 after its own: node 0 rolls its copy back
    os.environ.update(CKPTMGR_FAULT_POINT="tier.before_local_commit", CKPTMGR_FAULT_ACTION="raise",
                      CKPTMGR_FAULT_RANK="1")
    with CheckpointManager(persistent, max_to_keep=3, local_dir=local) as mgr:
        try:
            mgr.save(3, model=net)
            failed = None
        except Exception as exc:
            failed = type(exc).__name__
        after = [mgr.all_steps(), sorted(os.listdir(local))]
    del os.environ["CKPTMGR_FAULT_POINT"]
    restores = []
    for wiped in (False, True):
        if wiped:
            barrier(timeout=30)
            if rank == 1:
                shutil.rmtree(local)                          # node 1 is replaced
            barrier(timeout=30)
        torch.manual_seed(rank + 7)
        fresh = torch.nn.Linear(4, 4)
        with CheckpointManager(persistent, max_to_keep=3, local_dir=local) as mgr:
            got = mgr.restore(model=fresh)
        restores.append([got.step, got.path, float(fresh.weight[0, 0]), got.extra, got.meta["user"]])
    return {"steps": steps, "files": node_files, "failed": failed, "after": after, "restores": restores}


def test_two_nodes_commit_locally_read_locally_and_a_wiped_node_reads_the_persistent_copy(tmp_path):
    persistent, local_root = str(tmp_path / "persistent"), str(tmp_path / "local")
    results = run_ranks(_job, 2, persistent, local_root, env=ENV, timeout=180)
    assert [status for status, _ in results] == ["ok", "ok"], results
    nodes = [os.path.join(local_root, f"node{r}", "step_00000002") for r in (0, 1)]
    replicated = ["extra.json", "meta.json", "model.safetensors", "optimizer.json"]
    for rank, (_, got) in enumerate(results):
        assert got["steps"] == [1, 2]
        assert sorted(got["files"]) == sorted(replicated + ["manifest.json", f"rng-rank{rank:05d}.safetensors"])
    assert [got["failed"] for _, got in results] == ["DistributedError", "InjectedFault"]
    for _, got in results:
        assert got["after"] == [[1, 2], [".ckptmgr-owner.json", ".ckptmgr-tier.json", ".ckptmgr.lock",
                                         "step_00000002"]]          # no step 3 anywhere, no leftovers
    for name in replicated:                                   # the same bytes on each node
        assert results[0][1]["files"][name] == results[1][1]["files"][name], name
    with open(os.path.join(persistent, "step_00000002", "manifest.json")) as fh:
        whole = json.load(fh)
    assert sorted(whole["files"]) == replicated + ["rng-rank00000.safetensors", "rng-rank00001.safetensors"]
    with open(os.path.join(nodes[0], "manifest.json")) as fh:
        mine = json.load(fh)
    assert mine["time"] == whole["time"] and mine["components"] == whole["components"]
    assert all(whole["files"][n] == e for n, e in mine["files"].items())
    for rank, (_, got) in enumerate(results):
        step, path, value, extra, meta = got["restores"][0]
        assert (step, path, value) == (2, nodes[rank], 2.0)            # each node read its own copy
        assert extra == {"rank": 0, "step": 2} and meta == {"rank": 0}   # rank 0's, as in the persistent copy
    first, second = results[0][1]["restores"][1], results[1][1]["restores"][1]
    assert first[:3] == [2, nodes[0], 2.0]                               # node 0 still reads locally
    assert second[:3] == [2, os.path.join(persistent, "step_00000002"), 2.0]   # the replaced node: the persistent copy
    assert second[3] == {"rank": 0, "step": 2}
