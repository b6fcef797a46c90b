"""register_loaders(): mmengine's load_from and CheckpointLoader through ckptmgr's loaders (HTTP server, moto S3)."""
from __future__ import annotations

import io
import os
import pickle

import pytest
import torch

pytest.importorskip("mmengine")

from mmengine.runner.checkpoint import CheckpointLoader as MMCheckpointLoader  # noqa: E402

from ckptmgr import CheckpointManager  # noqa: E402
from ckptmgr.errors import UnsafeCheckpointError  # noqa: E402
from ckptmgr.integrations.mmengine import register_loaders  # noqa: E402
from tests.integrations import mm_toy as toy  # noqa: E402


@pytest.fixture(autouse=True)
def mmengine_schemes():
    """Leave mmengine's scheme table as the test found it."""
    saved = dict(MMCheckpointLoader._schemes)
    yield
    MMCheckpointLoader._schemes = type(MMCheckpointLoader._schemes)(saved)


def _trained_weights():
    torch.manual_seed(7)
    model = toy.ToyModel()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _pth(weights) -> bytes:
    buffer = io.BytesIO()
    torch.save({"meta": {"epoch": 3}, "state_dict": weights}, buffer)
    return buffer.getvalue()


def _loaded_by(uri, work_dir):
    runner = toy.make_runner(str(work_dir), dict(type="CkptmgrHook"), load_from=uri)
    runner.load_or_resume()
    return toy.weights(runner)


def _loader_name(uri):
    return MMCheckpointLoader._get_checkpoint_loader(uri).__name__


def test_load_from_http_goes_through_the_download_cache(http_server, tmp_path):
    weights = _trained_weights()
    url = http_server.add("/zoo/model.pth", _pth(weights))
    assert _loader_name(url) == "load_from_http"                 # mmengine's own, before
    register_loaders()
    assert _loader_name(url) == "load_from_ckptmgr_registry"
    assert toy.same(_loaded_by(url, tmp_path / "a"), weights)
    assert toy.same(_loaded_by(url, tmp_path / "b"), weights)
    assert http_server.gets("/zoo/model.pth") == 1               # the second load came from ckptmgr's cache
    cached = [n for _, _, names in os.walk(os.environ["CKPTMGR_HOME"]) for n in names]
    assert any(n.startswith("model.") and n.endswith(".pth") for n in cached)


def test_load_from_s3_file_and_manager_directory(s3, tmp_path):
    import s3fs
    weights = _trained_weights()
    with s3fs.S3FileSystem().open(f"{s3}/zoo/model.pth"[len("s3://"):], "wb") as fh:
        fh.write(_pth(weights))
    with pytest.raises(ImportError):        # mmengine alone needs petrel_client for s3://
        MMCheckpointLoader.load_checkpoint(f"{s3}/zoo/model.pth", "cpu")
    register_loaders()
    assert toy.same(_loaded_by(f"{s3}/zoo/model.pth", tmp_path / "a"), weights)

    model = toy.ToyModel()
    model.load_state_dict(weights)
    with CheckpointManager(f"{s3}/run") as manager:   # a manager directory on S3: its newest good step
        manager.save(7, model=model)
    assert toy.same(_loaded_by(f"{s3}/run", tmp_path / "b"), weights)
    assert toy.same(_loaded_by(f"ckptmgr:{s3}/run/step_00000007", tmp_path / "c"), weights)


def test_scheme_order_and_what_stays_mmengines():
    register_loaders()
    register_loaders()                                             # idempotent
    assert _loader_name("ckptmgr:s3://b/run/step_00000001") == "load_from_ckptmgr"   # not petrel's s3 regex
    assert _loader_name("s3://b/model.pth") == "load_from_ckptmgr_registry"
    assert _loader_name("gs://b/model.pth") == "load_from_ckptmgr_registry"          # any fsspec protocol
    assert _loader_name("torchvision://resnet18") == "load_from_ckptmgr_registry"
    assert _loader_name("open-mmlab://resnet50_v1c") == "load_from_ckptmgr_registry"
    assert _loader_name("open-mmlab:s3://b/model.pth") == "load_from_ckptmgr_registry"  # cluster names: s3fs
    assert _loader_name("pavi://model") == "load_from_pavi"
    assert _loader_name("/local/model.pth") == "load_from_local"


def test_keeping_mmengines_builtins(http_server):
    register_loaders(replace_builtins=False)
    assert _loader_name(http_server.url("/m.pth")) == "load_from_http"
    assert _loader_name("s3://b/model.pth") == "load_from_ckptmgr_registry"   # a scheme mmengine lacks


def test_pickle_stays_off_unless_trusted(http_server, tmp_path):
    canary = str(tmp_path / "canary")

    class Canary:
        def __reduce__(self):
            return (open, (canary, "w"))
    url = http_server.add("/evil.pth", pickle.dumps({"state_dict": Canary()}))
    register_loaders()
    with pytest.raises(UnsafeCheckpointError):
        MMCheckpointLoader.load_checkpoint(url, "cpu")
    assert not os.path.exists(canary)
