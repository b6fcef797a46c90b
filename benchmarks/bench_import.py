"""Import cost: ``import ckptmgr`` (after torch) / ``import torch``, each in a fresh interpreter.

Every training script, every torchrun worker and every ``ckptmgr`` command
pays the import, so it must stay a small fraction of torch's own. Each sample
starts a new Python process and times the imports inside it (interpreter
start-up is not counted); samples interleave torch-only and torch+ckptmgr runs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import base_parser, emit, interleave, machine, median  # noqa: E402

PROBE = """
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
if {with_ckptmgr}:
    import ckptmgr
t2 = time.perf_counter()
print(json.dumps({{"torch": t1 - t0, "ckptmgr": t2 - t1}}))
"""


def _probe(with_ckptmgr: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE.format(with_ckptmgr=with_ckptmgr)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = base_parser(__doc__)
    args = parser.parse_args(argv)
    repeats = max(args.repeats, 5)
    torch_times, ckpt_times = [], []

    def torch_only() -> float:
        torch_times.append(_probe(False)["torch"])
        return torch_times[-1]

    def with_ckptmgr() -> float:
        ckpt_times.append(_probe(True)["ckptmgr"])
        return ckpt_times[-1]
    _probe(True)  # warm the page cache for both
    interleave({"torch": torch_only, "ckptmgr": with_ckptmgr}, repeats)
    result = {"metric": "import", "repeats": repeats, "machine": machine(),
              "median_seconds": {"import torch": median(torch_times), "import ckptmgr after torch": median(ckpt_times)},
              "samples": {"torch": torch_times, "ckptmgr": ckpt_times},
              "import_ckptmgr_over_torch": median(ckpt_times) / median(torch_times)}
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
