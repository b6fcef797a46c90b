"""Shared pieces of the reliability scenarios: a tally of trials, counts from the environment, servers.

Every scenario is a function ``run_*(n, ...) -> Tally`` used twice: by the
fast tests in this package (small counts) and by scripts/reliability_report.py
(the long runs). A trial "ends with nothing lost" when every check of the
scenario held; otherwise its description goes to ``failures``.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List

import torch
from torch import nn

import ckptmgr


@dataclass
class Tally:
    """Trials of one scenario: how many, how many held, what failed."""

    scenario: str
    tried: int = 0
    ok: int = 0
    failures: List[str] = field(default_factory=list)
    figures: Dict[str, Any] = field(default_factory=dict)

    def trial(self, label: str, check: Callable[[], Any]) -> Any:
        """Run one trial; an AssertionError or any exception is a recorded failure."""
        self.tried += 1
        try:
            out = check()
        except BaseException as exc:  # noqa: B902 - a trial's every failure is data, KeyboardInterrupt aside
            if isinstance(exc, KeyboardInterrupt):
                raise
            self.failures.append(f"{label}: {type(exc).__name__}: {exc}"[:400])
            return None
        self.ok += 1
        return out

    def assert_all_ok(self) -> None:
        """For tests: every trial held."""
        assert self.tried > 0 and self.ok == self.tried, f"{self.scenario}: {self.ok}/{self.tried}\n" + \
            "\n".join(self.failures[:10])

    def as_dict(self) -> Dict[str, Any]:
        """JSON form for the report."""
        return {"scenario": self.scenario, "tried": self.tried, "ok": self.ok, "failures": self.failures,
                "figures": self.figures}


def count(name: str, default: int) -> int:
    """A trial count from ``CKPTMGR_REL_<NAME>`` (the long runs set these), else ``default``."""
    return int(os.environ.get(f"CKPTMGR_REL_{name.upper()}", default))


def expect_typed(func: Callable[[], Any], what: str = "") -> ckptmgr.CheckpointError:
    """Call ``func``; it must raise a ckptmgr.errors.CheckpointError subclass (returned), never load."""
    try:
        func()
    except ckptmgr.CheckpointError as exc:
        return exc
    except Exception as exc:
        raise AssertionError(f"{what}: untyped {type(exc).__name__}: {exc}") from exc
    raise AssertionError(f"{what}: loaded silently")


def small_model(seed: int = 0) -> nn.Module:
    """A small model with a buffer (BatchNorm) and a head."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Linear(16, 4))


def start_moto() -> Any:
    """A moto S3 server on 127.0.0.1 (port 0); returns the server (``.endpoint`` set)."""
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    server.endpoint = f"http://{host}:{port}"
    return server


def s3_env(endpoint: str) -> Dict[str, str]:
    """AWS_* variables that point boto at ``endpoint`` with dummy credentials."""
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint}


def new_bucket(endpoint: str) -> str:
    """Create a fresh bucket through ``endpoint`` directly; returns its name."""
    import s3fs
    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=endpoint, skip_instance_cache=True)
    name = f"rel-{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)
    return name
