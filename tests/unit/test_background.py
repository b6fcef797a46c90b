"""Background work yields to the caller: a lower CPU priority, and no more file threads than training leaves."""
import os
import sys
import threading

import pytest
import torch

from ckptmgr.step import background, files
from ckptmgr.step.background import Background


def _jobs(seen):
    return {name: (lambda name=name: seen.append((name, threading.current_thread().name))) for name in "abc"}


def test_without_spare_cores_the_files_of_a_step_are_written_on_the_calling_thread(monkeypatch):
    monkeypatch.setattr(files, "usable_cpus", lambda: 2)
    before = torch.get_num_threads()
    torch.set_num_threads(2)                      # training's torch ops take both cores
    try:
        seen = []
        with files.spare_cores() as spare:
            assert spare == 1
            files.run_concurrently(_jobs(seen), "t")
            assert {thread for _, thread in seen} == {threading.current_thread().name}
            seen.clear()
            files.run_concurrently(_jobs(seen), "t", cpu_bound=False)   # uploads keep their threads
            assert all(thread.startswith("t") for _, thread in seen)
        seen.clear()
        files.run_concurrently(_jobs(seen), "t")   # outside: every worker
        assert len(seen) == 3 and all(thread.startswith("t") for _, thread in seen)
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux behaviour")
def test_background_jobs_run_at_a_lower_priority_and_their_errors_come_back():
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    worker = Background("ckptmgr-test")
    got = []
    worker.submit(lambda: got.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
    worker.wait()
    assert got == [min(19, mine + background.NICE)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine   # the caller is untouched
    worker.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        worker.close()
