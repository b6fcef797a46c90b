"""Ctrl-C (a real SIGINT to a real child process) never loses the checkpoint being written.

The child (tests/support/interrupt_child.py) holds its save at a gate; the
test sends SIGINT while the main thread is blocked in ``wait()``, in a
back-pressured ``save()`` or inside a sync ``save()``, or lets the script
return with an async save in flight, then opens the gate. Every way, step 0
must end up committed, nothing temporary left behind, and the log must say
what the process was waiting for.
"""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from ckptmgr import CheckpointManager
from tests.manager.helpers import tmp_names

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _wait_for(predicate, seconds=60.0):
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    return predicate()


def _run(tmp_path, mode, interrupt):
    run, gate, log = tmp_path / "run", tmp_path / "gate", tmp_path / "stderr.txt"
    gate.mkdir()
    with open(log, "w") as err:
        child = subprocess.Popen([sys.executable, "-m", "tests.support.interrupt_child", str(run), mode, str(gate)],
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        assert _wait_for(lambda: (gate / "started").exists()), "the child never reached its save"
        if interrupt:
            time.sleep(0.2)  # let the main thread block in the call under test
            child.send_signal(signal.SIGINT)
        # The line appears while the save is held at the gate (not at all on a build that loses the save).
        _wait_for(lambda: "finishing checkpoint step 0 before exit" in log.read_text(), 20)
        (gate / "go").touch()
        out, _ = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    return child.returncode, out, log.read_text(), str(run)


def _assert_step_0_committed(run):
    assert tmp_names(run) == []
    mgr = CheckpointManager(run)
    assert mgr.all_steps() == [0]
    torch.manual_seed(0)
    expected = nn.Linear(32, 32)
    fresh = nn.Linear(32, 32)
    mgr.restore(model=fresh)
    assert torch.equal(fresh.weight, expected.weight)


@pytest.mark.parametrize("mode", ["wait", "backpressure", "sync"])
def test_ctrl_c_during_a_save_commits_it_then_stops(tmp_path, mode):
    rc, out, err, run = _run(tmp_path, mode, interrupt=True)
    assert "Ctrl-C: finishing checkpoint step 0 before exit" in err
    assert rc == -signal.SIGINT, err          # the KeyboardInterrupt still ends the program
    assert "script ended" not in out
    assert "KeyboardInterrupt" in err
    _assert_step_0_committed(run)             # backpressure: step 1 was never started


def test_script_ending_with_an_async_save_in_flight_finishes_it(tmp_path):
    rc, out, err, run = _run(tmp_path, "exit", interrupt=False)
    assert rc == 0, err
    assert "script ended" in out
    assert "finishing checkpoint step 0 before exit" in err
    assert "cannot schedule new futures" not in err
    _assert_step_0_committed(run)
