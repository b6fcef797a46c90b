"""Sharded checkpoints of FSDP2 models on 2 and 4 real gloo ranks (CPU): round trips, resharding, continuity,
async, S3, a rank killed inside dcp.save, and consolidation into one process.

The gloo runs are chained (2 ranks -> 4 ranks -> 2 fresh ranks) and shared by
the tests through module fixtures: each run checks many things, because
starting ranks dominates the runtime.
"""
import os
import subprocess
import sys
import uuid

import pytest
import torch

from tests.sharded import _workers
from tests.support.multiproc import run_ranks

pytestmark = pytest.mark.timeout(240)

ENV = {"CKPTMGR_DIST_TIMEOUT": "60", "OMP_NUM_THREADS": "1"}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _all_ok(results):
    assert all(status == "ok" for status, _ in results), results
    values = [value for _, value in results]
    assert all(v == values[0] for v in values), values   # every rank saw the same outcome
    return values[0]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("sharded"))


@pytest.fixture(scope="module")
def s3_env(moto_server):
    """A fresh bucket on the moto server, and the AWS_* variables spawned ranks need (passed explicitly)."""
    import s3fs
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": moto_server}
    bucket = f"sharded-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=moto_server).mkdir(bucket)
    s3fs.S3FileSystem.clear_instance_cache()
    return f"s3://{bucket}", env


@pytest.fixture(scope="module")
def two(root, s3_env):
    url, env = s3_env
    return _all_ok(run_ranks(_workers.phase_two, 2, root, url, env={**ENV, **env}, timeout=150))


@pytest.fixture(scope="module")
def four(root, two):
    return _all_ok(run_ranks(_workers.phase_four, 4, root, env=ENV, timeout=150))


@pytest.fixture(scope="module")
def back(root, four):
    return _all_ok(run_ranks(_workers.phase_back, 2, root, env=ENV, timeout=150))


def test_two_ranks_round_trip_is_bit_exact_for_model_and_adamw(two):
    step, extra, full_equal, shards_equal = two["round_trip"]
    assert (step, extra) == (1, {"epoch": 1})
    assert full_equal and shards_equal


def test_four_ranks_round_trip_and_reshard_two_to_four(four):
    assert four["two_to_four"]
    assert four["round_trip"] == [True, True]


def test_reshard_four_to_two(back):
    assert back["four_to_two"]


def test_training_continues_bit_for_bit_after_save_and_fresh_processes(back):
    assert back["continuity"] == [10, True]


def test_async_sharded_save_stages_a_copy(two):
    assert two["async"] == [[1, 2], True]


def test_s3_round_trip_with_a_forced_overwrite(two):
    assert two["s3"] == [[1], True]


def test_layout_is_dcp_files_plus_the_usual_components(root, two):
    from ckptmgr.io import open_store
    from ckptmgr.step.files import read_manifest
    step = os.path.join(root, "two", "step_00000001")
    manifest = read_manifest(open_store(step))
    assert "model" not in manifest.components and "optimizer" not in manifest.components
    assert manifest.components["sharded"]["metadata"] == "dcp.metadata"
    assert {"__0_0.distcp", "__1_0.distcp", "dcp.metadata", "extra.json", "meta.json",
            "rng-rank00000.safetensors", "rng-rank00001.safetensors"} == set(manifest.files)
    assert sorted(os.listdir(step)) == sorted(set(manifest.files) | {"manifest.json"})


def test_consolidation_equals_the_unsharded_state_dict_and_loads_into_a_plain_model(root, two):
    from ckptmgr import CheckpointManager, sharded
    ref = torch.load(os.path.join(root, "ref_two.pt"), weights_only=True)
    weights = sharded.consolidate(os.path.join(root, "two", "step_00000001"))
    assert _workers.same({f"model/{k}": v for k, v in weights.items()},
                         {k: v for k, v in ref.items() if k.startswith("model/")})
    plain = _workers.plain_model()
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.01)
    CheckpointManager(os.path.join(root, "two")).restore(model=plain, optimizer=opt)   # one process, no group
    assert all(torch.equal(v, ref[f"model/{k}"]) for k, v in plain.state_dict().items())
    state = opt.state_dict()["state"]
    names = [name for name, _ in plain.named_parameters()]
    assert all(torch.equal(state[i]["exp_avg"], ref[f"optim/{names[i]}/exp_avg"]) for i in state)


def test_cli_ls_verify_inspect_convert_treat_sharded_checkpoints_alike(root, two, tmp_path):
    from safetensors.torch import load_file
    directory = os.path.join(root, "two")
    step = os.path.join(directory, "step_00000001")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "ckptmgr.cli", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
    listed = cli("ls", directory)
    assert listed.returncode == 0 and "1 committed checkpoint" in listed.stdout, listed
    verified = cli("verify", step)
    assert verified.returncode == 0 and "OK" in verified.stdout, verified
    inspected = cli("inspect", step)
    assert inspected.returncode == 0 and "0.weight" in inspected.stdout, inspected
    out = str(tmp_path / "model.safetensors")
    converted = cli("convert", step, out)
    assert converted.returncode == 0, converted
    ref = torch.load(os.path.join(root, "ref_two.pt"), weights_only=True)
    exported = load_file(out)
    assert _workers.same({f"model/{k}": v for k, v in exported.items()},
                         {k: v for k, v in ref.items() if k.startswith("model/")})


def test_a_rank_killed_inside_dcp_save_commits_nothing_and_the_previous_step_restores(tmp_path):
    from ckptmgr import CheckpointManager
    root = str(tmp_path)
    results = run_ranks(_workers.phase_kill, 2, root, env=ENV, timeout=150)
    assert results[1][0] == "died"
    assert results[0] == ("ok", "DistributedError"), results
    directory = os.path.join(root, "run")
    assert not [n for n in os.listdir(directory) if n.startswith(".tmp-")]   # the partial step was removed
    mgr = CheckpointManager(directory)
    assert mgr.all_steps() == [1]
    plain = _workers.plain_model()
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    assert mgr.restore(model=plain, optimizer=opt).step == 1
    ref = torch.load(os.path.join(root, "ref_kill.pt"), weights_only=True)
    assert all(torch.equal(v, ref[f"model/{k}"]) for k, v in plain.state_dict().items())
