"""M5: peak extra memory (PSS of the process tree) / state size, for sync save, async save and load.

Each mode runs in a fresh child process, so allocator caches from one mode do
not flatter the next. Async runs 10 saves and reports the peak of each, to show
the staging buffers are reused rather than growing.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import PeakPss, base_parser, emit, machine, make_state  # noqa: E402

SAVES = 10


def measure(mode: str, state_mib: float, scratch: str) -> dict:
    """Run one mode in this process and return its figures."""
    import ckptmgr
    model, opt, nbytes = make_state(state_mib)
    directory = os.path.join(scratch, mode)
    if mode == "sync":
        manager = ckptmgr.CheckpointManager(directory, max_to_keep=1)
        manager.save(0, model=model, optimizer=opt)  # first save warms imports and allocator
        with PeakPss() as pss:
            manager.save(1, model=model, optimizer=opt)
        return {"state_bytes": nbytes, "peak_extra_bytes": pss.extra}
    if mode == "async":
        manager = ckptmgr.CheckpointManager(directory, max_to_keep=1, async_save=True)
        extras = []
        with PeakPss() as total:
            for step in range(SAVES):
                with PeakPss() as pss:
                    manager.save(step, model=model, optimizer=opt)
                    manager.wait()
                extras.append(pss.peak - total.baseline)
        manager.close()
        return {"state_bytes": nbytes, "peak_extra_bytes": max(extras), "per_save_peak_extra_bytes": extras}
    if mode == "load":
        manager = ckptmgr.CheckpointManager(directory, max_to_keep=1)
        manager.save(1, model=model, optimizer=opt)
        manager.restore(model=model, optimizer=opt)  # warm-up
        with PeakPss() as pss:
            manager.restore(model=model, optimizer=opt)
        return {"state_bytes": nbytes, "peak_extra_bytes": pss.extra}
    raise ValueError(mode)


def run(state_mib: float, scratch: str) -> dict:
    results = {}
    for mode in ("sync", "async", "load"):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode,
                              "--state-mib", str(state_mib), "--dir", scratch],
                             capture_output=True, text=True, check=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    nbytes = results["sync"]["state_bytes"]
    per_save = results["async"]["per_save_peak_extra_bytes"]
    return {
        "metric": "memory", "state_bytes": nbytes, "machine": machine(), "modes": results,
        "M5_sync_save": results["sync"]["peak_extra_bytes"] / nbytes,
        "M5_async_save": results["async"]["peak_extra_bytes"] / nbytes,
        "M5_load": results["load"]["peak_extra_bytes"] / nbytes,
        "M5_async_growth_over_saves": (max(per_save[1:]) - per_save[1]) / nbytes if len(per_save) > 1 else 0.0,
    }


def main(argv=None) -> dict:
    parser = base_parser(__doc__)
    parser.add_argument("--child", choices=["sync", "async", "load"], help=argparse_hidden())
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.state_mib, args.dir)))
        return {}
    scratch = tempfile.mkdtemp(prefix="ckptmgr-bench-mem-", dir=args.dir)
    try:
        result = run(args.state_mib, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    emit(result, args.out)
    return result


def argparse_hidden() -> str:
    import argparse
    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
