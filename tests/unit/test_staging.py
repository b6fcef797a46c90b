"""Staging for async saves: exact copies in reused buffers, copied as raw bytes on several threads."""
import collections

import pytest
import torch

from ckptmgr.state import staging
from ckptmgr.state.staging import StagingBuffers


@pytest.fixture
def many_slices(monkeypatch):
    monkeypatch.setattr(staging, "SLICE", 256)             # many slices even for small tensors
    monkeypatch.setattr(staging, "_copy_threads", lambda: 3)


def _tree():
    torch.manual_seed(0)
    return {"model": collections.OrderedDict(w=torch.randn(100, 37), b=torch.randn(5)),
            "opt": {"state": {0: {"step": torch.tensor(3.0), "m": torch.randn(1000)}}, "lr": [0.1, (1, 2)]},
            "t": torch.randn(6, 4).t(),                     # not contiguous: copied on the caller's thread
            "empty": torch.empty(0), "half": torch.randn(333).bfloat16(), "mask": torch.rand(77) > 0.5}


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b) and a.dtype == b.dtype and a.shape == b.shape
    if isinstance(a, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_parallel_staging_copies_exactly_and_reuses_its_buffers(many_slices):
    buffers = StagingBuffers(pin_memory=False)
    tree = _tree()
    staged = buffers.stage_tree(tree)
    assert _same(tree, staged) and buffers._pool is not None   # the threaded path ran
    first = {k: v.data_ptr() for k, v in buffers._buffers.items()}
    for tensor in (tree["model"]["w"], tree["opt"]["state"][0]["m"], tree["t"]):
        tensor.add_(1.0)                                    # training goes on: the staged copy must not move
    assert not _same(tree, staged)
    again = buffers.stage_tree(tree)
    assert _same(tree, again)
    assert {k: v.data_ptr() for k, v in buffers._buffers.items()} == first   # same buffers, refilled
    buffers.release()
    assert buffers._pool is None and buffers.nbytes == 0


@pytest.mark.parametrize("count", [2, 3, 4])
def test_copies_are_cut_into_runs_of_neighbours_with_about_equal_bytes(count):
    sizes = [100, 1, 1, 1, 50, 50, 50, 50, 1, 100, 7, 7, 7, 7]
    pairs = [(None, b"x" * size) for size in sizes]
    runs = staging._runs(pairs, count)
    assert [pair for run in runs for pair in run] == pairs           # every pair once, in order
    assert len(runs) == count and all(runs)
    totals = [sum(len(src) for _, src in run) for run in runs]
    share = sum(sizes) / count
    assert all(abs(total - share) <= max(sizes) for total in totals), totals   # off by at most about a pair
    assert staging._runs([(None, b"y" * 10)] * 3, 4) == [[(None, b"y" * 10)]] * 3   # never an empty run
    assert staging._runs([(None, b"")] * 2, 2) == [[(None, b"")] * 2]


def test_the_calling_thread_copies_a_run_itself(many_slices, monkeypatch):
    import threading
    copiers = set()
    real = staging._copy_all

    def spy(pairs):
        copiers.add(threading.current_thread().name)
        real(pairs)
    monkeypatch.setattr(staging, "_copy_all", spy)
    buffers = StagingBuffers(pin_memory=False)
    tree = _tree()
    assert _same(tree, buffers.stage_tree(tree))
    assert threading.current_thread().name in copiers
    assert any(name.startswith("ckptmgr-stage") for name in copiers)
    buffers.release()
