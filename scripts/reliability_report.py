"""Run the long versions of the reliability scenarios and print a table of figures (or JSON).

    python scripts/reliability_report.py                 # default counts (about 5-10 minutes)
    python scripts/reliability_report.py --kills 1000 --json > figures.json
    python scripts/reliability_report.py --only kills-sync,kills-async --kills 1000

Each row: a scenario, how many trials ran, how many ended with nothing lost
(every check held), and the first failures. The scenarios live in
reliability/ and are the same code the fast tests run with small counts.

The console shows only a progress line per scenario (stderr) and the table
(stdout). Everything else the run produces, the S3 test server's request log,
a line per injected fault, library warnings, the output of every child
process, goes to a log file whose path is printed first (``--log``).
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
    parser.add_argument("--named-points", metavar="POINTS", help="comma-separated fault points (default: all)")
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
    parser.add_argument("--only", default=",".join(SCENARIOS), metavar="NAMES",
                        help=f"comma-separated scenarios to run (default: all of {', '.join(SCENARIOS)})")
    parser.add_argument("--log", metavar="PATH", help="where the servers' and children's output goes "
                                                      "(default: reliability.log in a new temporary directory)")
    args = parser.parse_args()
    unknown = sorted(set(args.only.split(",")) - set(SCENARIOS))
    if unknown:
        parser.error(f"--only: unknown scenario(s) {', '.join(unknown)}")
    return args


SCENARIOS = ("kills-sync", "kills-async", "named-sync", "named-async", "stages", "fsize", "enospc", "corruption",
             "malicious", "http", "s3", "concurrency", "tiered-kills", "tiered-damage")


def _scenarios(args: argparse.Namespace):
    from reliability import concurrency, corruption, http_faults, kills, malicious, s3_faults, saves, tiered
    from reliability.common import new_bucket, s3_env, start_moto
    from tests.support.httpserver import FileServer
    only = set(args.only.split(","))
    points = args.named_points.split(",") if args.named_points else kills.NAMED
    local = [("kills-sync", lambda: kills.run_kills(args.kills, async_save=False)),
             ("kills-async", lambda: kills.run_kills(args.kills, async_save=True)),
             ("named-sync", lambda: kills.run_named(points, repeats=args.named_repeats, async_save=False)),
             ("named-async", lambda: kills.run_named(points, repeats=args.named_repeats, async_save=True)),
             ("stages", lambda: saves.run_stage_faults(world=args.world)),
             ("fsize", lambda: saves.run_fsize(args.fsize)),
             ("enospc", lambda: saves.run_enospc(args.enospc)),
             ("corruption", lambda: corruption.run_corruption(args.offsets, args.flips))]
    yield from (run for name, run in local if name in only)
    if not only & {"malicious", "http", "s3", "concurrency", "tiered-kills", "tiered-damage"}:
        return
    moto = start_moto()
    os.environ.update(s3_env(moto.endpoint))
    try:
        with FileServer() as server:
            if "malicious" in only:
                yield lambda: malicious.run_malicious(http_server=server, s3_endpoint=moto.endpoint)
            if "http" in only:
                yield lambda: http_faults.run_http_faults(server, rounds=args.http_rounds)
        if "s3" in only:
            yield lambda: s3_faults.run_s3_faults(moto.endpoint, args.s3_rounds, rate=0.1)
        if "concurrency" in only:
            yield lambda: concurrency.run_concurrency(s3_url=f"s3://{new_bucket(moto.endpoint)}")
        if "tiered-kills" in only:
            yield lambda: tiered.run_tiered_kills(args.tiered_kills, args.tiered_named,
                                                  f"s3://{new_bucket(moto.endpoint)}")
        if "tiered-damage" in only:
            yield lambda: tiered.run_tiered_damage(args.tiered_damage, f"s3://{new_bucket(moto.endpoint)}")
    finally:
        moto.stop()


def _quiet(path: str):
    """Send fd 2 (this process's stderr, inherited by every child) and all logging to ``path``.

    Returns a stream on the original stderr for the progress lines.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    console = os.fdopen(os.dup(2), "w", buffering=1)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, force=True,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    logging.getLogger("werkzeug").setLevel(logging.INFO)  # the S3 server's request log: in the file, not here
    return console


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
    os.chdir(ROOT)
    home = tempfile.mkdtemp(prefix="ckptmgr-reliability-")
    log = os.path.abspath(args.log or os.path.join(home, "reliability.log"))
    console = _quiet(log)
    print(f"log (S3 server requests, injected faults, warnings, child output): {log}", file=console)
    os.environ.update({"CKPTMGR_HOME": home, "CKPTMGR_DIST_TIMEOUT": "60", "CKPTMGR_DOWNLOAD_BACKOFF": "0.01"})
    rows, start = [], time.monotonic()
    for scenario in _scenarios(args):
        began = time.monotonic()
        row = scenario().as_dict()
        row["seconds"] = round(time.monotonic() - began, 1)
        rows.append(row)
        print(f"{row['scenario']}: {row['ok']}/{row['tried']} in {row['seconds']} s", file=console)
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
