"""M3: what checkpointing costs a CPU training loop (torch.set_num_threads(1)).

The same loop runs without checkpoints, with sync checkpoints and with async
checkpoints every K steps; M3 = (async - none) / (sync - none).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from common import base_parser, interleave, machine, make_state, median, run_in_scratch, timed  # noqa: E402

import ckptmgr  # noqa: E402


def run(state_mib: float, repeats: int, scratch: str, steps: int, every: int, batch: int) -> dict:
    torch.set_num_threads(1)
    model, opt, nbytes = make_state(state_mib)
    width = model[0].in_features
    x = torch.randn(batch, width)
    managers = {
        "sync": ckptmgr.CheckpointManager(os.path.join(scratch, "sync"), max_to_keep=1),
        "async": ckptmgr.CheckpointManager(os.path.join(scratch, "async"), max_to_keep=1, async_save=True),
    }
    counters = {"sync": 0, "async": 0}

    def loop(kind):
        def train():
            for step in range(1, steps + 1):
                loss = model(x).square().mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if kind != "none" and step % every == 0:
                    counters[kind] += 1
                    managers[kind].save(counters[kind], model=model, optimizer=opt)
            if kind == "async":
                managers[kind].wait()  # the loop is not done until its last checkpoint is durable
        return lambda: timed(train)

    samples = interleave({"none": loop("none"), "sync": loop("sync"), "async": loop("async")}, repeats)
    for manager in managers.values():
        manager.close()
    med = {name: median(values) for name, values in samples.items()}
    sync_cost = med["sync"] - med["none"]
    return {
        "metric": "train_loop", "state_bytes": nbytes, "repeats": repeats, "steps": steps, "every": every,
        "checkpoints_per_run": steps // every, "machine": machine(), "median_seconds": med, "samples": samples,
        "M3_async_overhead_over_sync_overhead": (med["async"] - med["none"]) / sync_cost if sync_cost > 0 else None,
    }


def main(argv=None) -> dict:
    parser = base_parser(__doc__)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)
    return run_in_scratch("loop", args, lambda scratch: run(args.state_mib, args.repeats, scratch, args.steps,
                                                             args.every, args.batch))


if __name__ == "__main__":
    main()
