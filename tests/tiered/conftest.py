"""Fixtures for tiered checkpoints: a moto S3 bucket behind a request-logging proxy, and GET counting."""
from __future__ import annotations

import re
from typing import List

import pytest

from tests.support.faultproxy import FaultProxy

_DATA = re.compile(r"/step_\d{8,}/(?!manifest\.json$).+")


def data_gets(proxy: FaultProxy, since: int = 0) -> List[str]:
    """Paths of data files of steps (not manifests) read through ``proxy`` since request number ``since``."""
    return [path for method, path in proxy.requests[since:] if method == "GET" and _DATA.search(path)]


@pytest.fixture
def proxy(moto_server):
    """A proxy in front of the moto server that logs every request (no faults)."""
    with FaultProxy(moto_server, rate=0.0) as p:
        yield p


@pytest.fixture
def s3_options(s3, proxy):
    """storage_options that send S3 requests through ``proxy``."""
    return {"endpoint_url": proxy.endpoint, "key": "testing", "secret": "testing"}
