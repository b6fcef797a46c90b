"""One rank of the two-"node" tiered job in test_tiered_nodes.py (run under torchrun).

It trains a small MLP with dropout, AdamW and a cosine schedule on data that
depends on the step only, so a resumed run computes exactly what an
uninterrupted one does. Gradients are averaged with one all-reduce per
parameter rather than DDP: with 4 ranks the float sum depends on where a
gradient sits in DDP's bucket, and DDP lays its buckets out again after the
first iteration of every process, so a resumed DDP run is not bit-identical to
an uninterrupted one (with 2 ranks the sum is symmetric and it is). It restores the latest step from a tiered
CheckpointManager (``--local-dir``; the persistent tier is ``--dir``), trains up
to ``--stop-at``, saves every ``--save-every`` steps, and prints one JSON line
per event: ``start`` (its pid), ``resumed`` (step and where it read from),
``done`` (a sha256 of the model's weights).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from datetime import timedelta


def _say(**event) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _batch(step: int, rank: int, world: int):
    import torch
    teacher = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1000 + step))
    y = (x @ teacher).argmax(dim=1)
    return x[rank::world], y[rank::world]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--local-dir", default=None)
    parser.add_argument("--steps", type=int, default=30, help="length of the LR schedule")
    parser.add_argument("--stop-at", type=int, default=30)
    parser.add_argument("--save-every", type=int, default=5)
    parser.add_argument("--keep", type=int, default=3)
    args = parser.parse_args()

    import torch
    import torch.distributed as tdist
    from torch import nn

    import ckptmgr

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = tdist.get_rank(), tdist.get_world_size()
    _say(event="start", rank=rank, pid=os.getpid(), local_dir=args.local_dir)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    ddp = model   # gradients are averaged by hand below, one all-reduce per parameter
    torch.manual_seed(100 + rank)
    manager = ckptmgr.CheckpointManager(args.dir, max_to_keep=args.keep, local_dir=args.local_dir)
    restored = manager.restore(model=ddp, optimizer=optimizer, scheduler=scheduler)
    start = 0 if restored is None else restored.step + 1
    _say(event="resumed", rank=rank, step=None if restored is None else restored.step,
         path=None if restored is None else restored.path)
    for step in range(start, args.stop_at):
        x, y = _batch(step, rank, world)
        loss = nn.functional.cross_entropy(ddp(x), y)
        optimizer.zero_grad()
        loss.backward()
        for param in model.parameters():   # fixed order and sizes: the same float sums in every run
            tdist.all_reduce(param.grad)
            param.grad /= world
        optimizer.step()
        scheduler.step()
        if step % args.save_every == args.save_every - 1:
            manager.save(step, model=ddp, optimizer=optimizer, scheduler=scheduler, metrics={"loss": loss.item()})
            _say(event="saved", rank=rank, step=step)
    manager.close()   # waits until the last step is persistent
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode() + value.detach().numpy().tobytes())
    _say(event="done", rank=rank, digest=digest.hexdigest())
    tdist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
