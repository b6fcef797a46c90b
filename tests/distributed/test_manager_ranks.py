"""CheckpointManager on 2 and 4 real gloo ranks: DDP save/restore, per-rank RNG, failures that reach every rank."""
import os
import uuid

import pytest

from tests.support.multiproc import run_ranks

pytestmark = pytest.mark.timeout(180)

FAST_TIMEOUT = {"CKPTMGR_DIST_TIMEOUT": "30", "OMP_NUM_THREADS": "1"}


def _attempt(func, patch=None):
    """Run ``func`` (with ``patch = (module, name, replacement)`` applied); report how it failed and how fast."""
    import time
    saved = None
    if patch is not None:
        saved = getattr(patch[0], patch[1])
        setattr(patch[0], patch[1], patch[2])
    start = time.monotonic()
    try:
        func()
        return ["ok", "", 0.0]
    except Exception as exc:
        return [type(exc).__name__, str(exc)[:300], round(time.monotonic() - start, 2)]
    finally:
        if patch is not None:
            setattr(patch[0], patch[1], saved)


def _tensors_equal(a, b):
    import torch
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _worker(rank, world, directory):
    import json
    import random

    import numpy as np
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ckptmgr import CheckpointManager
    from ckptmgr import distributed as dist
    from ckptmgr import io as storage
    from ckptmgr.state import objects as state
    from ckptmgr.step import format_base as components
    from tests.conftest import ConvNet

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = DDP(ConvNet())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(100 + rank)                      # different data on every rank, gradients all-reduced
    for _ in range(2):
        model(torch.randn(2, 3, 8, 8)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    torch.manual_seed(1000 + rank)                     # a different RNG stream on every rank
    np.random.seed(rank)
    random.seed(rank)
    out = {}
    mgr = CheckpointManager(directory, max_to_keep=3)
    path = mgr.save(1, model=model, optimizer=opt, extra={"epoch": 1}, metrics={"loss": 0.5})
    expected = [torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()]
    torch.rand(7), np.random.rand(7), random.random()

    torch.manual_seed(5)
    fresh = DDP(ConvNet())
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    restored = mgr.restore(model=fresh, optimizer=fresh_opt)
    out["restored"] = restored.step
    out["rng"] = [torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()]
    out["rng_expected"] = expected
    # Parameters agree on every rank (DDP); BatchNorm buffers are rank 0's in the checkpoint.
    out["weights_equal"] = _tensors_equal(dict(model.module.named_parameters()), dict(fresh.module.named_parameters()))
    if rank == 0:
        out["weights_equal"] &= _tensors_equal(model.module.state_dict(), fresh.module.state_dict())
    out["momentum_equal"] = all(torch.equal(opt.state[p]["momentum_buffer"], fresh_opt.state[q]["momentum_buffer"])
                                for p, q in zip(model.parameters(), fresh.parameters()))
    if rank == 0:
        with storage.open_read(storage.join(path, "manifest.json")) as fh:
            manifest = json.loads(fh.read())
        out["names"] = [n for n in storage.listdir(directory) if not n.startswith(".ckptmgr")]
        # on S3 a save's files sit under its own rev-<id>/ prefix (the manifest names them)
        out["files"] = sorted(name.rsplit("/", 1)[-1] for name in storage.open_store(path).list_files())
        out["manifest"] = {"world_size": manifest["world_size"],
                           "rng": {r: name.rsplit("/", 1)[-1] for r, name in manifest["components"]["rng"].items()}}

    def fail(*args, **kwargs):
        raise RuntimeError(f"injected failure on rank {rank}")
    real_write = components.write_component

    def fail_mid_write(dir_uri, base, obj, *args, **kwargs):
        if base.startswith("rng"):
            real_write(dir_uri, "partial", {"x": 1}, *args, **kwargs)   # something is on storage already
            raise OSError(5, f"injected I/O error on rank {rank}")
        return real_write(dir_uri, base, obj, *args, **kwargs)
    out["collect_failure"] = _attempt(lambda: mgr.save(2, model=model, optimizer=opt),
                                      (state, "rng_state", fail) if rank == 1 else None)
    out["write_failure"] = _attempt(lambda: mgr.save(3, model=model, optimizer=opt),
                                    (components, "write_component", fail_mid_write) if rank == 1 else None)
    out["exists"] = _attempt(lambda: mgr.save(1, model=model))
    dist.barrier(timeout=30)
    out["steps_after_failures"] = mgr.all_steps()
    out["names_after_failures"] = [n for n in storage.listdir(directory) if not n.startswith(".ckptmgr")]
    dist.barrier(timeout=30)
    mgr.save(4, model=model, optimizer=opt)
    out["steps_final"] = mgr.all_steps()

    # rank 0 alone finds step 4 damaged; every rank must restore the step it picks instead
    if rank == 0:
        step4 = storage.join(directory, "step_00000004")
        with storage.open_read(storage.join(step4, "manifest.json")) as fh:
            target = storage.join(step4, json.loads(fh.read())["components"]["model"])
        with storage.open_read(target) as fh:
            data = bytearray(fh.read())
        data[-1] ^= 0xFF
        with storage.atomic_write(target) as fh:
            fh.write(bytes(data))
    dist.barrier(timeout=30)
    out["fallback"] = mgr.restore(model=fresh).step
    return out


def _run(world, directory, env=None):
    results = run_ranks(_worker, world, directory, timeout=150, env=dict(FAST_TIMEOUT, **(env or {})))
    for rank, (status, value) in enumerate(results):
        assert status == "ok", f"rank {rank}: {value}"
    return [value for _, value in results]


def _check(outs, world):
    for rank, out in enumerate(outs):
        assert out["restored"] == 1 and out["weights_equal"] and out["momentum_equal"], rank
        assert out["rng"] == out["rng_expected"], f"rank {rank} RNG not restored"
        for key in ("collect_failure", "write_failure"):
            kind, message, _ = out[key]
            assert kind != "ok", (rank, key, out[key])
            if rank == 1:
                assert "injected" in message, (rank, key, message)
            else:
                assert kind == "DistributedError" and "rank 1" in message, (rank, key, message)
        assert out["exists"][0] == "CheckpointExistsError", (rank, out["exists"])
        assert out["steps_after_failures"] == [1], rank
        assert out["names_after_failures"] == ["step_00000001"], (rank, out["names_after_failures"])
        assert out["steps_final"] == [1, 4] and out["fallback"] == 1, rank
    streams = {str(out["rng_expected"]) for out in outs}
    assert len(streams) == world                  # each rank really had its own stream
    head = outs[0]
    rng_files = [f"rng-rank{r:05d}.safetensors" for r in range(world)]
    assert head["manifest"] == {"world_size": world, "rng": {str(r): rng_files[r] for r in range(world)}}
    assert head["names"] == ["step_00000001"]
    assert head["files"] == sorted(["manifest.json", "model.safetensors", "optimizer.safetensors", "extra.json",
                                    "meta.json"] + rng_files)


@pytest.mark.parametrize("world", [2, 4])
def test_manager_on_gloo_ranks(tmp_path, world):
    _check(_run(world, str(tmp_path / "run")), world)


def test_manager_on_two_ranks_writing_to_s3(s3):
    env = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                      "AWS_ENDPOINT_URL")}
    _check(_run(2, f"{s3}/dist-{uuid.uuid4().hex[:6]}", env), 2)


def _rank_dies_mid_save(rank, world, directory):
    import time

    import torch

    from ckptmgr import CheckpointManager
    from ckptmgr.step import format_base as components
    from tests.conftest import ConvNet
    mgr = CheckpointManager(directory)
    mgr.save(1, model=ConvNet())
    if rank == 1:
        def die(*args, **kwargs):
            os._exit(9)                       # like kill -9 while writing its RNG file
        components.write_component = die
    start = time.monotonic()
    try:
        mgr.save(2, model=ConvNet(), optimizer=torch.optim.SGD(ConvNet().parameters(), lr=0.1))
    except Exception as exc:
        names = sorted(n for n in os.listdir(directory) if not n.startswith(".ckptmgr"))  # less ownership files
        return type(exc).__name__, round(time.monotonic() - start, 1), mgr.all_steps(), names
    return "saved"


def test_a_rank_dying_mid_save_is_an_error_on_the_others_not_a_hang(tmp_path):
    directory = str(tmp_path / "run")
    results = run_ranks(_rank_dies_mid_save, 2, directory, timeout=60, env={"CKPTMGR_DIST_TIMEOUT": "8"})
    assert results[1][0] == "died"
    status, (kind, _, steps, names) = results[0]
    assert status == "ok" and kind == "DistributedError"
    assert steps == [1] and names == ["step_00000001"]
