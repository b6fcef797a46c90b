"""Processes sharing one CKPTMGR_HOME download an http checkpoint exactly once.

Four gloo ranks (local rank 0 first, then the rest read the cache), and plain
processes outside torch.distributed (the cache's file lock).
"""
import datetime
import io
import json
import os
import time

import pytest
import torch
import torch.multiprocessing as mp

WORLD = 4
JOIN_TIMEOUT = 120


def _worker(rank, rendezvous, home, url, missing_url, out_dir):
    os.environ["CKPTMGR_HOME"] = home
    os.environ["CKPTMGR_DIST_TIMEOUT"] = "60"
    import torch.distributed as dist

    import ckptmgr
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        ckpt = ckptmgr.CheckpointLoader.load_checkpoint(url, map_location="cpu")
        result = {"sum": float(ckpt["w"].sum()), "path": ckptmgr.cached_path(url), "error": None}
        if missing_url:
            try:
                ckptmgr.CheckpointLoader.load_checkpoint(missing_url)
            except Exception as exc:  # the point of the test: which error each rank sees
                result["error"] = type(exc).__name__
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as fh:
            json.dump(result, fh)
    finally:
        dist.destroy_process_group()


def _plain_worker(index, home, url, nprocs, out_dir):
    os.environ["CKPTMGR_HOME"] = home
    import ckptmgr
    open(os.path.join(out_dir, f"ready-{index}"), "w").close()  # a file barrier: start asking together
    deadline = time.monotonic() + 60
    while sum(name.startswith("ready-") for name in os.listdir(out_dir)) < nprocs:
        if time.monotonic() > deadline:
            raise TimeoutError("the other processes never got ready")
        time.sleep(0.01)
    with open(ckptmgr.cached_path(url), "rb") as fh:
        size = len(fh.read())
    with open(os.path.join(out_dir, f"{index}.json"), "w") as fh:
        json.dump({"size": size}, fh)


def _run(tmp_path, tag, *args, worker=_worker, nprocs=WORLD):
    out_dir = tmp_path / f"out-{tag}"
    out_dir.mkdir()
    if worker is _worker:
        args = (str(tmp_path / f"rendezvous-{tag}"), *args)
    context = mp.start_processes(worker, args=(*args, str(out_dir)), nprocs=nprocs,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks did not finish within {JOIN_TIMEOUT}s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [json.loads((out_dir / f"{rank}.json").read_text()) for rank in range(nprocs)]


@pytest.mark.timeout(300)
def test_one_download_per_node_and_rank0_failure_reaches_everyone(http_server, tmp_path):
    buf = io.BytesIO()
    torch.save({"w": torch.arange(10.0)}, buf)
    url = http_server.add("/dist/model.pth", buf.getvalue(), delay=0.3)  # slow enough for ranks to overlap
    home = os.environ["CKPTMGR_HOME"]
    missing = http_server.add("/dist/missing.pth", b"", status=404)

    first = _run(tmp_path, "first", home, url, missing)
    assert http_server.gets("/dist/model.pth") == 1
    assert [r["sum"] for r in first] == [45.0] * WORLD
    assert len({r["path"] for r in first}) == 1
    assert first[0]["error"] == "CheckpointNotFoundError"
    assert [r["error"] for r in first[1:]] == ["DistributedError"] * (WORLD - 1)
    assert http_server.gets("/dist/missing.pth") == 1  # only rank 0 asked

    second = _run(tmp_path, "second", home, url, "")
    assert http_server.gets("/dist/model.pth") == 1  # the second run read the cache: no new GET
    assert [r["sum"] for r in second] == [45.0] * WORLD


@pytest.mark.timeout(300)
def test_processes_outside_torch_distributed_share_one_download(http_server, tmp_path):
    data = os.urandom(256 * 1024)
    # All three ask at once (a file barrier); the delay keeps the first GET open while the others wait.
    url = http_server.add("/plain/blob.bin", data, delay=0.5)
    results = _run(tmp_path, "plain", os.environ["CKPTMGR_HOME"], url, 3, worker=_plain_worker, nprocs=3)
    assert [r["size"] for r in results] == [len(data)] * 3
    assert http_server.gets("/plain/blob.bin") == 1
