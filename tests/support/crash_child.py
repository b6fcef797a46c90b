"""The crash test's saver, and a zygote that forks savers fast.

Starting Python and importing torch takes seconds; the crash test needs
dozens of processes to kill. So one zygote process imports everything once
(and runs no torch ops, so forking it is safe), then forks a saver per request:

    stdin  <- {"directory": ..., "log": ..., "mode": "steps"|"force", "value": N, "env": {...}}
    stdout -> PID          (the saver's pid; the test kills it with SIGKILL)
    stdin  <- "wait PID"
    stdout -> "reaped PID"  (the saver is gone; the directory will not change any more)

Each saver appends "begin V" before and "end V" after every save to its log,
with single O_APPEND writes, so the log says what was in flight when it died.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from ckptmgr import CheckpointManager  # the API loads once here, before forking
from tests.support.crash import serve


def weights_value(model: nn.Module) -> float:
    return float(model.weight.detach().flatten()[0])


def make_model() -> nn.Module:
    return nn.Linear(128, 128)


def save_forever(directory: str, log: str, mode: str, value: int, async_save: bool = False) -> None:
    """Save checkpoints until killed: new steps (max_to_keep=3), or step 1 again and again with force.

    With ``async_save`` each save is followed by ``wait()``, so "end V" still
    means "V is committed"; the kill lands in the background writer's work.
    """
    torch.set_num_threads(1)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    mgr = CheckpointManager(directory, max_to_keep=3, async_save=async_save)
    model = make_model()
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 128)).sum().backward()
    opt.step()
    step = (mgr.latest_step() or 0) + 1 if mode == "steps" else 1
    if mode == "steps":
        value = step
    while True:
        with torch.no_grad():
            model.weight.fill_(value)
            model.bias.fill_(-value)
        os.write(fd, f"begin {value}\n".encode())
        mgr.save(step, model=model, optimizer=opt, extra={"value": value}, force=mode == "force")
        if async_save:
            with torch.no_grad():  # the background writer must not see this: it works on a staged copy
                model.weight.fill_(-1.0)
            mgr.wait()
        os.write(fd, f"end {value}\n".encode())
        value += 1
        if mode == "steps":
            step = value


def zygote() -> None:
    torch.set_num_threads(1)  # no intra-op thread pool in the zygote: forking it stays safe
    model = make_model()      # optimizers import more of torch on first construction; do it once here
    torch.optim.Adam(model.parameters())
    serve(lambda job: save_forever(job["directory"], job["log"], job["mode"], job["value"], job.get("async", False)))


if __name__ == "__main__":
    zygote()
