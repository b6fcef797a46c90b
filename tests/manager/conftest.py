"""Fixtures for the CheckpointManager tests (the shared ones, s3 and convnet, are in tests/conftest.py)."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch


@pytest.fixture
def ckpt_dir(tmp_path):
    """A manager directory that does not exist yet (the first save creates it)."""
    return str(tmp_path / "run")


@pytest.fixture(autouse=True)
def _restore_global_rng():
    """Tests reseed and restore global RNGs; put them back so test order never matters."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])
