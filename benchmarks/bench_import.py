"""Import cost: ``import ckptmgr`` (after torch) / ``import torch``, and the start-up of ``ckptmgr ls``.

Every training script and every torchrun worker pays the import (of the
API it uses: ckptmgr's names load on first use), so it must stay a small
fraction of torch's own. Each sample
starts a new Python process and times the imports inside it (interpreter
start-up is not counted); samples interleave torch-only and torch+ckptmgr runs.

``ckptmgr ls`` and ``ckptmgr verify`` read JSON manifests and need no torch: the
second figure is the wall time of a whole ``python -m ckptmgr.cli ls DIR``
process on a manager directory over that of ``python -c "import torch"``, both
timed from outside, interpreter start-up included, interleaved.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import base_parser, interleave, machine, median, run_in_scratch  # noqa: E402

PROBE = """
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
if {with_ckptmgr}:
    import ckptmgr
    ckptmgr.CheckpointManager, ckptmgr.CheckpointHook, ckptmgr.load_checkpoint  # names load on first use
t2 = time.perf_counter()
print(json.dumps({{"torch": t1 - t0, "ckptmgr": t2 - t1}}))
"""


def _probe(with_ckptmgr: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE.format(with_ckptmgr=with_ckptmgr)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _process_seconds(command: list) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def _manager_directory(scratch: str) -> str:
    """A small manager directory (three committed steps) for ``ckptmgr ls`` to list."""
    import torch

    from ckptmgr import CheckpointManager
    directory = os.path.join(scratch, "run")
    with CheckpointManager(directory, max_to_keep=3) as mgr:
        for step in range(3):
            mgr.save(step, model=torch.nn.Linear(16, 16), metrics={"loss": 1.0 / (step + 1)})
    return directory


def main(argv=None) -> dict:
    parser = base_parser(__doc__)
    args = parser.parse_args(argv)
    repeats = max(args.repeats, 5)

    def run(scratch: str) -> dict:
        directory = _manager_directory(scratch)
        torch_times, ckpt_times, ls_times, torch_process_times = [], [], [], []

        def torch_only() -> float:
            torch_times.append(_probe(False)["torch"])
            return torch_times[-1]

        def with_ckptmgr() -> float:
            ckpt_times.append(_probe(True)["ckptmgr"])
            return ckpt_times[-1]

        def ls_process() -> float:
            ls_times.append(_process_seconds([sys.executable, "-m", "ckptmgr.cli", "ls", directory]))
            return ls_times[-1]

        def torch_process() -> float:
            torch_process_times.append(_process_seconds([sys.executable, "-c", "import torch"]))
            return torch_process_times[-1]
        _probe(True)  # warm the page cache for both
        ls_process()
        torch_times.clear(), ckpt_times.clear(), ls_times.clear()
        interleave({"torch": torch_only, "ckptmgr": with_ckptmgr, "ls": ls_process, "torch process": torch_process},
                   repeats)
        return {"metric": "import", "repeats": repeats, "machine": machine(),
                "median_seconds": {"import torch": median(torch_times),
                                   "import ckptmgr after torch": median(ckpt_times),
                                   "ckptmgr ls process": median(ls_times),
                                   "python -c 'import torch' process": median(torch_process_times)},
                "samples": {"torch": torch_times, "ckptmgr": ckpt_times, "ls": ls_times,
                            "torch_process": torch_process_times},
                "import_ckptmgr_over_torch": median(ckpt_times) / median(torch_times),
                "cli_ls_startup_over_torch_import": median(ls_times) / median(torch_process_times)}
    return run_in_scratch("import", args, run)


if __name__ == "__main__":
    main()
