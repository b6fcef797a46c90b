"""Retention scaling: save time with N committed checkpoints in the directory / with 1.

Both managers keep everything (max_to_keep above N), so the figure measures
what listing and retention bookkeeping cost as a directory fills up, not deletes.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from common import base_parser, interleave, machine, median, run_in_scratch, timed  # noqa: E402
from torch import nn  # noqa: E402

import ckptmgr  # noqa: E402


def run(count: int, repeats: int, scratch: str) -> dict:
    torch.manual_seed(0)
    model = nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters())
    keep = count + 10 * repeats + 10
    full_dir, empty_dir = os.path.join(scratch, "full"), os.path.join(scratch, "one")
    filler = ckptmgr.CheckpointManager(full_dir, max_to_keep=keep)
    for step in range(count):
        filler.save(step, model=model, optimizer=opt)
    filler.close()
    seed = ckptmgr.CheckpointManager(empty_dir, max_to_keep=keep)
    seed.save(0, model=model, optimizer=opt)
    seed.close()
    # fresh managers, as a restarted job would open them
    full = ckptmgr.CheckpointManager(full_dir, max_to_keep=keep)
    one = ckptmgr.CheckpointManager(empty_dir, max_to_keep=keep)
    steps = {"full": count, "one": 1}

    def saver(name, manager):
        def save():
            step = steps[name]
            steps[name] += 1
            return timed(lambda: manager.save(step, model=model, optimizer=opt))
        return save

    samples = interleave({"one": saver("one", one), "full": saver("full", full)}, repeats)
    full.close()
    one.close()
    med = {name: median(values) for name, values in samples.items()}
    return {"metric": "retention", "checkpoints": count, "repeats": repeats, "machine": machine(),
            "median_seconds": med, "samples": samples, "retention_scaling": med["full"] / med["one"]}


def main(argv=None) -> dict:
    parser = base_parser(__doc__)
    parser.add_argument("--count", type=int, default=1000, help="committed checkpoints in the full directory")
    args = parser.parse_args(argv)
    return run_in_scratch("ret", args, lambda scratch: run(args.count, max(args.repeats, 9), scratch))


if __name__ == "__main__":
    main()
