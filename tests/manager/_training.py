"""A tiny training loop whose result depends on weights, optimizer, scheduler, scaler and every RNG.

Run as a module it is the "new process" half of the continuity test:
``python -m tests.manager._training CKPT_DIR STEPS OUT`` resumes from CKPT_DIR,
trains STEPS more steps and writes the final weights to OUT (safetensors).
"""
from __future__ import annotations

import random
import sys

import numpy as np
import torch

from tests.manager.helpers import SmallNet


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def build(init_seed: int):
    """Model, two optimizers, two schedulers and a grad scaler; ``init_seed`` sets the initial weights."""
    torch.set_num_threads(1)   # same reduction order in every process
    torch.manual_seed(init_seed)
    model = SmallNet()
    optimizers = {"body": torch.optim.AdamW(list(model.fc1.parameters()) + list(model.bn.parameters()), lr=1e-2),
                  "head": torch.optim.SGD(model.fc2.parameters(), lr=0.05, momentum=0.9)}
    schedulers = {"body": torch.optim.lr_scheduler.OneCycleLR(optimizers["body"], max_lr=0.05, total_steps=40),
                  "head": torch.optim.lr_scheduler.LambdaLR(optimizers["head"], lambda s: 1.0 / (1 + 0.1 * s))}
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=3)
    return model, optimizers, schedulers, scaler


def train(model, optimizers, schedulers, scaler, steps: int) -> None:
    """Each step draws from torch (data, dropout), NumPy (noise) and Python random (scale)."""
    model.train()
    for _ in range(steps):
        x = torch.randn(16, 8) + float(np.random.rand()) * random.random()
        y = (x.sum(dim=1) > 0).long()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        for opt in optimizers.values():
            scaler.step(opt)
            opt.zero_grad()
        scaler.update()
        for sched in schedulers.values():
            sched.step()


def main(directory: str, steps: int, out: str) -> None:
    from safetensors.torch import save_file

    import ckptmgr
    model, optimizers, schedulers, scaler = build(init_seed=999)   # different weights: restore must fix them
    seed_everything(12345)                                          # different RNG: restore must fix it
    start = ckptmgr.resume_from_latest(directory, model=model, optimizer=optimizers, scheduler=schedulers,
                                       scaler=scaler)
    if start != 11:
        raise SystemExit(f"expected to resume at step 11, got {start}")
    train(model, optimizers, schedulers, scaler, steps)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
