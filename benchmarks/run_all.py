"""Run every benchmark, print the table of ratios, and write the results as JSON.

    python benchmarks/run_all.py            # full run: 512 MiB state, 5 interleaved repeats
    python benchmarks/run_all.py --quick    # small sizes, a smoke test (< 4 minutes)

Each benchmark runs in its own process. The full run writes
benchmarks/results.json; --quick writes to a temporary file unless --results is given.
It prints two tables: every figure against its target, and the peers side by
side (median seconds of the same operation on the same state, same run).
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
# "peer" below is the fastest of torch.save/load, DCP and accelerate, measured in the same run (benchmarks/peers.py)
FIGURES = [
    ("import_ckptmgr_over_torch", "import", "import ckptmgr / import torch (fresh interpreters)", "<=", 0.1),
    ("cli_ls_startup_over_torch_import", "import", "`ckptmgr ls DIR` start-up / `python -c 'import torch'` "
     "(whole processes)", "<=", 0.5),
    ("M1_vs_raw", "save", "M1 sync durable save throughput / raw write+fsync", ">=", 0.9),
    ("M1_vs_best_peer", "save", "M1 sync durable save: speed-up over the fastest peer's durable save", ">=", 1.3),
    ("M2_async_blocking_over_sync", "save", "M2 async blocking time / sync save time", "<=", 0.10),
    ("M2_async_blocking_vs_dcp_async", "save", "M2 async blocking time / dcp.async_save blocking time", "<=", 1.0),
    ("M3_async_overhead_over_sync_overhead", "train_loop", "M3 loop overhead async / sync", "<=", 0.30),
    ("M3_async_overhead_vs_dcp_async", "train_loop", "M3 loop overhead async / dcp.async_save's", "<=", 1.0),
    ("M3_dcp_async_overhead_over_sync_overhead", "train_loop", "M3 loop overhead dcp.async_save / ckptmgr sync",
     "info", None),
    ("M4_verified_speedup_vs_best_peer", "load",
     "M4 restore, verified (default): speed-up over the fastest peer's (unverified) load", ">=", 1.3),
    ("M4_unverified_speedup_vs_best_peer", "load",
     "M4 restore, verify=False: speed-up over the fastest peer's load", "info", None),
    ("M4_verified_over_unverified", "load", "M4 restore time, verified / verify=False", "<=", 1.3),
    ("M4_verified_vs_raw", "load", "M4 restore time, verified (default) / raw readinto", "<=", 1.25),
    ("M4_vs_raw", "load", "M4 restore time, verify=False / raw readinto", "<=", 1.25),
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
    ("retention_scaling", "retention", "retention: save time with 1000 checkpoints / with 1 (512 MiB state)",
     "<=", 1.2),
    ("retention_overhead_ms", "retention", "retention: ms added per save by 1000 checkpoints (tiny model)", "info",
     None),
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
            "train_loop": ("bench_train_loop.py", ["--state-mib", "4", "--repeats", "3", "--every", "2"]),
            "memory": ("bench_memory.py", ["--state-mib", "16"]),
            "s3": ("bench_s3.py", ["--state-mib", "4", "--repeats", "2"]),
            "tiered": ("bench_tiered.py", ["--state-mib", "4", "--repeats", "2"]),
            "retention": ("bench_retention.py", ["--count", "40", "--repeats", "3", "--state-mib", "2"]),
            "sharded": ("bench_sharded.py", ["--state-mib", "8", "--repeats", "2"]),
        }
    return {
        "import": ("bench_import.py", []),
        # the disk's speed moves from one save to the next on a shared machine: more samples per median
        "save": ("bench_save.py", ["--repeats", "9"]),
        "load": ("bench_load.py", ["--repeats", "9"]),
        "train_loop": ("bench_train_loop.py", ["--repeats", "24"]),  # 6 times each of the 4 orders
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


# Figures built from differences of two timings (time a save adds to a loop): at smoke-test sizes the
# difference can be zero or negative within noise, so these may be any number (or None when undefined).
SIGNED = {"M3_async_overhead_over_sync_overhead", "M3_async_overhead_vs_dcp_async",
          "M3_dcp_async_overhead_over_sync_overhead", "retention_overhead_ms"}

# (label, benchmark, where the medians are, {column: key}); a missing key prints as "-"
PEER_ROWS = [
    ("durable save", "save", "median_seconds",
     {"ckptmgr": "sync", "torch": "torch_save", "DCP": "dcp_save", "accelerate": "accelerate_save"}),
    ("async save: blocking part", "save", "median_seconds", {"ckptmgr": "async_blocking", "DCP": "dcp_async_blocking"}),
    ("async save: call to durable", "save", "median_seconds", {"ckptmgr": "async_commit", "DCP": "dcp_async_commit"}),
    ("restore, every byte verified (ckptmgr's default)", "load", "median_seconds", {"ckptmgr": "restore_verified"}),
    ("restore without verification", "load", "median_seconds",
     {"ckptmgr": "restore", "torch": "torch_load", "DCP": "dcp_load", "accelerate": "accelerate_load"}),
    ("training loop: time added by its async saves", "train_loop", "loop_overhead_seconds",
     {"ckptmgr": "async", "DCP": "dcp_async"}),
    ("training loop: time added by its sync saves", "train_loop", "loop_overhead_seconds", {"ckptmgr": "sync"}),
]
PEER_COLUMNS = ("ckptmgr", "torch", "DCP", "accelerate")


def peer_table(results: dict) -> str:
    """Markdown table: the same operation on the same state, ckptmgr and each peer (median seconds)."""
    lines = ["| operation (median seconds, same state, same run) | " + " | ".join(PEER_COLUMNS) + " |",
             "|---|" + "---:|" * len(PEER_COLUMNS)]
    for label, bench, where, columns in PEER_ROWS:
        values = results.get(bench, {}).get(where, {})
        cells = []
        for column in PEER_COLUMNS:
            value = values.get(columns.get(column, ""))
            cells.append("-" if value is None else f"{value:.3f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
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
    print()
    print(peer_table(results))
    print(f"\nresults written to {results_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
