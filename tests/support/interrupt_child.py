"""A training script that is stopped while a checkpoint is being written (driven by tests/manager/test_interrupt.py).

``python -m tests.support.interrupt_child DIR MODE GATE``: saves step 0 of a
small model into DIR and then, by MODE, ``wait()``s for it (``wait``), starts
step 1 while step 0 is in flight (``backpressure``), returns from the script
at once (``exit``), or saves synchronously (``sync``). The step's files are
held back until the file ``GATE/go`` exists (``GATE/started`` says the save
got there), so the test can send SIGINT at a known instant: while the save is
in flight. Stopping the writer at a gate is the only thing patched.
"""
import logging
import os
import signal
import sys
import time

import torch
from torch import nn

import ckptmgr
from ckptmgr.step import formats


def _gated(write):
    def gated(*args, **kwargs):
        open(os.path.join(GATE, "started"), "w").close()
        deadline = time.monotonic() + 120
        while not os.path.exists(os.path.join(GATE, "go")) and time.monotonic() < deadline:
            time.sleep(0.02)
        return write(*args, **kwargs)
    return gated


if __name__ == "__main__":
    directory, mode, GATE = sys.argv[1:4]
    # Ctrl-C as in a terminal: a test run started in the background (nohup, some CI runners) leaves SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(message)s")
    formats.PlainFormat.write = _gated(formats.PlainFormat.write)
    torch.manual_seed(0)
    model = nn.Linear(32, 32)
    mgr = ckptmgr.CheckpointManager(directory, async_save=mode != "sync")
    mgr.save(0, model=model)
    if mode == "wait":
        mgr.wait()
    elif mode == "backpressure":
        mgr.save(1, model=model)
    print("script ended", flush=True)
