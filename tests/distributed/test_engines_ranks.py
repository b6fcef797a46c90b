"""Every rank's state and every engine on real gloo ranks (CPU): per-rank state, per-rank data continuity,
ZeroRedundancyOptimizer and FSDP1, saved on 2 ranks and restored on 2 fresh ranks and on 1 rank.

Three runs (2 ranks, 2 fresh ranks, 1 rank) are shared by the tests through
module fixtures; the rank functions are in ``_engines.py``.

FSDP1 runs on CPU with gloo when it is given ``device_id=torch.device("cpu")``
(without it, it asks for an accelerator). The references use full state
dicts with ``cpu_offload=False``: with FSDP1, ``use_orig_params=True`` and
more than one rank, a full optimizer state dict built with CPU offload on
CPU has every state name alias one buffer (``exp_avg`` equals
``exp_avg_sq``), so it cannot serve as a reference. ckptmgr never builds
that dict: it saves FSDP1 through DCP's sharded state dicts.
"""
import pytest

from tests.distributed import _engines
from tests.support.multiproc import run_ranks

pytestmark = pytest.mark.timeout(300)

ENV = {"CKPTMGR_DIST_TIMEOUT": "30", "OMP_NUM_THREADS": "1"}


def _values(results):
    for rank, (status, value) in enumerate(results):
        assert status == "ok", f"rank {rank}: {value}"
    return [value for _, value in results]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("engines"))


@pytest.fixture(scope="module")
def saved(root):
    return _values(run_ranks(_engines.phase_save, 2, root, env=ENV, timeout=200))


@pytest.fixture(scope="module")
def fresh(root, saved):
    return _values(run_ranks(_engines.phase_fresh, 2, root, env=ENV, timeout=150))


@pytest.fixture(scope="module")
def one(root, saved):
    return _values(run_ranks(_engines.phase_one, 1, root, env=ENV, timeout=150))[0]


def test_every_rank_writes_its_own_rank_state_file(saved):
    files = saved[0]["rank_state"]["files"]
    assert {"rank_state-rank00000.safetensors", "rank_state-rank00001.safetensors"} <= set(files)
    assert saved[0]["rank_state"]["loader"] != saved[1]["rank_state"]["loader"]   # the ranks really differ


def test_every_rank_gets_exactly_its_own_rank_state_back_in_a_fresh_job(saved, fresh):
    for rank in (0, 1):
        got = fresh[rank]["rank_state"]
        assert got["rank"] == rank
        assert got["shard"] == [10.0 * rank + i for i in range(4)]
        assert got["loader_is_target"]
        assert got["loader"] == saved[rank]["rank_state"]["loader"]


def test_per_rank_data_resumes_at_the_batch_where_it_stopped_and_training_ends_identical(saved, fresh):
    for rank in (0, 1):
        straight = saved[rank]["continuity"]["indices"]
        resumed = fresh[rank]["continuity"]["resumed"]
        assert resumed["step"] == _engines.CONT_SAVE
        assert resumed["indices"] == straight[_engines.CONT_SAVE:]
        assert resumed["weights_equal"], f"rank {rank}: final weights differ from the uninterrupted run"
        # the control: without rank_state each rank restarts its data and the run diverges
        control = fresh[rank]["continuity"]["without_rank_state"]
        assert control["indices"] != straight[_engines.CONT_SAVE:] and not control["weights_equal"]


def test_restoring_rank_state_on_another_world_size_raises_or_skips(one):
    kind, message = one["world_changed"]
    assert kind == "WorldSizeChangedError" and "saved by 2 rank(s), but this job has 1" in message
    assert one["untouched_after_error"]                    # refused before anything was read
    skip = one["skip"]
    assert skip["rank_state"] == {} and skip["loader_untouched"] and skip["model_equal"]
    assert len(skip["warnings"]) == 1 and "loader" in skip["warnings"][0] and "0, 1" in skip["warnings"][0]


def test_zero_redundancy_optimizer_round_trip_on_two_ranks(saved):
    zero = [r["zero"] for r in saved]
    assert zero[0]["state_equal"]
    assert all(z["next_step_equal"] for z in zero)
    files = zero[0]["files"]
    assert "optimizer.safetensors" in files and not [f for f in files if f.startswith("optimizer") and "rank" in f]


def test_a_rank_failing_while_collecting_fails_every_rank_before_zero_consolidates(saved):
    zero = [r["zero"] for r in saved]
    assert zero[1]["collect_failure"][0] == "RuntimeError" and "injected" in zero[1]["collect_failure"][1]
    kind, message = zero[0]["collect_failure"]
    assert kind == "DistributedError" and "rank 1" in message and "injected" in message
    assert zero[0]["steps"] == zero[1]["steps"] == [3]       # nothing committed


def test_zero_checkpoint_restores_on_one_rank_into_zero_and_plain_adam(one):
    assert one["zero"] == {"zero_world_1": True, "plain_adam": True, "model": True}


def test_fsdp1_is_saved_sharded_and_round_trips_on_two_ranks(saved):
    fsdp = [r["fsdp1"] for r in saved]
    assert fsdp[0]["sharded"]
    for rank, f in enumerate(fsdp):
        assert f["round_trip"] and f["local_equal"] and f["next_step_equal"], rank
        assert f["gan_round_trip"], rank
        kind, message = f["plain_refused"]
        assert kind == "CheckpointFormatError" and "FSDP1" in message and "sharded='auto'" in message


def test_fsdp1_checkpoints_restore_on_one_rank_into_plain_models(one):
    assert one["fsdp1"] == {"plain": True, "gan": True, "consolidate": True, "load_checkpoint_gan": True}
