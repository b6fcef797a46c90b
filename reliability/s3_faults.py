"""Scenario 6: S3 behind a fault proxy (tests/faultproxy.py): retries at 10 %, a clear error at 100 %.

At a 10 % fault rate (503 SlowDown, connection resets, cut responses) every
save and restore succeeds and verifies with the retry settings below; at
100 % a save fails with a StorageError after its retries and writes no
manifest. Sizes of uploaded objects are checked against the manifest before
it is written (stepdir.commit lists the step prefix).
"""
from __future__ import annotations

from typing import Any, Dict

import torch

import ckptmgr
from ckptmgr import CheckpointManager
from reliability.common import Tally, new_bucket, small_model
from tests.support.faultproxy import FaultProxy


def options(endpoint: str, attempts: int) -> Dict[str, Any]:
    """storage_options for s3fs through ``endpoint`` with ``attempts`` botocore attempts per request."""
    return {"key": "testing", "secret": "testing", "endpoint_url": endpoint, "skip_instance_cache": True,
            "config_kwargs": {"retries": {"max_attempts": attempts, "mode": "standard"},
                              "connect_timeout": 5, "read_timeout": 10}}


def run_s3_faults(moto_endpoint: str, n: int, rate: float = 0.1, seed: int = 0) -> Tally:
    """``n`` save+restore rounds at ``rate``, then one save at 100 % faults."""
    tally = Tally(f"S3 behind a fault proxy ({rate:.0%} faults)")
    bucket = new_bucket(moto_endpoint)
    model = small_model()
    with FaultProxy(moto_endpoint, rate=rate, seed=seed) as proxy:
        url = f"s3://{bucket}/run"
        mgr = CheckpointManager(url, max_to_keep=2, storage_options=options(proxy.endpoint, 10))
        for i in range(1, n + 1):
            def round_trip(i: int = i) -> None:
                with torch.no_grad():
                    model[0].weight.fill_(float(i))
                mgr.save(i, model=model)
                fresh = small_model(1)
                got = mgr.restore(i, model=fresh, verify=True)
                assert got.step == i and float(fresh[0].weight.detach()[0, 0]) == float(i)
            tally.trial(f"save+restore {i}", round_trip)
        proxy.rate = 1.0

        def all_fail() -> None:
            try:
                CheckpointManager(url, max_to_keep=2, storage_options=options(proxy.endpoint, 2)).save(
                    n + 1, model=model)
            except ckptmgr.StorageError as exc:
                assert "Hint:" in str(exc), exc
            else:
                raise AssertionError("a save succeeded with every request failing")
        tally.trial("100% faults: typed StorageError", all_fail)
        proxy.rate = 0.0
        tally.trial("100% faults: no manifest written", lambda: _no_step(mgr, n + 1))
        tally.figures["proxy"] = dict(proxy.counts)
        mgr.close()
    return tally


def _no_step(mgr: CheckpointManager, step: int) -> None:
    assert step not in mgr.all_steps(), mgr.all_steps()
