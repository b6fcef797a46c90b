"""Scenario 2: saves that fail without a kill: an exception at each stage on one rank, and a full disk.

After every failed save: it raised (on every rank), nothing new is committed,
the previous checkpoint restores, and no temporary directory is left (at the
latest after the next, successful save).

* stage faults: ``CKPTMGR_FAULT_POINT`` with ``CKPTMGR_FAULT_ACTION=raise`` on
  one rank of a gloo job, at prepare / write / after a data file / commit /
  before the manifest;
* a real ``RLIMIT_FSIZE`` in a child process (SIGXFSZ ignored, so ``write``
  fails with EFBIG), at several limits;
* ENOSPC raised by the file objects a local store's ``atomic_write`` (the
  manifest) and ``write_unpublished`` (the data files) yield, after a random
  number of bytes of the save.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import subprocess
import sys
import tempfile
from typing import Any, Dict, List

import torch

import ckptmgr
from ckptmgr import CheckpointManager, faults
from ckptmgr.io.local import LocalStore
from ckptmgr.step.files import read_manifest
from reliability.common import Tally, small_model
from tests.support.multiproc import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["save.prepare", "save.write", "save.after_data_file", "save.commit", "save.before_manifest"]


def _leftovers(directory: str) -> List[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith((".tmp-", ".old-")))


def _after_failure(mgr: CheckpointManager, committed: List[int], model: Any) -> Dict[str, Any]:
    """What a failed save left: the listing, whether the latest restores, temp names."""
    steps = mgr.all_steps()
    restored = mgr.restore(model=model)
    return {"steps": steps, "restored": restored.step if restored else None, "leftovers": _leftovers(mgr.directory),
            "expected": committed[-2:]}


def _stage_worker(rank: int, world: int, directory: str, plan: List[List[Any]]) -> List[Dict[str, Any]]:
    os.environ["CKPTMGR_FAULT_ACTION"] = "raise"
    model = small_model()
    mgr = CheckpointManager(directory, max_to_keep=2)
    mgr.save(0, model=model)
    committed, out = [0], []
    for i, (point, bad_rank) in enumerate(plan, start=1):
        faults._hits.clear()
        os.environ.update({"CKPTMGR_FAULT_POINT": point, "CKPTMGR_FAULT_RANK": str(bad_rank)})
        record: Dict[str, Any] = {"point": point, "bad_rank": bad_rank, "error": None}
        try:
            mgr.save(i, model=model)
        except Exception as exc:  # the point: every rank must get here
            record.update(error=type(exc).__name__, typed=isinstance(exc, ckptmgr.CheckpointError))
        del os.environ["CKPTMGR_FAULT_POINT"]
        record.update(_after_failure(mgr, committed, model))
        if i in record["steps"]:  # rank 0 committed before another rank failed: complete, so it may stay
            committed.append(i)   # (retention then waits for the next save that succeeds)
            record["committed_anyway"] = True
        record["committed"] = list(committed)
        out.append(record)
    mgr.save(len(plan) + 1, model=model)  # the next save reclaims whatever is left
    mgr.close()  # including the space of steps its retention dropped, freed in the background
    out.append({"final_leftovers": _leftovers(directory)})
    return out


def run_stage_faults(world: int = 2, stages: List[str] = STAGES) -> Tally:
    """One gloo job of ``world`` ranks; a failed save per (stage, faulty rank)."""
    tally = Tally(f"exception at each save stage on one of {world} ranks")
    plan = [[p, r] for p in stages for r in range(world) if not (p == "save.before_manifest" and r != 0)]
    with tempfile.TemporaryDirectory() as root:
        results = run_ranks(_stage_worker, world, os.path.join(root, "run"), plan, timeout=240,
                            env={"CKPTMGR_DIST_TIMEOUT": "60"})
    if any(status != "ok" for status, _ in results):
        tally.trial("gloo job", lambda: (_ for _ in ()).throw(AssertionError(str(results)[:400])))
        return tally
    for i, (point, bad_rank) in enumerate(plan):
        def check(i: int = i) -> None:
            for rank, (_, records) in enumerate(results):
                rec = records[i]
                assert rec["error"], f"rank {rank} did not raise"
                assert rank == rec["bad_rank"] or rec["typed"], f"rank {rank} raised untyped {rec['error']}"
                steps, committed = rec["steps"], rec["committed"]
                assert set(steps) <= set(committed), f"steps {steps} include uncommitted ones ({committed})"
                assert set(committed[-2:]) <= set(steps), f"steps {steps} lost one of {committed[-2:]}"
                assert rec["restored"] == committed[-1], f"restored {rec['restored']}, latest {committed[-1]}"
            final = results[0][1][-1]  # rank 0's view: retention runs there after the other ranks returned
            assert not final["final_leftovers"], final
        tally.trial(f"{point} on rank {bad_rank}", check)
    # A rank failing in the commit phase after rank 0 wrote the manifest cannot un-commit a complete step:
    # the save raises on every rank, and the step (whole, verified on restore) stays.
    tally.figures["committed_despite_error"] = sum(bool(r.get("committed_anyway")) for r in results[0][1][:-1])
    return tally


# --------------------------------------------------------------------------- disk full


def fsize_child(directory: str, limits: List[int]) -> List[Dict[str, Any]]:
    """In a child process: save under each RLIMIT_FSIZE limit (SIGXFSZ ignored); report what happened."""
    import resource
    import signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    model = torch.nn.Linear(256, 256)  # a 257 KiB weights file
    mgr = CheckpointManager(directory, max_to_keep=2)
    mgr.save(0, model=model)
    committed, out = [0], []
    for i, limit in enumerate(limits, start=1):
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        record: Dict[str, Any] = {"limit": limit, "error": None}
        try:
            mgr.save(i, model=model)
            committed.append(i)
        except Exception as exc:
            record.update(error=type(exc).__name__, message=str(exc)[:200],
                          typed=isinstance(exc, ckptmgr.StorageError))
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        record.update(_after_failure(mgr, committed, model))
        out.append(record)
    mgr.save(len(limits) + 1, model=model)
    mgr.close()  # retention frees dropped steps' space in the background
    out.append({"final_leftovers": _leftovers(directory)})
    return out


def run_fsize(n: int, seed: int = 0) -> Tally:
    """``n`` saves under a real RLIMIT_FSIZE (0, 1, 4096 bytes and random limits below the file size)."""
    tally = Tally("disk full: real RLIMIT_FSIZE in a child process")
    rng = random.Random(seed)
    limits = ([0, 1, 4096] + [rng.randrange(1, 263_000) for _ in range(max(0, n - 3))])[:n]
    with tempfile.TemporaryDirectory() as root:
        proc = subprocess.run([sys.executable, "-m", "reliability.saves", "fsize", os.path.join(root, "run"),
                               json.dumps(limits)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        tally.trial("child", lambda: (_ for _ in ()).throw(AssertionError(proc.stderr[-400:])))
        return tally
    records = json.loads(proc.stdout.strip().splitlines()[-1])
    for rec in records[:-1]:
        def check(rec: Dict[str, Any] = rec) -> None:
            assert rec["error"] and rec["typed"], f"limit {rec['limit']}: {rec['error']}"
            assert "file-size limit" in rec["message"], rec["message"]  # EFBIG: not "out of space"
            assert rec["steps"] == rec["expected"] and rec["restored"] == rec["expected"][-1], rec
            assert not rec["leftovers"], rec["leftovers"]
        tally.trial(f"RLIMIT_FSIZE={rec['limit']}", check)
    assert not records[-1]["final_leftovers"]
    return tally


class _FullDisk:
    """A file object that raises ENOSPC once the save has written ``budget`` bytes in total."""

    def __init__(self, fh: Any, budget: List[int]) -> None:
        self._fh, self._budget = fh, budget

    def write(self, data: Any) -> int:
        n = memoryview(data).nbytes
        if n > self._budget[0]:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        self._budget[0] -= n
        return self._fh.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)


@contextlib.contextmanager
def disk_fills_after(budget: int):
    """Patch local stores' file writers so writes fail with ENOSPC after ``budget`` bytes in total."""
    left = [budget]
    real = {name: getattr(LocalStore, name) for name in ("atomic_write", "write_unpublished")}

    def patched(opener: Any) -> Any:
        @contextlib.contextmanager
        def wrapped(self: LocalStore, name: str = ""):
            with opener(self, name) as fh:
                yield _FullDisk(fh, left)
        return wrapped
    for name, opener in real.items():
        setattr(LocalStore, name, patched(opener))
    try:
        yield
    finally:
        for name, opener in real.items():
            setattr(LocalStore, name, opener)


def run_enospc(n: int, seed: int = 0) -> Tally:
    """``n`` saves that hit ENOSPC at a random byte offset of the save."""
    tally = Tally("disk full: ENOSPC from the storage layer at random offsets")
    rng = random.Random(seed)
    model = small_model()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 16)).sum().backward()
    opt.step()
    with tempfile.TemporaryDirectory() as root:
        mgr = CheckpointManager(os.path.join(root, "run"), max_to_keep=2)
        mgr.save(0, model=model, optimizer=opt)
        total = sum(e.size for e in read_manifest(mgr.store.sub('step_00000000')).files.values())
        for i in range(1, n + 1):
            offset = rng.randrange(0, total)

            def check(i: int = i, offset: int = offset) -> None:
                with disk_fills_after(offset):
                    try:
                        mgr.save(i, model=model, optimizer=opt)
                        raise AssertionError("the save succeeded on a full disk")
                    except ckptmgr.StorageError as exc:
                        assert "space" in str(exc), exc
                assert mgr.all_steps() == [0], mgr.all_steps()
                assert mgr.restore(model=model, optimizer=opt).step == 0
                assert not _leftovers(mgr.directory), _leftovers(mgr.directory)
            tally.trial(f"ENOSPC after {offset} of {total} bytes", check)
        mgr.close()
    return tally


if __name__ == "__main__":
    if sys.argv[1] == "fsize":
        print(json.dumps(fsize_child(sys.argv[2], json.loads(sys.argv[3]))))
