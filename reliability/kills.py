"""Scenario 1: kill -9 during saves (sync and async), at random instants and at named fault points.

Reuses the crash harness of tests/manager/test_crash.py: a zygote forks a saver
(tests/support/crash_child.py) that saves steps forever with max_to_keep=3
and logs "begin V"/"end V" around each save. A round either kills it after a
random delay, or arms ``CKPTMGR_FAULT_POINT`` so it SIGKILLs itself at a named
instant. After each kill this process (a new one, for the directory) checks:

* the latest step restores (nothing unloadable), and equals the previous
  committed step or the one in flight;
* every listed step restores, with the values it was saved with;
* the two newest steps the log says were committed are still listed
  (retention never deletes a step the policy keeps);
* leftovers do not pile up: what a killed process left (a save's temporary
  directory, the steps a retention pass had uncommitted but not yet deleted)
  is gone once a later process committed a save, since its first save cleans
  before it writes; and at most one lease-record temp file is ever there. (One retention pass can leave two uncommitted
  steps: when the killed process had committed a step but died before its
  retention, the next commit drops two steps at once.)

There is no separate "latest" hint file: the newest committed step directory
is the latest. The instant between a durable manifest and the rename into
place is the point ``save.after_manifest``.
"""
from __future__ import annotations

import os
import random
import tempfile
import time
from typing import List, Optional

import torch

from ckptmgr import CheckpointManager
from reliability.common import Tally
from tests.support import crash_child as _crash_child
from tests.support.crash import Zygote, is_dead

NAMED = ["save.prepare", "save.write", "save.after_data_file:1", "save.after_data_file:2", "save.after_data_file:3",
         "save.after_data_file:4", "save.before_manifest", "save.after_manifest", "save.after_rename",
         "save.before_manifest:5", "save.after_manifest:5", "retention.after_uncommit", "retention.between_deletes",
         "retention.after_uncommit:2"]


_OUTCOMES = {"previous": 0, "new": 0, "idle": 0, "lost_to_retention": 0, "unloadable": 0, "leftovers_piling_up": 0}


def _events(log: str, seen: int):
    with open(log) as fh:
        lines = fh.read().splitlines()
    new = [line.split(" ", 1) for line in lines[seen:]]
    errors = [rest for kind, rest in new if kind == "error"]
    if errors:
        raise AssertionError(f"the saver failed: {errors[0]}")
    return [(kind, int(value)) for kind, value in new], len(lines)


def _restore(directory: str, step: Optional[int]):
    model = _crash_child.make_model()
    with CheckpointManager(directory, max_to_keep=None) as mgr:
        got = mgr.restore(step, model=model, optimizer=torch.optim.Adam(model.parameters()))
    if got is None:
        raise AssertionError(f"nothing restored for step {step}")
    return got.extra["value"], _crash_child.weights_value(model)


class _Run:
    """One directory that many savers are killed in, and the checks after each kill."""

    def __init__(self, root: str, zygote: Zygote, async_save: bool) -> None:
        self.directory, self.log = os.path.join(root, "run"), os.path.join(root, "log")
        self.zygote, self.async_save = zygote, async_save
        self.seen, self.latest, self.committed = 0, None, []  # committed: steps the log says ended
        self.leftovers: List[str] = []  # temporary directories the last check found
        self.outcomes = dict(_OUTCOMES)

    def round(self, delay: Optional[float] = None, point: Optional[str] = None) -> None:
        env = {"CKPTMGR_FAULT_POINT": point} if point else {}
        pid = self.zygote.fork_saver(directory=self.directory, log=self.log, mode="steps", value=0, env=env,
                                     **{"async": self.async_save})
        if point:
            deadline = time.monotonic() + 20
            while not is_dead(pid) and time.monotonic() < deadline:
                time.sleep(0.005)
            reached = is_dead(pid)
        else:
            time.sleep(delay or 0.0)
        self.zygote.kill(pid)
        if point and not reached:
            raise AssertionError(f"{point} was never reached")
        self.check()

    def check(self) -> None:
        events, self.seen = _events(self.log, self.seen)
        ends = [v for kind, v in events if kind == "end"]
        begins = [v for kind, v in events if kind == "begin"]
        previous = ends[-1] if ends else self.latest
        in_flight = begins[-1] if begins and (not ends or begins[-1] > ends[-1]) else None
        steps = CheckpointManager(self.directory).all_steps()
        now = steps[-1] if steps else None
        self.latest = now
        self.committed.extend(ends + ([now] if now is not None and now == in_flight else []))
        if now not in ({previous, in_flight} - {None}) and not (now is None and previous is None):
            raise AssertionError(f"latest is {now}, expected previous {previous} or new {in_flight}")
        self.outcomes["idle" if in_flight is None else "new" if now == in_flight else "previous"] += 1
        self._check_leftovers(committed_a_save=bool(ends) or (now is not None and now == in_flight))
        lost = [s for s in sorted(set(self.committed))[-3:] if s not in steps]  # max_to_keep=3 keeps these
        if lost:
            self.outcomes["lost_to_retention"] += 1
            raise AssertionError(f"committed steps {lost} are gone (listed: {steps})")
        for step in ([None] if steps else []) + steps:
            got = _restore(self.directory, step)
            want = float(step if step is not None else now)
            if got != (want, want):
                self.outcomes["unloadable"] += 1
                raise AssertionError(f"step {step} restored as {got}, saved as {want}")


    def _check_leftovers(self, committed_a_save: bool) -> None:
        names = os.listdir(self.directory) if os.path.isdir(self.directory) else []
        temps = sorted(n for n in names if n.startswith((".tmp-", ".old-")))
        records = [n for n in names if n.startswith(".") and n.endswith(".tmp") and n not in temps]
        survivors = sorted(set(self.leftovers) & set(temps)) if committed_a_save else []
        self.leftovers = temps
        if survivors or len(records) > 1:
            self.outcomes["leftovers_piling_up"] += 1
            raise AssertionError(f"leftovers pile up: {survivors or records} outlived a process that committed "
                                 f"a save (left: {sorted(temps + records)})")


def run_kills(n: int, async_save: bool, seed: int = 0) -> Tally:
    """``n`` kills after random delays (0-250 ms) in one directory."""
    tally = Tally(f"kill -9 at random instants ({'async' if async_save else 'sync'})")
    rng = random.Random(seed + async_save)
    zygote = Zygote()
    with tempfile.TemporaryDirectory() as root:
        run = _Run(root, zygote, async_save)
        for i in range(n):
            delay = rng.uniform(0.0, 0.25)
            tally.trial(f"kill {i} after {delay * 1000:.0f} ms", lambda delay=delay: run.round(delay=delay))
        tally.figures = dict(run.outcomes)
    zygote.close()
    return tally


def run_named(points: List[str] = NAMED, repeats: int = 1, async_save: bool = False) -> Tally:
    """A kill at each named fault point (``repeats`` times each), one fresh directory per point."""
    tally = Tally(f"kill -9 at named points ({'async' if async_save else 'sync'})")
    zygote = Zygote()
    outcomes = dict(_OUTCOMES)
    for point in points:
        with tempfile.TemporaryDirectory() as root:
            run = _Run(root, zygote, async_save)
            for i in range(repeats):
                tally.trial(f"{point} #{i}", lambda run=run, point=point: run.round(point=point))
            for key, value in run.outcomes.items():
                outcomes[key] += value
    tally.figures = outcomes
    zygote.close()
    return tally
