"""Scenario: tiered checkpoints (a local tier, an S3 persistent tier) under kill -9, wiped and damaged local tiers.

Kills. A zygote (reliability/tiered_child.py) forks a saver that saves new
steps with ``local_dir`` forever (``max_to_keep=2``, ``local_max_to_keep=1``),
logging ``begin V``, ``local V`` (save returned: committed locally) and
``persistent V`` (wait returned). A round kills it at a random instant, or
arms a named fault point of the local commit, the upload or retention, so it
SIGKILLs itself there. Then a restarted manager on the same two directories
must find:

* the persistent tier holds only committed steps, each intact (an interrupted
  upload's objects are there uncommitted, never as a step);
* the restored step is the newest one the log says was committed locally, or
  the one in flight, with the values it was saved with;
* once that manager closes, the restored step is persistent (a step committed
  only locally when the process died is uploaded by the next manager).

Damage. After a few saves, the local tier is wiped (a replaced node), or one
byte of one of its files is flipped: the restore must give the newest step,
read from the persistent tier, never an older one.
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
import uuid
from typing import Dict, List, Optional, Tuple

from ckptmgr import CheckpointManager, inventory
from reliability.common import Tally
from tests.support.crash import Zygote, is_dead

NAMED = ["save.write", "save.after_data_file:2", "tier.before_local_commit", "save.after_manifest",
         "tier.after_local_commit", "upload.start", "upload.after_file:2", "upload.before_manifest",
         "upload.after_manifest", "tier.after_local_delete", "retention.after_uncommit", "retention.between_deletes",
         "upload.before_manifest:3"]


def _log(path: str) -> Tuple[Dict[str, List[int]], List[str]]:
    events: Dict[str, List[int]] = {"begin": [], "local": [], "persistent": []}
    errors = []
    if os.path.exists(path):
        with open(path) as fh:
            for line in fh.read().splitlines():
                kind, _, rest = line.partition(" ")
                if kind == "error":
                    errors.append(rest)
                elif kind in events:
                    events[kind].append(int(rest))
    return events, errors


def _restart(url: str, local: str) -> Tuple[Optional[int], Optional[float]]:
    """A restarted job: restore the latest step, then close (which uploads what is owed)."""
    from reliability.tiered_child import make_model, value_of
    model = make_model()
    with CheckpointManager(url, max_to_keep=2, local_dir=local, local_max_to_keep=1) as mgr:
        got = mgr.restore(model=model)
    return (None, None) if got is None else (got.step, value_of(model))


def _check_persistent(url: str) -> List[int]:
    """Every committed step of the persistent tier is intact and nothing damaged shows; returns the steps."""
    entries = inventory.scan_directory(url)
    bad = [e.name for e in entries if e.status == "damaged"]
    assert not bad, f"damaged steps in the persistent tier: {bad}"
    checks = [c for c in inventory.verify(url) if c.status == "checked"] if entries else []
    broken = [c.uri for c in checks if not c.ok]
    assert not broken, f"committed but not intact: {broken}"
    return [e.step for e in entries if e.status == "committed"]


class _Run:
    """One pair of directories many savers are killed in; the checks after each kill."""

    def __init__(self, base: str, root: str, zygote: Zygote) -> None:
        self.url, self.local, self.log = f"{base}/{uuid.uuid4().hex[:8]}", os.path.join(root, "local"), \
            os.path.join(root, "log")
        self.zygote, self.seen = zygote, {"begin": 0, "local": 0, "persistent": 0}
        self.figures = {"restored_last_returned_save": 0, "restored_save_in_flight": 0, "uploaded_by_restart": 0,
                        "interrupted_uploads_seen": 0, "nothing_yet": 0}

    def round(self, delay: Optional[float], point: Optional[str]) -> None:
        open(self.log, "w").close()
        env = {"CKPTMGR_FAULT_POINT": point} if point else {}
        pid = self.zygote.fork_saver(url=self.url, local=self.local, log=self.log, env=env)
        deadline = time.monotonic() + (delay if delay is not None else 60)
        while not is_dead(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        if not is_dead(pid):
            os.kill(pid, 9)
        self.zygote.reap(pid)
        events, errors = _log(self.log)
        assert not errors, f"the saver failed: {errors[0]}"
        if point:
            assert events["begin"], f"{point}: the saver died before its first save"
        self._check(events)

    def _check(self, events: Dict[str, List[int]]) -> None:
        before = _check_persistent(self.url)
        if any(e.status == "uncommitted" for e in inventory.scan_directory(self.url)):
            self.figures["interrupted_uploads_seen"] += 1
        local = events["local"][-1] if events["local"] else None
        flight = events["begin"][-1] if events["begin"] and events["begin"][-1] != local else None
        step, value = _restart(self.url, self.local)
        allowed = {s for s in (local, flight) if s is not None} or {None}
        if local is None and flight is None:
            allowed = {step}
        if step not in allowed and not (local is None and step is not None and step < (flight or 0)):
            raise AssertionError(f"restored step {step}, expected one of {sorted(map(str, allowed))}")
        if step is None:
            self.figures["nothing_yet"] += 1
            return
        assert value == float(step), f"step {step} restored weights {value}"
        self.figures["restored_save_in_flight" if step == flight else "restored_last_returned_save"] += 1
        after = _check_persistent(self.url)
        assert step in after, f"step {step} is not persistent after the restarted manager closed ({after})"
        if step not in before:
            self.figures["uploaded_by_restart"] += 1


def run_tiered_kills(rounds: int, named_repeats: int, base: str, seed: int = 0,
                     points: Optional[List[str]] = None) -> Tally:
    """``rounds`` kills at random instants, then ``named_repeats`` at each of ``points`` (default :data:`NAMED`).

    ``base`` is where the persistent tiers go (``s3://bucket``).
    """
    tally = Tally("tiered: kill -9 during local commit, upload and retention")
    rng = random.Random(seed)
    zygote = Zygote("reliability.tiered_child", close_timeout=30)
    root = tempfile.mkdtemp(prefix="ckptmgr-tiered-")
    try:
        run = _Run(base, root, zygote)
        for i in range(rounds):
            delay = rng.uniform(0.3, 3.0)
            tally.trial(f"random kill {i} after {delay:.2f}s", lambda d=delay: run.round(d, None))
        for point in points or NAMED:
            for i in range(named_repeats):
                tally.trial(f"kill at {point} ({i})", lambda p=point: run.round(None, p))
        tally.figures.update(run.figures)
    finally:
        zygote.close()
        shutil.rmtree(root, ignore_errors=True)
    return tally


def _flip(path: str, rng: random.Random) -> None:
    with open(path, "r+b") as fh:
        size = fh.seek(0, 2)
        offset = rng.randrange(size)
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x01]))


def run_tiered_damage(n: int, base: str, seed: int = 0) -> Tally:
    """``n`` rounds of: save three steps, wipe the local tier or damage one of its files, restore."""
    from reliability.tiered_child import make_model, value_of
    tally = Tally("tiered: wiped and damaged local tiers")
    rng = random.Random(seed)
    figures = {"wiped": 0, "damaged_file": 0, "same_step_from_persistent": 0}

    def trial(i: int) -> None:
        url, local = f"{base}/damage-{uuid.uuid4().hex[:8]}", tempfile.mkdtemp(prefix="ckptmgr-tier-local-")
        try:
            model = make_model()
            with CheckpointManager(url, max_to_keep=2, local_dir=local) as mgr:
                for step in (1, 2, 3):
                    model.weight.data.fill_(step)
                    mgr.save(step, model=model, extra={"value": step})
            if i % 2 == 0:
                shutil.rmtree(local)
                figures["wiped"] += 1
            else:
                step_dir = os.path.join(local, "step_00000003")
                names = sorted(n for n in os.listdir(step_dir) if n != "manifest.json")
                _flip(os.path.join(step_dir, rng.choice(names)), rng)
                figures["damaged_file"] += 1
            fresh = make_model()
            with CheckpointManager(url, max_to_keep=2, local_dir=local) as mgr:
                got = mgr.restore(model=fresh)
            assert got is not None and got.step == 3, f"restored {got and got.step}, not step 3"
            assert got.path == f"{url}/step_00000003", f"read from {got.path}, not the persistent copy"
            assert value_of(fresh) == 3.0
            figures["same_step_from_persistent"] += 1
        finally:
            shutil.rmtree(local, ignore_errors=True)
    for i in range(n):
        tally.trial(f"round {i}", lambda i=i: trial(i))
    tally.figures.update(figures)
    return tally
