"""kill -9 of local rank 0 in the middle of a download, in a 4-rank job.

Rank 0 dies while the server is still sending; the other ranks must fail with
a typed error within the distributed timeout (not hang until the group's own
timeout), nothing partial may be promoted into the cache, and running the job
again must succeed with the right bytes.
"""
import os
import time

import pytest

from tests.support.multiproc import run_ranks

pytestmark = pytest.mark.timeout(180)

TIMEOUT = 20  # CKPTMGR_DIST_TIMEOUT for the job; the followers must give up well before the group's 60 s


def _download(rank, world, url, kill_rank0_after):
    import threading

    import ckptmgr
    if rank == 0 and kill_rank0_after is not None:
        threading.Timer(kill_rank0_after, os._exit, (9,)).start()  # dies mid-download, like kill -9
    start = time.monotonic()
    try:
        path = ckptmgr.cached_path(url)
    except Exception as exc:
        return ["error", type(exc).__name__, isinstance(exc, ckptmgr.CheckpointError), time.monotonic() - start]
    with open(path, "rb") as fh:
        return ["ok", len(fh.read()), path, time.monotonic() - start]


def test_rank0_killed_mid_download(http_server, tmp_path):
    data = os.urandom(3 * 1024 * 1024)
    # the first GET sends 1 MiB, then stalls: rank 0 is killed while it waits for the rest
    url = http_server.add("/models/big.pth", data, cut_after=1024 * 1024, cut_times=1, stall=30)
    env = {"CKPTMGR_HOME": str(tmp_path / "home"), "CKPTMGR_DIST_TIMEOUT": str(TIMEOUT),
           "CKPTMGR_DOWNLOAD_TIMEOUT": "60"}
    results = run_ranks(_download, 4, url, 1.5, env=env, timeout=120)
    assert results[0][0] == "died"
    for status, value in results[1:]:
        assert status == "ok", value
        outcome, error, typed, _ = value
        assert outcome == "error" and error == "DistributedError" and typed, value
    assert http_server.gets("/models/big.pth") == 1       # only rank 0 ever downloaded
    checkpoints = tmp_path / "home" / "hub" / "checkpoints"
    promoted = [n for n in os.listdir(checkpoints) if n.endswith(".pth")] if checkpoints.exists() else []
    assert promoted == [], promoted                        # the partial download never got the final name

    again = run_ranks(_download, 4, url, None, env=env, timeout=120)
    for status, value in again:
        assert status == "ok" and value[0] == "ok" and value[1] == len(data), value
    assert len({value[2] for _, value in again}) == 1      # every rank reads the one cached file
    with open(again[0][1][2], "rb") as fh:
        assert fh.read() == data
    assert http_server.gets("/models/big.pth") == 2        # one more GET for the whole job
