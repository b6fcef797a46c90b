"""``rank_state=`` in one process: what is written, what comes back, and the errors (the multi-rank
behaviour, world size changes included, is in tests/distributed/test_engines_ranks.py)."""
import json
import os

import pytest
import torch

from ckptmgr import CheckpointFormatError, CheckpointManager, UnserializableStateError
from tests.manager.helpers import SmallNet, assert_same, entries
from tests.support.shardloader import ShardLoader

pytestmark = pytest.mark.timeout(60)


def _loader():
    return ShardLoader(torch.arange(40.0).reshape(20, 2), rank=0, world=1, batch_size=3, seed=11)


def test_rank_state_round_trip_objects_values_tensors_and_callables(ckpt_dir):
    loader = _loader()
    for _ in range(8):                                    # into the second epoch
        next(loader)
    counter = {"n": 1}
    with CheckpointManager(ckpt_dir) as mgr:
        path = mgr.save(1, model=SmallNet(), rank_state={"loader": loader, "offset": 123, "mask": torch.ones(3),
                                                         "seen": lambda: counter["n"] + 41})
        expected = [next(loader).tolist() for _ in range(3)]
        fresh = _loader()
        restored = mgr.restore(model=SmallNet(), rank_state={"loader": fresh})
    assert restored.rank_state["loader"] is fresh
    assert restored.rank_state["offset"] == 123 and restored.rank_state["seen"] == 42
    assert_same(torch.ones(3), restored.rank_state["mask"])
    assert [next(fresh).tolist() for _ in range(3)] == expected    # resumes at the batch where it stopped
    with open(os.path.join(path, "manifest.json")) as fh:
        components = json.load(fh)["components"]
    assert components["rank_state"] == {"0": "rank_state-rank00000.safetensors"}
    assert "rank_state-rank00000.safetensors" in os.listdir(path)


def test_a_callable_returning_the_dict_is_evaluated_at_save_time_and_plain_json_needs_no_safetensors(ckpt_dir):
    state = {"epoch": 1}
    with CheckpointManager(ckpt_dir) as mgr:
        path = mgr.save(1, model=SmallNet(), rank_state=lambda: dict(state))
        state["epoch"] = 2
        assert mgr.restore(model=SmallNet()).rank_state == {"epoch": 1}
    assert "rank_state-rank00000.json" in os.listdir(path)


def test_no_rank_state_writes_no_file_and_restores_nothing(ckpt_dir):
    with CheckpointManager(ckpt_dir) as mgr:
        path = mgr.save(1, model=SmallNet())
        assert mgr.restore(model=SmallNet()).rank_state == {}
        with pytest.raises(CheckpointFormatError, match=r"no rank_state \['loader'\]"):
            mgr.restore(model=SmallNet(), rank_state={"loader": _loader()})
        loader = _loader()
        next(loader)
        before = loader.state_dict()
        mgr.restore(model=SmallNet(), rank_state={"loader": loader}, strict=False)   # warns, leaves it
        assert_same(before, loader.state_dict())
    with open(os.path.join(path, "manifest.json")) as fh:
        assert "rank_state" not in json.load(fh)["components"]
    assert not [n for n in os.listdir(path) if n.startswith("rank_state")]


def test_unstorable_rank_state_fails_the_save_and_commits_nothing(ckpt_dir):
    with CheckpointManager(ckpt_dir) as mgr:
        mgr.save(1, model=SmallNet())
        with pytest.raises(UnserializableStateError, match="rank_state.sock"):
            mgr.save(2, model=SmallNet(), rank_state={"sock": object()})
        with pytest.raises(TypeError, match="rank_state must be a dict"):
            mgr.save(2, model=SmallNet(), rank_state=[1, 2])
        with pytest.raises(ValueError, match="on_world_size_change"):
            mgr.restore(model=SmallNet(), on_world_size_change="reshard")
        assert mgr.all_steps() == [1]
    assert entries(ckpt_dir) == ["step_00000001"]


def test_async_save_stages_rank_state(ckpt_dir):
    loader = _loader()
    next(loader)
    with CheckpointManager(ckpt_dir, async_save=True) as mgr:
        mgr.save(1, model=SmallNet(), rank_state={"loader": loader})
        saved = loader.state_dict()
        for _ in range(5):                                 # the loader moves on while the write runs
            next(loader)
        mgr.wait()
        fresh = _loader()
        mgr.restore(model=SmallNet(), rank_state={"loader": fresh})
    assert_same(saved, fresh.state_dict())
