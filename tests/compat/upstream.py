"""The models of OpenMMLab's checkpoint test suites, and helpers shared by the compat tests.

Upstream sources quoted by the tests (file:line): mmengine 0.10.7
``mmengine/runner/checkpoint.py`` and mmcv 1.7.2 ``mmcv/runner/checkpoint.py``.
"""
from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.norm = nn.BatchNorm2d(3)


class Model(nn.Module):
    """The model both upstream suites use."""

    def __init__(self):
        super().__init__()
        self.block = Block()
        self.conv = nn.Conv2d(3, 3, 1)


class PlainWrapper:
    """A wrapper that is not an nn.Module, like the suites' DDPWrapper and mmengine's strategy wrappers."""

    def __init__(self, module):
        self.module = module


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def aws_env(monkeypatch, endpoint=None):
    """Test credentials for moto; ``AWS_ENDPOINT_URL`` set to ``endpoint`` or removed."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    if endpoint is None:
        monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    else:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)


def new_bucket(endpoint: str) -> str:
    """Create a fresh bucket on the moto server at ``endpoint``; returns its name."""
    import uuid

    import s3fs
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"compat-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing").mkdir(bucket)
    s3fs.S3FileSystem.clear_instance_cache()
    return bucket
