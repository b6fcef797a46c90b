"""M3: what checkpointing costs a CPU training loop (torch.set_num_threads(1)), ckptmgr and dcp.async_save.

One training loop runs in segments: a segment is a save (or none) followed by
K training steps, and ends when that save is durable (an async save that is
not done after K steps is waited for, as the next save's back-pressure would).
That is what a long run with a save every K steps costs per save. Segments of
the four variants (no save, ckptmgr sync, ckptmgr async, ``dcp.async_save``)
are interleaved, a round of all four after another, and a variant's cost is
the median over rounds of its segment time minus the no-save segment of the
same round, so a noisy neighbour or a slow spell hits every variant alike.
The order changes from round to round so that each variant follows each
other one equally often (a Williams design). In a fixed order the no-save
segment always came right after ``dcp.async_save``'s, and the sync save's
cost read less than the sync save itself takes (0.22-0.24 s against
0.28-0.44 s, in three full runs), which is impossible: the loop waits for all
of it. With the order varied it read 0.32 s.

M3  (async - none) / (sync - none): the share of a sync save's cost an async save still costs the loop
    (async - none) / (dcp.async_save - none): ckptmgr's async overhead against DCP's, same loop
    (dcp.async_save - none) / (sync - none): DCP's async overhead, in units of a ckptmgr sync save
"""
from __future__ import annotations

import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from common import base_parser, interleave, machine, make_state, median, run_in_scratch, timed  # noqa: E402
from common import settle as settle_managers  # noqa: E402
from peers import Peers  # noqa: E402

import ckptmgr  # noqa: E402


def run(state_mib: float, repeats: int, scratch: str, every: int, batch: int) -> dict:
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

    def train_step():
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def segment(kind):
        def steps():
            pending = None
            if kind == "dcp_async":
                counters[kind] += 1
                pending = peers.dcp_async_save(os.path.join(scratch, f"dcp-{counters[kind]}"))
            elif kind != "none":
                counters[kind] += 1
                managers[kind].save(counters[kind], model=model, optimizer=opt)
            for _ in range(every):
                train_step()
            if pending is not None:
                pending.result()
            if kind == "async":
                managers[kind].wait()  # the segment ends when its checkpoint is durable

        def run_one():
            settle()
            return timed(steps)
        return run_one

    def settle():
        # Every segment starts with no delete pending, outside the clock, so that no variant's delete runs in
        # another variant's segment (unlinking 512 MiB takes about 0.2 s of this disk, mounted with `discard`):
        # DCP's previous checkpoints are removed here (DCP has no retention), and a manager's background delete
        # of the step its retention dropped (max_to_keep=1), which starts during its own segment, is waited for
        # if it is still running; then os.sync().
        for name in os.listdir(scratch):
            if name.startswith("dcp-"):
                shutil.rmtree(os.path.join(scratch, name))
        settle_managers(managers.values())

    variants = {"none": segment("none"), "sync": segment("sync"), "async": segment("async"),
                "dcp_async": segment("dcp_async")}
    for variant in variants.values():  # warm-up, not kept
        variant()
    samples = interleave(variants, repeats, balanced=True)
    for manager in managers.values():
        manager.close()
    med = {name: median(values) for name, values in samples.items()}

    def cost(name):
        # Median of the per-round differences: each round's segments ran back to back, so a slow spell
        # (step times drift 2x on a shared VM) cancels within the round instead of swamping the medians.
        return median([a - b for a, b in zip(samples[name], samples["none"])])
    sync_cost, async_cost, dcp_cost = cost("sync"), cost("async"), cost("dcp_async")
    return {
        "metric": "train_loop", "state_bytes": nbytes, "repeats": repeats, "every": every,
        "machine": machine(), "median_seconds": med, "samples": samples,
        "loop_overhead_seconds": {"sync": sync_cost, "async": async_cost, "dcp_async": dcp_cost},
        "M3_async_overhead_over_sync_overhead": async_cost / sync_cost if sync_cost > 0 else None,
        "M3_async_overhead_vs_dcp_async": async_cost / dcp_cost if dcp_cost > 0 else None,
        "M3_dcp_async_overhead_over_sync_overhead": dcp_cost / sync_cost if sync_cost > 0 else None,
    }


def main(argv=None) -> dict:
    parser = base_parser(__doc__)
    # Short segments, many of them: step times drift (2x over minutes on a shared VM), and a drift hits
    # interleaved short segments of every variant alike. Single steps still vary by 20-40% here, so a
    # round's differences scatter by several tenths of a second: run_all's full run takes 24 rounds.
    parser.set_defaults(repeats=9)
    parser.add_argument("--every", type=int, default=4, help="training steps after each save (one segment)")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)
    return run_in_scratch("loop", args, lambda scratch: run(args.state_mib, args.repeats, scratch, args.every,
                                                             args.batch))


if __name__ == "__main__":
    main()
