"""M3: what checkpointing costs a CPU training loop (torch.set_num_threads(1)), ckptmgr and dcp.async_save.

The same loop runs without checkpoints, with ckptmgr sync saves, with ckptmgr
async saves and with ``dcp.async_save``, a save every K steps. Every save has
K training steps after it before the loop ends (a long run's saves are
followed by training, not by the end of the job); the loop's time still ends
only when its last checkpoint is durable, so nothing is left unfinished.

M3  (async - none) / (sync - none): the share of a sync save's cost an async save still costs the loop
    (async - none) / (dcp.async_save - none): ckptmgr's async overhead against DCP's, same loop
    (dcp.async_save - none) / (sync - none): DCP's async overhead, in units of a ckptmgr sync save
Like ckptmgr's back-pressure, the loop waits for DCP's previous save before starting the next.
"""
from __future__ import annotations

import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from common import base_parser, interleave, machine, make_state, median, run_in_scratch, timed  # noqa: E402
from peers import Peers  # noqa: E402

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
    peers = Peers(model, opt, scratch, accelerate=False)
    counters = {"sync": 0, "async": 0, "dcp_async": 0}
    saves = [step for step in range(every, steps - every + 1, every)]

    def dcp_dir(n):
        return os.path.join(scratch, f"dcp-{n}")

    def loop(kind):
        def train():
            pending = None
            for step in range(1, steps + 1):
                loss = model(x).square().mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if kind == "none" or step not in saves:
                    continue
                counters[kind] += 1
                if kind == "dcp_async":
                    if pending is not None:
                        pending.result()
                    pending = peers.dcp_async_save(dcp_dir(counters[kind]))
                else:
                    managers[kind].save(counters[kind], model=model, optimizer=opt)
            if pending is not None:
                pending.result()
            if kind == "async":
                managers[kind].wait()  # the loop is not done until its last checkpoint is durable

        def run_one():
            seconds = timed(train)
            for name in os.listdir(scratch):  # DCP's checkpoints: removed outside the clock
                if name.startswith("dcp-"):
                    shutil.rmtree(os.path.join(scratch, name))
            return seconds
        return run_one

    variants = {"none": loop("none"), "sync": loop("sync"), "async": loop("async"), "dcp_async": loop("dcp_async")}
    samples = interleave(variants, repeats)
    for manager in managers.values():
        manager.close()
    med = {name: median(values) for name, values in samples.items()}
    sync_cost = med["sync"] - med["none"]
    async_cost = med["async"] - med["none"]
    dcp_cost = med["dcp_async"] - med["none"]
    return {
        "metric": "train_loop", "state_bytes": nbytes, "repeats": repeats, "steps": steps, "every": every,
        "checkpoints_per_run": len(saves), "machine": machine(), "median_seconds": med, "samples": samples,
        "loop_overhead_seconds": {"sync": sync_cost, "async": async_cost, "dcp_async": dcp_cost},
        "M3_async_overhead_over_sync_overhead": async_cost / sync_cost if sync_cost > 0 else None,
        "M3_async_overhead_vs_dcp_async": async_cost / dcp_cost if dcp_cost > 0 else None,
        "M3_dcp_async_overhead_over_sync_overhead": dcp_cost / sync_cost if sync_cost > 0 else None,
    }


def main(argv=None) -> dict:
    parser = base_parser(__doc__)
    parser.add_argument("--steps", type=int, default=40, help="training steps per loop")
    parser.add_argument("--every", type=int, default=10, help="a save every this many steps (not at the last step)")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)
    return run_in_scratch("loop", args, lambda scratch: run(args.state_mib, args.repeats, scratch, args.steps,
                                                             args.every, args.batch))


if __name__ == "__main__":
    main()
