"""The tiered crash scenario's saver, forked from a zygote that imported torch and ckptmgr once.

    stdin  <- {"url": ..., "local": ..., "log": ..., "env": {...}}
    stdout -> PID            (the saver; the scenario kills it, or it kills itself at a fault point)
    stdin  <- "wait PID"
    stdout -> "reaped PID"

The saver saves new steps with a tiered manager forever, logging with single
O_APPEND writes ``begin V`` before a save, ``local V`` once ``save`` returned
(committed on the local tier) and ``persistent V`` once ``wait`` returned.
"""
from __future__ import annotations

import os

import torch
from torch import nn

import ckptmgr  # noqa: F401  (imported once, before forking)
from tests.support.crash import serve

MAX_TO_KEEP, LOCAL_MAX_TO_KEEP = 2, 1


def make_model() -> nn.Module:
    return nn.Linear(64, 64)


def value_of(model: nn.Module) -> float:
    return float(model.weight.detach().flatten()[0])


def save_forever(url: str, local: str, log: str) -> None:
    from ckptmgr import CheckpointManager
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    mgr = CheckpointManager(url, max_to_keep=MAX_TO_KEEP, local_dir=local, local_max_to_keep=LOCAL_MAX_TO_KEEP)
    model = make_model()
    step = (mgr.latest_step() or 0) + 1
    while True:
        with torch.no_grad():
            model.weight.fill_(step)
        os.write(fd, f"begin {step}\n".encode())
        mgr.save(step, model=model, extra={"value": step})
        os.write(fd, f"local {step}\n".encode())
        mgr.wait()
        os.write(fd, f"persistent {step}\n".encode())
        step += 1


def zygote() -> None:
    torch.set_num_threads(1)
    make_model()
    serve(lambda job: save_forever(job["url"], job["local"], job["log"]))


if __name__ == "__main__":
    zygote()
