"""Retention scaling: what a save costs with N committed checkpoints in the directory against with 1.

Directories hold committed checkpoints kept by ``keep_every_n_steps``: N in
one, 1 in the other (a pair for the benchmark's state, a pair for a tiny
model). Every manager uses ``max_to_keep=1`` on top, so each timed save also
uncommits the previous timed one: the figure covers listing, the retention
policy over N steps and the delete, as a real run would see them. The space
of deleted steps is freed in the background after a save returns; that is
let finish, for every manager, before the next timed save.

retention_scaling       save time with N checkpoints / with 1, saving the benchmark's state
                        (``--state-mib``, the size of a real save)
retention_overhead_ms   the same difference in milliseconds, measured with a tiny model
                        (a 64x64 Linear), where a save is almost nothing but bookkeeping
The N filler checkpoints are tiny: copies of one committed step with their
manifests rewritten (what they hold does not matter to the cost measured).
"""
from __future__ import annotations

import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from common import base_parser, interleave, machine, make_state, median, run_in_scratch, timed  # noqa: E402
from torch import nn  # noqa: E402

import ckptmgr  # noqa: E402
from ckptmgr.format.manifest import MANIFEST_NAME, Manifest  # noqa: E402

EVERY = 1_000_000  # filler steps are multiples of this, kept by keep_every_n_steps; timed saves are not


def fill(directory: str, count: int) -> None:
    """``count`` committed tiny checkpoints at steps 0, EVERY, 2*EVERY, ..."""
    model = nn.Linear(8, 8)
    with ckptmgr.CheckpointManager(directory, max_to_keep=None) as manager:
        manager.save(0, model=model)
    first = os.path.join(directory, "step_00000000")
    with open(os.path.join(first, MANIFEST_NAME), "rb") as fh:
        manifest = Manifest.from_bytes(fh.read())
    for k in range(1, count):
        step = k * EVERY
        target = os.path.join(directory, f"step_{step:08d}")
        shutil.copytree(first, target)
        manifest.step = step
        with open(os.path.join(target, MANIFEST_NAME), "wb") as fh:
            fh.write(manifest.to_bytes())


def run(count: int, repeats: int, scratch: str, state_mib: float) -> dict:
    model, opt, nbytes = make_state(state_mib)
    torch.manual_seed(0)
    tiny = nn.Linear(64, 64)
    tiny_opt = torch.optim.AdamW(tiny.parameters())
    managers = {}
    for name in ("full", "one", "full_tiny", "one_tiny"):
        fill(os.path.join(scratch, name), count if name.startswith("full") else 1)
        # fresh managers, as a restarted job would open them
        managers[name] = ckptmgr.CheckpointManager(os.path.join(scratch, name), max_to_keep=1,
                                                   keep_every_n_steps=EVERY)
    steps = {name: 1 for name in managers}

    def saver(name, net, optimizer):
        def save():
            step = steps[name]
            steps[name] += 1
            return timed(lambda: managers[name].save(step, model=net, optimizer=optimizer))
        return save

    def quiet():
        # Each save's retention frees the previous step's space in the background; let every manager's
        # finish outside the clock, so one directory's delete never lands in another's measured save.
        for manager in managers.values():
            manager._reclaimer.wait()

    variants = {"one": saver("one", model, opt), "full": saver("full", model, opt),
                "one_tiny": saver("one_tiny", tiny, tiny_opt), "full_tiny": saver("full_tiny", tiny, tiny_opt)}
    for variant in variants.values():  # warm-up: the first save lists the directory and removes leftovers
        quiet()
        variant()
    samples = interleave(variants, repeats, setup=quiet)
    listed = {name: len(manager.all_steps()) for name, manager in managers.items()}
    for manager in managers.values():
        manager.close()
    med = {name: median(values) for name, values in samples.items()}
    return {"metric": "retention", "checkpoints": count, "state_bytes": nbytes, "repeats": repeats,
            "machine": machine(), "median_seconds": med, "samples": samples, "committed_at_end": listed,
            "retention_scaling": med["full"] / med["one"],
            "retention_scaling_tiny": med["full_tiny"] / med["one_tiny"],
            "retention_overhead_ms": (med["full_tiny"] - med["one_tiny"]) * 1000}


def main(argv=None) -> dict:
    parser = base_parser(__doc__)
    parser.add_argument("--count", type=int, default=1000, help="committed checkpoints in the full directory")
    args = parser.parse_args(argv)
    return run_in_scratch("ret", args, lambda scratch: run(args.count, max(args.repeats, 9), scratch,
                                                            args.state_mib))


if __name__ == "__main__":
    main()
