"""M4: restoring into a live model and optimizer vs raw readinto and the peers' loads of the same state.

M4  manager restore time / raw readinto of the same bytes   (1.0 = as fast as reading the bytes)
    for the default restore (verify=True: every byte's checksum checked) and for verify=False
    fastest peer's load time / manager restore time           (above 1: ckptmgr is faster)
    peers: torch.load + load_state_dict, dcp.load + set_state_dict, accelerate load_state
    (see peers.py); no peer verifies anything, so each is compared with both ckptmgr restores
    verified restore time / unverified restore time           (what verification costs)
Every variant loads the same state from the page cache (each file was just
written), interleaved.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_save import _raw_bytes  # noqa: E402
from common import base_parser, interleave, machine, make_state, median, read_into, run_in_scratch, timed  # noqa: E402
from peers import PEER_LOADS, Peers, best  # noqa: E402

import ckptmgr  # noqa: E402


def run(state_mib: float, repeats: int, scratch: str, with_accelerate: bool = True) -> dict:
    model, opt, nbytes = make_state(state_mib)
    raw_path = os.path.join(scratch, "raw.bin")
    with open(raw_path, "wb") as fh:
        for view in _raw_bytes(model, opt):
            fh.write(view)
    peers = Peers(model, opt, scratch, accelerate=with_accelerate)
    for save in peers.saves().values():
        save()
    manager = ckptmgr.CheckpointManager(os.path.join(scratch, "mgr"), max_to_keep=1)
    manager.save(1, model=model, optimizer=opt)
    targets = _raw_bytes(model, opt)  # read into the live tensors, as a restore does

    def raw():
        def read():
            with open(raw_path, "rb", buffering=0) as fh:
                read_into(fh, targets)
        return timed(read)

    def restore():
        return timed(lambda: manager.restore(model=model, optimizer=opt, verify=False))

    def restore_verified():
        return timed(lambda: manager.restore(model=model, optimizer=opt, verify=True))

    variants = {"raw_readinto": raw, "restore_verified": restore_verified, "restore": restore}
    variants.update({name: (lambda load=load: timed(load)) for name, load in peers.loads().items()})
    for variant in variants.values():  # warm-up, not kept
        variant()
    samples = interleave(variants, repeats)
    manager.close()
    med = {name: median(values) for name, values in samples.items()}
    best_peer, best_seconds = best(med, PEER_LOADS)
    return {
        "metric": "load", "state_bytes": nbytes, "repeats": repeats, "machine": machine(),
        "median_seconds": med, "samples": samples, "best_peer_load": best_peer,
        "M4_vs_raw": med["restore"] / med["raw_readinto"],
        "M4_verified_vs_raw": med["restore_verified"] / med["raw_readinto"],
        "M4_vs_torch_load": med["restore"] / med["torch_load"],
        "M4_verified_speedup_vs_best_peer": best_seconds / med["restore_verified"],
        "M4_unverified_speedup_vs_best_peer": best_seconds / med["restore"],
        "M4_verified_over_unverified": med["restore_verified"] / med["restore"],
    }


def main(argv=None) -> dict:
    parser = base_parser(__doc__)
    parser.add_argument("--no-accelerate", action="store_true", help="leave accelerate out (its import is slow)")
    args = parser.parse_args(argv)
    return run_in_scratch("load", args, lambda scratch: run(args.state_mib, args.repeats, scratch,
                                                             not args.no_accelerate))


if __name__ == "__main__":
    main()
