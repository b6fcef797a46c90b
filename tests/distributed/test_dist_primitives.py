"""ckptmgr.distributed on real gloo ranks: agreement, broadcast, and failures that never hang."""
import os
import time

import pytest

from tests.support.multiproc import run_ranks

pytestmark = pytest.mark.timeout(120)


def _collectives(rank, world):
    from ckptmgr import distributed as dist
    value = dist.broadcast_json({"step": 7, "from": rank} if rank == 0 else None)
    gathered = dist.all_gather_json({"rank": rank, "pad": "x" * rank})
    agree_all = dist.all_agree(True)
    agree_one = dist.all_agree(rank != 1)
    dist.barrier(timeout=30)
    return value, [g["rank"] for g in gathered], agree_all, agree_one, dist.get_rank(), dist.get_world_size()


def test_collectives_on_three_ranks():
    results = run_ranks(_collectives, 3)
    for rank, (status, value) in enumerate(results):
        assert status == "ok", value
        assert value == ({"step": 7, "from": 0}, [0, 1, 2], True, False, rank, 3)


def _leader_fails(rank, world, marker_dir):
    from ckptmgr import rank_zero_first
    with rank_zero_first(local=True, timeout=30):
        if rank == 0:
            raise OSError("download failed on rank 0")
        open(os.path.join(marker_dir, f"body-{rank}"), "w").close()
    return "ran body"


def test_rank_zero_first_propagates_leader_failure(tmp_path):
    results = run_ranks(_leader_fails, 3, str(tmp_path))
    assert results[0][0] == "err" and "download failed on rank 0" in results[0][1]
    for status, text in results[1:]:
        assert status == "err" and "DistributedError" in text and "rank 0 failed" in text
    assert os.listdir(tmp_path) == []  # followers never ran their body


def _leader_first(rank, world, marker_dir):
    from ckptmgr import rank_zero_first
    with rank_zero_first(timeout=30):
        if rank == 0:
            time.sleep(0.5)
        path = os.path.join(marker_dir, f"{time.monotonic_ns()}-{rank}")
        open(path, "w").close()
    return rank


def test_rank_zero_first_orders_the_bodies(tmp_path):
    results = run_ranks(_leader_first, 3, str(tmp_path))
    assert [s for s, _ in results] == ["ok"] * 3
    order = [int(name.split("-")[1]) for name in sorted(os.listdir(tmp_path), key=lambda n: int(n.split("-")[0]))]
    assert order[0] == 0 and sorted(order) == [0, 1, 2]


def _one_rank_late(rank, world, marker):
    from ckptmgr import distributed as dist
    if rank == 1:   # arrives only after rank 0 gave up (or after 60 s, if its barrier never times out)
        deadline = time.monotonic() + 60
        while not os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        return "late"
    try:
        dist.barrier(timeout=2)
    except Exception as exc:
        return type(exc).__name__, "did not answer within 2s" in str(exc)
    finally:
        open(marker, "w").close()
    return "passed"


def test_barrier_times_out_instead_of_hanging(tmp_path):
    results = run_ranks(_one_rank_late, 2, str(tmp_path / "gave-up"))
    status, value = results[0]
    assert status == "ok" and tuple(value) == ("DistributedError", True), value


def _one_rank_dies(rank, world):
    from ckptmgr import distributed as dist
    if rank == 1:
        os._exit(3)  # dies without a word, like kill -9
    try:
        dist.barrier(timeout=20)
    except Exception as exc:
        return type(exc).__name__
    return "passed"


def test_dead_rank_becomes_an_error():
    results = run_ranks(_one_rank_dies, 2)
    status, value = results[0]
    assert status == "ok" and value == "DistributedError", value
    assert results[1][0] == "died"
