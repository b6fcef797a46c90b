"""Tiered checkpoints: the save the training loop waits for, and restores, with a local tier vs straight to S3.

A sync save with ``local_dir`` returns once the step is committed on the local
disk; the upload to S3 (a local moto server in its own process) runs in the
background. Straight to S3, the loop waits for the upload itself. Figures, each
a ratio of medians measured in this run:

tiered_save_over_s3_save              save() with local_dir / save() straight to S3 (what the loop waits for)
tiered_persistent_over_s3_save        save() + wait() with local_dir / save() straight to S3 (the full cost)
tiered_restore_local_over_s3          restore from the local tier / restore from S3

Each tiered save is timed with the previous upload finished, as in a loop that
saves less often than an upload takes; the uploads' time is in the second figure.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_s3 import moto_bucket  # noqa: E402
from common import base_parser, interleave, machine, make_state, median, run_in_scratch, timed  # noqa: E402


def run(state_mib: float, repeats: int, scratch: str) -> dict:
    with moto_bucket() as bucket:
        import ckptmgr
        model, opt, nbytes = make_state(state_mib)
        tiered = ckptmgr.CheckpointManager(f"s3://{bucket}/tiered", max_to_keep=1,
                                           local_dir=os.path.join(scratch, "local"), local_max_to_keep=1)
        direct = ckptmgr.CheckpointManager(f"s3://{bucket}/direct", max_to_keep=1)
        steps = {"tiered": 0, "direct": 0}

        def save(manager, key, then_wait=False):
            def one():
                steps[key] += 1
                manager.save(steps[key], model=model, optimizer=opt)
                if then_wait:
                    manager.wait()
            manager.wait()   # the previous upload is done: the loop saves less often than an upload takes
            return timed(one)

        def restore(manager):
            manager.wait()
            return timed(lambda: manager.restore(model=model, optimizer=opt))

        samples = interleave({
            "tiered_save": lambda: save(tiered, "tiered"),
            "tiered_save_and_wait": lambda: save(tiered, "tiered", then_wait=True),
            "s3_save": lambda: save(direct, "direct"),
            "tiered_restore_local": lambda: restore(tiered),
            "s3_restore": lambda: restore(direct),
        }, repeats)
        tiered.close()
        direct.close()
    med = {name: median(values) for name, values in samples.items()}
    return {
        "metric": "tiered", "state_bytes": nbytes, "repeats": repeats, "machine": machine(), "median_seconds": med,
        "samples": samples,
        "tiered_save_over_s3_save": med["tiered_save"] / med["s3_save"],
        "tiered_persistent_over_s3_save": med["tiered_save_and_wait"] / med["s3_save"],
        "tiered_restore_local_over_s3": med["tiered_restore_local"] / med["s3_restore"],
    }


def main(argv=None) -> dict:
    parser = base_parser(__doc__)
    parser.set_defaults(state_mib=128)
    args = parser.parse_args(argv)
    return run_in_scratch("tiered", args, lambda scratch: run(args.state_mib, args.repeats, scratch))


if __name__ == "__main__":
    main()
