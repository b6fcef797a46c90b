"""Shared fixtures: a clean loader registry, a real moto S3 server, small real models."""
from __future__ import annotations

import socket
import uuid

import pytest
import torch
from torch import nn

import ckptmgr


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    """Each test gets its own CKPTMGR_HOME and leaves the scheme registry as it found it."""
    monkeypatch.setenv("CKPTMGR_HOME", str(tmp_path_factory.mktemp("ckptmgr_home")))
    monkeypatch.delenv("CKPTMGR_URL_MIRRORS", raising=False)
    snapshot = ckptmgr.CheckpointLoader.snapshot()
    yield
    ckptmgr.CheckpointLoader.restore(snapshot)


@pytest.fixture
def registry():
    """The CheckpointLoader class; registrations made through it are undone after the test."""
    return ckptmgr.CheckpointLoader


class ConvNet(nn.Module):
    """Conv + BatchNorm + Linear: has buffers, num_batches_tracked and versions."""

    def __init__(self, channels: int = 4, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.head(x.mean(dim=(2, 3)))


@pytest.fixture
def convnet():
    torch.manual_seed(0)
    model = ConvNet()
    model(torch.randn(2, 3, 8, 8))  # move BN running stats away from their defaults
    return model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_server():
    """A real moto S3 server on 127.0.0.1 for the whole session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(moto_server, monkeypatch):
    """A fresh bucket on the moto server; AWS_* env points at it. Yields ``s3://bucket``."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    import s3fs
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"ckpt-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem()
    fs.mkdir(bucket)
    yield f"s3://{bucket}"
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def http_server(monkeypatch):
    """A real HTTP file server on 127.0.0.1 (see tests/httpserver.py); downloads back off fast."""
    from tests.support.httpserver import FileServer
    monkeypatch.setenv("CKPTMGR_DOWNLOAD_BACKOFF", "0.01")
    monkeypatch.delenv("CKPTMGR_DOWNLOAD_RETRIES", raising=False)
    monkeypatch.delenv("CKPTMGR_DOWNLOAD_TIMEOUT", raising=False)
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)  # 127.0.0.1 must be reached directly
    with FileServer() as server:
        yield server
