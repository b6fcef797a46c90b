"""Run the long versions of the reliability scenarios and print a table of figures (or JSON).

    python scripts/reliability_report.py                 # default counts (about 5-10 minutes)
    python scripts/reliability_report.py --kills 1000 --json > figures.json

Each row: a scenario, how many trials ran, how many ended with nothing lost
(every check held), and the first failures. The scenarios live in
reliability/ and are the same code the fast tests run with small counts.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=200, help="random kill -9 rounds, sync and async each")
    parser.add_argument("--named-repeats", type=int, default=3, help="kills per named fault point")
    parser.add_argument("--world", type=int, default=4, help="gloo ranks for the stage-fault job")
    parser.add_argument("--fsize", type=int, default=20, help="saves under a real RLIMIT_FSIZE")
    parser.add_argument("--enospc", type=int, default=100, help="saves hitting ENOSPC at random offsets")
    parser.add_argument("--offsets", type=int, default=10, help="random truncation offsets per file kind")
    parser.add_argument("--flips", type=int, default=100, help="random bit flips per file kind")
    parser.add_argument("--http-rounds", type=int, default=3, help="rounds of every HTTP fault")
    parser.add_argument("--s3-rounds", type=int, default=30, help="S3 save+restore rounds at 10%% faults")
    parser.add_argument("--tiered-kills", type=int, default=20, help="random kill -9 rounds of tiered saves")
    parser.add_argument("--tiered-named", type=int, default=2, help="tiered kills per named fault point")
    parser.add_argument("--tiered-damage", type=int, default=10, help="wiped or damaged local tier rounds")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return parser.parse_args()


def _scenarios(args: argparse.Namespace):
    from reliability import concurrency, corruption, http_faults, kills, malicious, s3_faults, saves, tiered
    from reliability.common import new_bucket, s3_env, start_moto
    from tests.support.httpserver import FileServer
    yield lambda: kills.run_kills(args.kills, async_save=False)
    yield lambda: kills.run_kills(args.kills, async_save=True)
    yield lambda: kills.run_named(repeats=args.named_repeats, async_save=False)
    yield lambda: kills.run_named(repeats=args.named_repeats, async_save=True)
    yield lambda: saves.run_stage_faults(world=args.world)
    yield lambda: saves.run_fsize(args.fsize)
    yield lambda: saves.run_enospc(args.enospc)
    yield lambda: corruption.run_corruption(args.offsets, args.flips)
    moto = start_moto()
    os.environ.update(s3_env(moto.endpoint))
    try:
        with FileServer() as server:
            yield lambda: malicious.run_malicious(http_server=server, s3_endpoint=moto.endpoint)
            yield lambda: http_faults.run_http_faults(server, rounds=args.http_rounds)
        yield lambda: s3_faults.run_s3_faults(moto.endpoint, args.s3_rounds, rate=0.1)
        yield lambda: concurrency.run_concurrency(s3_url=f"s3://{new_bucket(moto.endpoint)}")
        yield lambda: tiered.run_tiered_kills(args.tiered_kills, args.tiered_named, f"s3://{new_bucket(moto.endpoint)}")
        yield lambda: tiered.run_tiered_damage(args.tiered_damage, f"s3://{new_bucket(moto.endpoint)}")
    finally:
        moto.stop()


def _table(rows) -> str:
    lines = ["| scenario | tried | nothing lost | figures | first failure |", "|---|---:|---:|---|---|"]
    for row in rows:
        figures = ", ".join(f"{k}: {v}" for k, v in row["figures"].items()) or "-"
        failure = row["failures"][0].replace("|", "/")[:120] if row["failures"] else "-"
        pct = f"{100.0 * row['ok'] / row['tried']:.1f}%" if row["tried"] else "-"
        lines.append(f"| {row['scenario']} | {row['tried']} | {row['ok']} ({pct}) | {figures} | {failure} |")
    return "\n".join(lines)


def main() -> int:
    args = _args()
    logging.basicConfig(level=logging.ERROR)
    os.chdir(ROOT)
    home = tempfile.mkdtemp(prefix="ckptmgr-reliability-")
    os.environ.update({"CKPTMGR_HOME": home, "CKPTMGR_DIST_TIMEOUT": "60", "CKPTMGR_DOWNLOAD_BACKOFF": "0.01"})
    rows, start = [], time.monotonic()
    for scenario in _scenarios(args):
        began = time.monotonic()
        row = scenario().as_dict()
        row["seconds"] = round(time.monotonic() - began, 1)
        rows.append(row)
        print(f"{row['scenario']}: {row['ok']}/{row['tried']} in {row['seconds']} s", file=sys.stderr, flush=True)
    total = round(time.monotonic() - start, 1)
    if args.json:
        print(json.dumps({"seconds": total, "scenarios": rows}, indent=1))
    else:
        print(_table(rows))
        print(f"\n{sum(r['tried'] for r in rows)} trials, {sum(r['ok'] for r in rows)} with nothing lost, "
              f"in {total} s")
    return 0 if all(r["ok"] == r["tried"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
