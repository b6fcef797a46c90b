"""kill -9 during saves: the latest committed step is always the previous or the new one, and restorable.

CKPTMGR_CRASH_KILLS sets the number of kills (default 30; thousands for a soak run).
"""
import os
import random
import time

import pytest
import torch

from ckptmgr import CheckpointManager
from tests.manager.helpers import tmp_names
from tests.support import crash_child as _crash_child
from tests.support.crash import Zygote

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KILLS = int(os.environ.get("CKPTMGR_CRASH_KILLS", "30"))


@pytest.fixture
def zygote():
    z = Zygote()
    yield z
    z.close()


def _events(log, seen):
    with open(log) as fh:
        lines = fh.read().splitlines()
    new = [line.split(" ", 1) for line in lines[seen:]]
    for kind, rest in new:
        assert kind != "error", rest
    return [(kind, int(value)) for kind, value in new], len(lines)


def _check_restorable(directory, step):
    model = _crash_child.make_model()
    result = CheckpointManager(directory).restore(step, model=model, optimizer=torch.optim.Adam(model.parameters()))
    return result.extra["value"], _crash_child.weights_value(model)


def _delays(rng, count, longest):
    return [rng.uniform(0.0, longest) for _ in range(count)]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_kill_9_during_saves_never_loses_the_latest(tmp_path, zygote, async_save):
    directory, log = str(tmp_path / "run"), str(tmp_path / "log")
    rng = random.Random(int(os.environ.get("CKPTMGR_CRASH_SEED", "0")) + async_save)
    seen, latest, outcomes, leftovers = 0, None, {"previous": 0, "new": 0, "idle": 0, "temp_left": 0}, []
    kills = KILLS if not async_save else max(20, KILLS * 2 // 3)
    for delay in _delays(rng, kills, 0.25):
        pid = zygote.fork_saver(directory=directory, log=log, mode="steps", value=0, **{"async": async_save})
        time.sleep(delay)
        zygote.kill(pid)
        events, seen = _events(log, seen)
        ends = [v for kind, v in events if kind == "end"]
        begins = [v for kind, v in events if kind == "begin"]
        previous = ends[-1] if ends else latest
        in_flight = begins[-1] if begins and (not ends or begins[-1] > ends[-1]) else None
        now = CheckpointManager(directory).latest_step()
        assert now in {previous, in_flight} - {None} or (now is None and previous is None), (now, events)
        outcomes["idle" if in_flight is None else "new" if now == in_flight else "previous"] += 1
        if now is not None:
            assert _check_restorable(directory, None) == (now, float(now))
            for step in CheckpointManager(directory).all_steps():   # every listed step restores
                assert _check_restorable(directory, step) == (step, float(step))
        if ends:   # a save completed in this round: the previous round's leftovers must be gone
            for names in leftovers:
                assert not set(names) & set(os.listdir(directory)), names
            leftovers = []
        leftovers.append(tmp_names(directory) if os.path.isdir(directory) else [])
        outcomes["temp_left"] += bool(leftovers[-1])
        latest = now
    model = _crash_child.make_model()
    with CheckpointManager(directory, max_to_keep=3) as mgr:  # close(): deferred deletes have finished
        mgr.save((latest or 0) + 1, model=model)
    assert tmp_names(directory) == []
    assert outcomes["previous"] + outcomes["new"] > 0, outcomes
    print(f"\ncrash test ({'async' if async_save else 'sync'}): {kills} kills, outcomes {outcomes}")


@pytest.mark.timeout(600)
def test_kill_9_during_forced_overwrites_keeps_old_or_new(tmp_path, zygote):
    directory, log = str(tmp_path / "run"), str(tmp_path / "log")
    rng = random.Random(int(os.environ.get("CKPTMGR_CRASH_SEED", "0")) + 1)
    seen, current, outcomes = 0, None, {"previous": 0, "new": 0, "idle": 0}
    for round_no, delay in enumerate(_delays(rng, max(10, KILLS // 3), 0.2)):
        pid = zygote.fork_saver(directory=directory, log=log, mode="force", value=1000 * (round_no + 1))
        time.sleep(delay)
        zygote.kill(pid)
        events, seen = _events(log, seen)
        ends = [v for kind, v in events if kind == "end"]
        begins = [v for kind, v in events if kind == "begin"]
        previous = ends[-1] if ends else current
        in_flight = begins[-1] if begins and (not ends or begins[-1] > ends[-1]) else None
        steps = CheckpointManager(directory).all_steps()
        if previous is None and steps == []:
            outcomes["idle"] += 1
            continue
        assert steps == [1]
        value, weight = _check_restorable(directory, 1)
        assert value == weight and value in {previous, in_flight}, (value, events)
        outcomes["idle" if in_flight is None else "new" if value == in_flight else "previous"] += 1
        current = value
    with CheckpointManager(directory) as mgr:
        mgr.save(2, model=_crash_child.make_model())
    assert tmp_names(directory) == []
    print(f"\nforced-overwrite crash test: outcomes {outcomes}")
