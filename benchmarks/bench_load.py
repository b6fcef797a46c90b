"""M4: restoring into a live model and optimizer vs raw readinto and torch.load + load_state_dict.

M4  manager restore time / raw readinto of the same bytes      (1.0 = as fast as reading the bytes)
    manager restore time / torch.load + load_state_dict time
Restores run with verify=False (the bytes are read once); restore with sha256
verification (the default) is reported beside it.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from bench_save import _raw_bytes  # noqa: E402
from common import base_parser, interleave, machine, make_state, median, read_into, run_in_scratch, timed  # noqa: E402

import ckptmgr  # noqa: E402


def run(state_mib: float, repeats: int, scratch: str) -> dict:
    model, opt, nbytes = make_state(state_mib)
    raw_path = os.path.join(scratch, "raw.bin")
    with open(raw_path, "wb") as fh:
        for view in _raw_bytes(model, opt):
            fh.write(view)
    pth_path = os.path.join(scratch, "torch.pth")
    torch.save({"state_dict": model.state_dict(), "optimizer": opt.state_dict()}, pth_path)
    manager = ckptmgr.CheckpointManager(os.path.join(scratch, "mgr"), max_to_keep=1)
    manager.save(1, model=model, optimizer=opt)
    targets = _raw_bytes(model, opt)  # read into the live tensors, as a restore does

    def raw():
        def read():
            with open(raw_path, "rb", buffering=0) as fh:
                read_into(fh, targets)
        return timed(read)

    def torch_load():
        def load():
            ckpt = torch.load(pth_path, weights_only=True)
            model.load_state_dict(ckpt["state_dict"])
            opt.load_state_dict(ckpt["optimizer"])
        return timed(load)

    def restore():
        return timed(lambda: manager.restore(model=model, optimizer=opt, verify=False))

    def restore_verified():
        return timed(lambda: manager.restore(model=model, optimizer=opt, verify=True))

    samples = interleave({"raw_readinto": raw, "torch_load": torch_load, "restore": restore,
                          "restore_verified": restore_verified}, repeats)
    manager.close()
    med = {name: median(values) for name, values in samples.items()}
    return {
        "metric": "load", "state_bytes": nbytes, "repeats": repeats, "machine": machine(),
        "median_seconds": med, "samples": samples,
        "M4_vs_raw": med["restore"] / med["raw_readinto"],
        "M4_vs_torch_load": med["restore"] / med["torch_load"],
        "M4_verified_vs_raw": med["restore_verified"] / med["raw_readinto"],
    }


def main(argv=None) -> dict:
    args = base_parser(__doc__).parse_args(argv)
    return run_in_scratch("load", args, lambda scratch: run(args.state_mib, args.repeats, scratch))


if __name__ == "__main__":
    main()
