"""M1, M2, M6: durable save speed against raw write+fsync and torch.save+fsync; async blocking time.

M1  raw write+fsync time / manager sync save time   (throughput ratio; 1.0 = as fast as the disk)
    torch.save+fsync time / manager sync save time
M2  async save() blocking time / sync save time
M6  async save() call-to-committed time / sync save time
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from common import base_parser, fsync_path, interleave, machine, make_state, median, run_in_scratch, timed  # noqa: E402

import ckptmgr  # noqa: E402


def _raw_bytes(model, opt):
    """Zero-copy views of every byte the checkpoint holds (weights + Adam moments)."""
    views = [p.detach().reshape(-1).view(torch.uint8).numpy() for p in model.parameters()]
    for state in opt.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            views.append(state[key].reshape(-1).view(torch.uint8).numpy())
    return views


def run(state_mib: float, repeats: int, scratch: str) -> dict:
    model, opt, nbytes = make_state(state_mib)
    views = _raw_bytes(model, opt)
    raw_path = os.path.join(scratch, "raw.bin")
    pth_path = os.path.join(scratch, "torch.pth")
    sync_mgr = ckptmgr.CheckpointManager(os.path.join(scratch, "sync"), max_to_keep=1)
    async_mgr = ckptmgr.CheckpointManager(os.path.join(scratch, "async"), max_to_keep=1, async_save=True)
    step = {"sync": 0, "async": 0}
    blocking = []

    def drop(path):
        # Deleting the previous file is not part of a save (the manager frees dropped
        # steps' space after save returns), so the baselines do it outside the clock too.
        if os.path.exists(path):
            os.unlink(path)

    def raw():
        drop(raw_path)

        def write():
            with open(raw_path, "wb") as fh:
                for view in views:
                    fh.write(view)
                fh.flush()
                os.fsync(fh.fileno())
        return timed(write)

    def torch_save():
        drop(pth_path)

        def write():
            torch.save({"state_dict": model.state_dict(), "optimizer": opt.state_dict()}, pth_path)
            fsync_path(pth_path)
        return timed(write)

    def sync_save():
        step["sync"] += 1
        return timed(lambda: sync_mgr.save(step["sync"], model=model, optimizer=opt))

    def async_save():
        step["async"] += 1

        def save_and_commit():
            blocking.append(timed(lambda: async_mgr.save(step["async"], model=model, optimizer=opt)))
            async_mgr.wait()
        return timed(save_and_commit)

    samples = interleave({"raw": raw, "torch_save": torch_save, "sync": sync_save, "async_commit": async_save},
                         repeats)
    sync_mgr.close()
    async_mgr.close()
    med = {name: median(values) for name, values in samples.items()}
    med["async_blocking"] = median(blocking)
    return {
        "metric": "save", "state_bytes": nbytes, "repeats": repeats, "machine": machine(),
        "median_seconds": med, "samples": samples | {"async_blocking": blocking},
        "M1_vs_raw": med["raw"] / med["sync"],
        "M1_vs_torch_save": med["torch_save"] / med["sync"],
        "M2_async_blocking_over_sync": med["async_blocking"] / med["sync"],
        "M6_async_commit_over_sync": med["async_commit"] / med["sync"],
        "sync_MiB_per_s": nbytes / med["sync"] / 2 ** 20,
        "raw_MiB_per_s": nbytes / med["raw"] / 2 ** 20,
    }


def main(argv=None) -> dict:
    args = base_parser(__doc__).parse_args(argv)
    return run_in_scratch("save", args, lambda scratch: run(args.state_mib, args.repeats, scratch))


if __name__ == "__main__":
    main()
