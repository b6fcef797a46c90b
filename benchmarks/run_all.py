"""Run every benchmark, print the table of ratios, and write the results as JSON.

    python benchmarks/run_all.py            # full run: 512 MiB state, 5 interleaved repeats
    python benchmarks/run_all.py --quick    # small sizes, a smoke test (< 3 minutes)

Each benchmark runs in its own process. The full run writes
benchmarks/results.json; --quick writes to a temporary file unless --results is given.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import machine  # noqa: E402

# (figure key in the benchmark's JSON, benchmark, label, comparison, target)
FIGURES = [
    ("import_ckptmgr_over_torch", "import", "import ckptmgr / import torch (fresh interpreters)", "<=", 0.1),
    ("cli_ls_startup_over_torch_import", "import", "`ckptmgr ls DIR` start-up / `python -c 'import torch'` "
     "(whole processes)", "<=", 0.5),
    ("M1_vs_raw", "save", "M1 sync durable save throughput / raw write+fsync", ">=", 0.9),
    ("M1_vs_torch_save", "save", "M1 sync durable save throughput / torch.save+fsync", ">=", 1.0),
    ("M2_async_blocking_over_sync", "save", "M2 async blocking time / sync save time", "<=", 0.10),
    ("M3_async_overhead_over_sync_overhead", "train_loop", "M3 loop overhead async / sync", "<=", 0.15),
    ("M4_vs_raw", "load", "M4 restore time / raw readinto", "<=", 1.25),
    ("M4_vs_torch_load", "load", "M4 restore time / torch.load+load_state_dict", "<=", 0.8),
    ("M4_verified_vs_raw", "load", "M4 restore with sha256 verify / raw readinto", "info", None),
    ("M5_sync_save", "memory", "M5 peak extra PSS / state, sync save", "<=", 0.10),
    ("M5_async_save", "memory", "M5 peak extra PSS / state, async save", "<=", 1.10),
    ("M5_async_growth_over_saves", "memory", "M5 async growth over 10 saves / state", "<=", 0.05),
    ("M5_load", "memory", "M5 peak extra PSS / state, load", "<=", 0.10),
    ("M6_async_commit_over_sync", "save", "M6 async call-to-committed / sync save time", "<=", 1.15),
    ("S3_save_vs_raw_put", "s3", "S3 save throughput / raw s3fs write", ">=", 0.9),
    ("S3_restore_vs_raw_get", "s3", "S3 restore throughput / raw s3fs read", ">=", 0.9),
    ("tiered_save_over_s3_save", "tiered", "tiered: save() with local_dir / save() straight to S3 (loop waits)", "<=",
     0.5),
    ("tiered_persistent_over_s3_save", "tiered", "tiered: save()+wait() (persistent) / save() straight to S3", "info",
     None),
    ("tiered_restore_local_over_s3", "tiered", "tiered: restore from the local tier / restore from S3", "<=", 0.5),
    ("retention_scaling", "retention", "retention: save time with 1000 checkpoints / with 1", "<=", 1.2),
    ("sharded_save_vs_unsharded_2r", "sharded", "sharded save / unsharded rank-0 save (throughput), 2 ranks",
     "info", None),
    ("sharded_load_vs_unsharded_2r", "sharded", "sharded restore / unsharded restore (throughput), 2 ranks",
     "info", None),
    ("sharded_save_vs_unsharded_4r", "sharded", "sharded save / unsharded rank-0 save (throughput), 4 ranks",
     "info", None),
    ("sharded_load_vs_unsharded_4r", "sharded", "sharded restore / unsharded restore (throughput), 4 ranks",
     "info", None),
]


def plan(quick: bool):
    """Benchmark name -> (script, arguments)."""
    if quick:
        return {
            "import": ("bench_import.py", ["--repeats", "3"]),
            "save": ("bench_save.py", ["--state-mib", "8", "--repeats", "3"]),
            "load": ("bench_load.py", ["--state-mib", "8", "--repeats", "3"]),
            "train_loop": ("bench_train_loop.py", ["--state-mib", "4", "--repeats", "2", "--steps", "6",
                                                   "--every", "3"]),
            "memory": ("bench_memory.py", ["--state-mib", "16"]),
            "s3": ("bench_s3.py", ["--state-mib", "4", "--repeats", "2"]),
            "tiered": ("bench_tiered.py", ["--state-mib", "4", "--repeats", "2"]),
            "retention": ("bench_retention.py", ["--count", "40", "--repeats", "3"]),
            "sharded": ("bench_sharded.py", ["--state-mib", "8", "--repeats", "2"]),
        }
    return {
        "import": ("bench_import.py", []),
        "save": ("bench_save.py", []),
        "load": ("bench_load.py", []),
        "train_loop": ("bench_train_loop.py", []),
        "memory": ("bench_memory.py", []),
        "s3": ("bench_s3.py", []),
        "tiered": ("bench_tiered.py", []),
        "retention": ("bench_retention.py", []),
        "sharded": ("bench_sharded.py", []),
    }


def verdict(value, comparison, target) -> str:
    if value is None:
        return "n/a"
    if comparison == "info":
        return ""
    ok = value >= target if comparison == ">=" else value <= target
    return "met" if ok else "MISSED"


def table(results: dict) -> str:
    """Markdown table of every figure."""
    lines = ["| figure | measured | target | |", "|---|---:|---:|---|"]
    for key, bench, label, comparison, target in FIGURES:
        value = results.get(bench, {}).get(key)
        shown = "n/a" if value is None else f"{value:.3f}"
        goal = "" if comparison == "info" else f"{comparison} {target}"
        lines.append(f"| {label} | {shown} | {goal} | {verdict(value, comparison, target)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--only", nargs="*", help="run only these benchmarks")
    parser.add_argument("--results", default=None, help="where to write the JSON results")
    parser.add_argument("--dir", default=None, help="scratch directory on the disk to measure")
    args = parser.parse_args(argv)
    results_path = args.results or (os.path.join(tempfile.gettempdir(), "ckptmgr-bench-quick.json") if args.quick
                                    else os.path.join(HERE, "results.json"))
    results = {"machine": machine(), "quick": args.quick, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    failed = []
    for name, (script, extra) in plan(args.quick).items():
        if args.only and name not in args.only:
            continue
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
            out_path = tmp.name
        cmd = [sys.executable, os.path.join(HERE, script), *extra, "--out", out_path]
        if args.dir:
            cmd += ["--dir", args.dir]
        start = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            failed.append(name)
            sys.stderr.write(f"{name} failed:\n{proc.stderr[-3000:]}\n")
            continue
        with open(out_path) as fh:
            results[name] = json.load(fh)
        os.unlink(out_path)
        results[name]["wall_seconds"] = round(elapsed, 1)
        sys.stderr.write(f"{name}: done in {elapsed:.1f}s\n")
    with open(results_path, "w") as fh:
        json.dump(results, fh, indent=2)
    print(table(results))
    print(f"\nresults written to {results_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
