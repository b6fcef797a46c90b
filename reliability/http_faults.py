"""Scenario 5: downloads from a misbehaving HTTP server (tests/httpserver.py): recover or fail clearly.

Transient faults (a cut body, a reset, a 500/503 storm with Retry-After, a
stall shorter than the retries) must end in a verified load; permanent ones
(404, 403, a body shorter than its Content-Length every time, a stall past the
timeout on every attempt, a redirect loop) in a typed DownloadError/CheckpointError
whose message names the status or the cause. Redirects (301/302/307/308) are
followed, and the cache keeps the name of the URL asked for. Nothing partial is
left in the cache.
"""
from __future__ import annotations

import io
import os
from typing import Any, Dict, List, Tuple

import torch

import ckptmgr
from reliability.common import Tally, expect_typed, small_model

TRANSIENT: List[Tuple[str, Dict[str, Any]]] = [
    ("cut body once", {"cut_after": 100, "cut_times": 1}),
    ("reset once", {"cut_after": 50, "cut_times": 1, "reset": True}),
    ("503 storm with Retry-After", {"fail_times": 3, "fail_status": 503, "retry_after": "0"}),
    ("500 storm", {"fail_times": 2, "fail_status": 500}),
    ("stall once (shorter than the retries)", {"cut_after": 10, "cut_times": 1, "stall": 2.0}),
    ("no Range support after a cut", {"cut_after": 100, "cut_times": 1, "ranges": False}),
    ("short body every time, resumed by Range", {"cut_after": 1000}),
]
PERMANENT: List[Tuple[str, Dict[str, Any], str]] = [
    ("404", {"status": 404}, "404"),
    ("403", {"status": 403}, "403"),
    ("short body every time, no Range", {"cut_after": 100, "ranges": False}, ""),
    ("Content-Length too long", {"length_delta": 10}, ""),
    ("stall past the timeout every time", {"cut_after": 10, "stall": 3.0}, ""),
]


def _payload() -> Tuple[bytes, torch.Tensor]:
    model = small_model()
    buf = io.BytesIO()
    torch.save({"state_dict": model.state_dict()}, buf)
    return buf.getvalue(), model[0].weight.detach().clone()


def _cache_leftovers() -> List[str]:
    home = ckptmgr.hub.cache.cache_dir()
    out = []
    for _, _, names in os.walk(home):
        out += [n for n in names if ".tmp" in n or n.endswith(".part")]
    return out


def run_http_faults(server: Any, rounds: int = 1) -> Tally:
    """Each transient and permanent fault, ``rounds`` times, against ``server`` (a FileServer)."""
    tally = Tally("HTTP faults")
    data, weight = _payload()
    os.environ.update({"CKPTMGR_DOWNLOAD_TIMEOUT": "1", "CKPTMGR_DOWNLOAD_RETRIES": "4",
                       "CKPTMGR_DOWNLOAD_BACKOFF": "0.01"})
    for r in range(rounds):
        for label, behaviour in TRANSIENT:
            def ok(label: str = label, behaviour: Dict[str, Any] = behaviour, r: int = r) -> None:
                url = server.add(f"/t{r}/{label.replace(' ', '_')}.pth", data, **behaviour)
                model = small_model(1)
                ckptmgr.load_checkpoint(model, url, strict=True)
                assert torch.equal(model[0].weight, weight), "loaded other numbers"
            tally.trial(f"{label} #{r}", ok)
        for label, behaviour, must_say in PERMANENT:
            def fails(label: str = label, behaviour: Dict[str, Any] = behaviour, must_say: str = must_say,
                      r: int = r) -> None:
                url = server.add(f"/p{r}/{label.replace(' ', '_')}.pth", data, **behaviour)
                exc = expect_typed(lambda: ckptmgr.load_checkpoint(small_model(1), url), label)
                assert must_say in str(exc) and "Hint:" in str(exc), str(exc)
                assert not _cache_leftovers(), _cache_leftovers()
            tally.trial(f"{label} #{r}", fails)
        for status in (301, 302, 307, 308):
            def redirected(status: int = status, r: int = r) -> None:
                target = server.add(f"/r{r}/real-{status}.pth", data)
                url = server.add(f"/r{r}/moved-{status}.pth", b"", redirect_to=target, redirect_status=status)
                model = small_model(1)
                ckptmgr.load_checkpoint(model, url, strict=True)
                assert torch.equal(model[0].weight, weight), "loaded other numbers"
                assert os.path.basename(ckptmgr.cached_path(url)).startswith(f"moved-{status}"), \
                    "the cache is keyed by the URL asked for, not where it redirected"
            tally.trial(f"redirect {status} followed #{r}", redirected)

        def loop(r: int = r) -> None:
            path = f"/r{r}/loop.pth"
            url = server.add(path, b"", redirect_to=path)
            exc = expect_typed(lambda: ckptmgr.load_checkpoint(small_model(1), url), "redirect loop")
            assert "redirect" in str(exc) and "Hint:" in str(exc), str(exc)
            assert not _cache_leftovers(), _cache_leftovers()
        tally.trial(f"redirect loop #{r}", loop)
    return tally
