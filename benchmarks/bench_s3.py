"""S3: manager save and restore on a local moto server vs raw s3fs writes and reads of the same bytes.

The moto server runs as a separate process so it does not share this
process's interpreter lock. Figures are throughput ratios (raw time / manager time).
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from typing import Iterator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_save import _raw_bytes  # noqa: E402
from common import base_parser, emit, interleave, machine, make_state, median, read_into, timed  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple:
    """Start ``moto_server`` on a free port; returns (process, endpoint)."""
    port = _free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc, endpoint
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("moto_server did not start")


@contextlib.contextmanager
def moto_bucket() -> Iterator[str]:
    """A bucket on a moto server of its own (the AWS_* variables of this process point at it); stopped after."""
    proc, endpoint = start_moto()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
    try:
        import s3fs
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        s3fs.S3FileSystem().mkdir(bucket)
        yield bucket
    finally:
        proc.kill()
        proc.wait()


def run(state_mib: float, repeats: int) -> dict:
    with moto_bucket() as bucket:
        import s3fs

        import ckptmgr
        fs = s3fs.S3FileSystem()
        model, opt, nbytes = make_state(state_mib)
        views = _raw_bytes(model, opt)
        manager = ckptmgr.CheckpointManager(f"s3://{bucket}/run", max_to_keep=1)
        counter = {"step": 0}

        def raw_put():
            def put():
                with fs.open(f"{bucket}/raw.bin", "wb") as fh:
                    for view in views:
                        fh.write(view)
            return timed(put)

        def raw_get():
            def get():
                with fs.open(f"{bucket}/raw.bin", "rb") as fh:
                    read_into(fh, views)
            return timed(get)

        def save():
            counter["step"] += 1
            return timed(lambda: manager.save(counter["step"], model=model, optimizer=opt))

        def restore():
            return timed(lambda: manager.restore(model=model, optimizer=opt))

        samples = interleave({"raw_put": raw_put, "save": save, "raw_get": raw_get, "restore": restore}, repeats)
        manager.close()
    med = {name: median(values) for name, values in samples.items()}
    return {
        "metric": "s3", "state_bytes": nbytes, "repeats": repeats, "machine": machine(), "median_seconds": med,
        "samples": samples,
        "S3_save_vs_raw_put": med["raw_put"] / med["save"],
        "S3_restore_vs_raw_get": med["raw_get"] / med["restore"],
    }


def main(argv=None) -> dict:
    parser = base_parser(__doc__)
    parser.set_defaults(state_mib=128)
    args = parser.parse_args(argv)
    result = run(args.state_mib, args.repeats)
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
