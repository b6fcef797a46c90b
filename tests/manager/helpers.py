"""Shared helpers for the CheckpointManager tests: deep comparisons and small training setups."""
from __future__ import annotations

import math
import os
from typing import Any, Mapping

import torch
from torch import nn


def filled(model: nn.Module, value: float) -> nn.Module:
    """``model`` with every parameter set to ``value`` (an easy-to-tell-apart state); returns it."""
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    return model


def assert_same(a: Any, b: Any, path: str = "root") -> None:
    """Assert two state trees are bit-identical (tensors by torch.equal, dtype and shape too)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: {type(b).__name__} is not a tensor"
        assert a.dtype == b.dtype and a.shape == b.shape, \
            f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert torch.equal(a, b), f"{path}: tensors differ"
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping), f"{path}: {type(b).__name__} is not a mapping"
        assert set(a) == set(b), f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for key in a:
            assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{path}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), f"{path}: nan vs {b!r}"
    else:
        assert type(a) is type(b) and a == b, f"{path}: {a!r} vs {b!r}"


def entries(directory: str) -> list:
    """Sorted names in ``directory``, less the manager's ownership files (``.ckptmgr.lock``, ``.ckptmgr-owner.json``).
    """
    return sorted(n for n in os.listdir(directory) if not n.startswith(".ckptmgr"))


def tmp_names(directory: str) -> list:
    """Names in ``directory`` that look like the manager's temporary directories."""
    return sorted(n for n in os.listdir(directory) if n.startswith((".tmp-", ".old-")))


class SmallNet(nn.Module):
    """Linear + BatchNorm + Dropout: weights, buffers and RNG all matter for continuity."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(8, width)
        self.bn = nn.BatchNorm1d(width)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(width, 2)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))
