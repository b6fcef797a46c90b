"""M1, M2, M6: durable save speed against raw write+fsync and the peers; async blocking time against dcp.async_save.

M1  raw write+fsync time / manager sync save time   (throughput ratio; 1.0 = as fast as the disk)
    fastest peer's durable save time / manager sync save time   (above 1: ckptmgr is faster)
    peers: torch.save+fsync, dcp.save, accelerate save_state+fsync (see peers.py)
M2  async save() blocking time / sync save time
    async save() blocking time / dcp.async_save() blocking time
M6  async save() call-to-committed time / sync save time
Every variant saves the same state, interleaved; each peer's previous files are
removed outside the clock, and every variant starts after the managers'
background deletes ended and ``os.sync()`` returned (a manager's delete would
otherwise run during the next variant's clock).
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from common import base_parser, interleave, machine, make_state, median, run_in_scratch, timed  # noqa: E402
from common import settle as settle_managers  # noqa: E402
from peers import PEER_SAVES, Peers, best  # noqa: E402

import ckptmgr  # noqa: E402


def _raw_bytes(model, opt):
    """Zero-copy views of every byte the checkpoint holds (weights + Adam moments)."""
    views = [p.detach().reshape(-1).view(torch.uint8).numpy() for p in model.parameters()]
    for state in opt.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            views.append(state[key].reshape(-1).view(torch.uint8).numpy())
    return views


def run(state_mib: float, repeats: int, scratch: str, with_accelerate: bool = True) -> dict:
    model, opt, nbytes = make_state(state_mib)
    views = _raw_bytes(model, opt)
    raw_path = os.path.join(scratch, "raw.bin")
    peers = Peers(model, opt, scratch, accelerate=with_accelerate)
    sync_mgr = ckptmgr.CheckpointManager(os.path.join(scratch, "sync"), max_to_keep=1)
    async_mgr = ckptmgr.CheckpointManager(os.path.join(scratch, "async"), max_to_keep=1, async_save=True)
    step = {"sync": 0, "async": 0}
    blocking = []
    dcp_blocking = []

    def settle():
        # Deleting the previous files is not part of a save (the managers free dropped steps' space
        # in a background thread after save returns; the baselines unlink theirs), so every variant
        # starts after those deletes and after os.sync() (common.settle).
        settle_managers((sync_mgr, async_mgr))

    def drop(path):
        if os.path.exists(path):
            os.unlink(path)
        settle()

    def raw():
        drop(raw_path)

        def write():
            with open(raw_path, "wb") as fh:
                for view in views:
                    fh.write(view)
                fh.flush()
                os.fsync(fh.fileno())
        return timed(write)

    def peer(what, save):
        def run_one():
            peers.drop(what)
            settle()
            return timed(save)
        return run_one

    def dcp_async():
        peers.drop("dcp")
        settle()

        def save_and_commit():
            start = time.perf_counter()
            future = peers.dcp_async_save()
            dcp_blocking.append(time.perf_counter() - start)
            future.result()
        return timed(save_and_commit)

    def sync_save():
        step["sync"] += 1
        settle()
        return timed(lambda: sync_mgr.save(step["sync"], model=model, optimizer=opt))

    def async_save():
        step["async"] += 1
        settle()

        def save_and_commit():
            blocking.append(timed(lambda: async_mgr.save(step["async"], model=model, optimizer=opt)))
            async_mgr.wait()
        return timed(save_and_commit)

    variants = {"raw": raw, "sync": sync_save, "async_commit": async_save,
                "torch_save": peer("torch", peers.torch_save), "dcp_save": peer("dcp", peers.dcp_save),
                "dcp_async_commit": dcp_async}
    if with_accelerate:
        variants["accelerate_save"] = peer("accelerate", peers.accelerate_save)
    for variant in variants.values():  # warm-up, not kept: first calls import and allocate
        variant()
    blocking.clear()
    dcp_blocking.clear()
    samples = interleave(variants, repeats)
    sync_mgr.close()
    async_mgr.close()
    med = {name: median(values) for name, values in samples.items()}
    med["async_blocking"] = median(blocking)
    med["dcp_async_blocking"] = median(dcp_blocking)
    best_peer, best_seconds = best(med, PEER_SAVES)
    return {
        "metric": "save", "state_bytes": nbytes, "repeats": repeats, "machine": machine(),
        "median_seconds": med, "samples": samples | {"async_blocking": blocking, "dcp_async_blocking": dcp_blocking},
        "best_peer_save": best_peer,
        "M1_vs_raw": med["raw"] / med["sync"],
        "M1_vs_torch_save": med["torch_save"] / med["sync"],
        "M1_vs_best_peer": best_seconds / med["sync"],
        "M2_async_blocking_over_sync": med["async_blocking"] / med["sync"],
        "M2_async_blocking_vs_dcp_async": med["async_blocking"] / med["dcp_async_blocking"],
        "M6_async_commit_over_sync": med["async_commit"] / med["sync"],
        "sync_MiB_per_s": nbytes / med["sync"] / 2 ** 20,
        "raw_MiB_per_s": nbytes / med["raw"] / 2 ** 20,
    }


def main(argv=None) -> dict:
    parser = base_parser(__doc__)
    parser.add_argument("--no-accelerate", action="store_true", help="leave accelerate out (its import is slow)")
    args = parser.parse_args(argv)
    return run_in_scratch("save", args, lambda scratch: run(args.state_mib, args.repeats, scratch,
                                                             not args.no_accelerate))


if __name__ == "__main__":
    main()
