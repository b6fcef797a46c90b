"""Issue 19, points 1 and 2: ``save_checkpoint`` as mmcv 1.x and mmengine call it.

mmengine: ``save_checkpoint(checkpoint: dict, filename, file_client_args=None, backend_args=None)``
saves the object as given (mmengine/runner/checkpoint.py:732-793); mmcv 1.x:
``save_checkpoint(model, filename, optimizer=None, meta=None, file_client_args=None)``
builds ``{'meta', 'state_dict', 'optimizer'}`` (mmcv/runner/checkpoint.py:749-821).
"""
import warnings

import pytest
import torch

import ckptmgr
from ckptmgr import errors
from tests.compat.upstream import Model, aws_env, new_bucket, same_weights

# --------------------------------------------------------------------------- point 1: the mmengine form


def test_p1_save_checkpoint_takes_a_checkpoint_dict_and_saves_it_as_given(tmp_path):
    model = Model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    checkpoint = {"meta": {"epoch": 3, "CLASSES": ("a", "b")}, "state_dict": model.state_dict(),
                  "optimizer": optimizer.state_dict()}
    path = tmp_path / "epoch_3.pth"

    ckptmgr.save_checkpoint(checkpoint, str(path))

    loaded = torch.load(path, weights_only=True)
    assert set(loaded) == {"meta", "state_dict", "optimizer"}
    assert loaded["meta"] == {"epoch": 3, "CLASSES": ("a", "b")}  # nothing added
    assert loaded["optimizer"]["param_groups"] == optimizer.state_dict()["param_groups"]
    fresh = Model()
    ckptmgr.load_checkpoint(fresh, str(path))
    assert same_weights(fresh, model)


def test_p1_a_bare_state_dict_is_the_file_and_keeps_module_versions(tmp_path):
    """mmengine suite test_load_from_local / test_load_checkpoint_metadata save model.state_dict() itself."""
    model = Model()
    path = tmp_path / "sd.pth"
    ckptmgr.save_checkpoint(model.state_dict(), str(path))
    loaded = torch.load(path, weights_only=True)
    assert list(loaded) == list(model.state_dict())
    assert loaded._metadata["block"]["version"] == 1  # _load_from_state_dict upgrades still run


@pytest.mark.parametrize("layout", ["meta+state_dict", "bare state dict", "model key"])
def test_p1_checkpoint_dicts_to_safetensors_round_trip_without_pickle(tmp_path, layout):
    from safetensors import safe_open
    model = Model()
    checkpoint = {"meta+state_dict": {"meta": {"epoch": 1}, "state_dict": model.state_dict()},
                  "bare state dict": model.state_dict(),
                  "model key": {"model": model.state_dict(), "step": 7}}[layout]
    path = tmp_path / "x.safetensors"

    ckptmgr.save_checkpoint(checkpoint, str(path))

    loaded = ckptmgr.CheckpointLoader.load_checkpoint(str(path))
    assert set(loaded) == set(checkpoint)
    if layout != "bare state dict":
        assert {k: v for k, v in loaded.items() if not isinstance(v, dict)} == \
               {k: v for k, v in checkpoint.items() if not isinstance(v, dict)}
    fresh = Model()
    ckptmgr.load_checkpoint(fresh, str(path), strict=True)
    assert same_weights(fresh, model)
    with safe_open(str(path), "pt") as fh:  # the weights sit under their bare keys for any safetensors tool
        assert set(model.state_dict()) <= set(fh.keys())


def test_p1_files_of_the_dict_form_load_in_mmengine(tmp_path):
    me = pytest.importorskip("mmengine.runner.checkpoint")
    model = Model()
    path = tmp_path / "x.pth"
    ckptmgr.save_checkpoint({"meta": {"epoch": 1}, "state_dict": model.state_dict()}, str(path))
    fresh = Model()
    me.load_checkpoint(fresh, str(path), map_location="cpu", logger="silent")
    assert same_weights(fresh, model)


@pytest.mark.parametrize("bad", [42, "model", [1, 2], None], ids=["int", "str", "list", "None"])
def test_p1_a_wrong_first_argument_is_a_typed_error_naming_both_forms(tmp_path, bad):
    with pytest.raises(TypeError) as info:
        ckptmgr.save_checkpoint(bad, str(tmp_path / "x.pth"))
    assert isinstance(info.value, errors.SaveArgumentError)  # a typed error (ckptmgr.errors)
    assert "mmcv form" in str(info.value) and "mmengine form" in str(info.value)
    assert not (tmp_path / "x.pth").exists()


def test_p1_a_dict_with_optimizer_or_meta_is_refused(tmp_path):
    model = Model()
    with pytest.raises(TypeError, match="into the dict"):
        ckptmgr.save_checkpoint(model.state_dict(), str(tmp_path / "x.pth"), meta={"epoch": 1})
    assert not (tmp_path / "x.pth").exists()


def test_p1_guard_the_mmcv_form_still_builds_meta_state_dict_optimizer(tmp_path):
    """mmcv/runner/checkpoint.py:769-792; the suites also expect TypeError for a meta that is not a dict."""
    model = Model()
    model.CLASSES = ("c1", "c2")
    path = tmp_path / "mmcv.pth"
    ckptmgr.save_checkpoint(model, str(path), torch.optim.SGD(model.parameters(), lr=0.1), {"epoch": 1})
    loaded = torch.load(path, weights_only=True)
    assert set(loaded) == {"meta", "state_dict", "optimizer"}
    assert loaded["meta"]["epoch"] == 1 and loaded["meta"]["CLASSES"] == ("c1", "c2")
    with pytest.raises(TypeError):
        ckptmgr.save_checkpoint(model, str(tmp_path / "y.pth"), meta="invalid type")


# --------------------------------------------------------------------------- point 2: storage arguments

LOCAL_ARGS = [
    pytest.param({"file_client_args": None}, id="file_client_args=None"),
    pytest.param({"backend_args": None}, id="backend_args=None"),
    pytest.param({"file_client_args": {"backend": "disk"}}, id="mmcv-disk"),
    pytest.param({"backend_args": {"backend": "local"}}, id="mmengine-local"),
]


@pytest.mark.parametrize("kwargs", LOCAL_ARGS)
@pytest.mark.parametrize("form", ["module", "dict"])
def test_p2_local_storage_arguments_are_accepted_silently(tmp_path, kwargs, form):
    model = Model()
    path = tmp_path / "x.pth"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ckptmgr.save_checkpoint(model if form == "module" else model.state_dict(), str(path), **kwargs)
    fresh = Model()
    ckptmgr.load_checkpoint(fresh, str(path))
    assert same_weights(fresh, model)


def test_p2_both_storage_arguments_at_once_is_a_value_error(tmp_path):
    """mmengine/runner/checkpoint.py:755-758."""
    with pytest.raises(ValueError) as info:
        ckptmgr.save_checkpoint(Model().state_dict(), str(tmp_path / "x.pth"),
                                file_client_args={"backend": "disk"}, backend_args={"backend": "local"})
    assert isinstance(info.value, errors.BackendArgumentError)


def test_p2_an_unknown_backend_is_a_value_error(tmp_path):
    """Both upstreams: ValueError('Backend nosuch is not supported ...')."""
    with pytest.raises(ValueError, match="nosuch"):
        ckptmgr.save_checkpoint(Model(), str(tmp_path / "x.pth"), backend_args={"backend": "nosuch"})


def test_p2_petrel_backend_with_an_endpoint_writes_to_that_s3(moto_server, monkeypatch):
    aws_env(monkeypatch, endpoint=None)  # the endpoint comes from the arguments only
    bucket = new_bucket(moto_server)
    model = Model()
    url = f"s3://{bucket}/epoch_1.pth"

    ckptmgr.save_checkpoint(model.state_dict(), url, backend_args={"backend": "petrel", "endpoint_url": moto_server})

    fresh = Model()
    ckptmgr.load_checkpoint(fresh, url, storage_options={"endpoint_url": moto_server})
    assert same_weights(fresh, model)


def test_p2_petrel_path_mapping_rewrites_the_name(s3, tmp_path, monkeypatch):
    """PetrelBackend._map_path: path_mapping={'src': 'dst'} replaces the first occurrence."""
    monkeypatch.chdir(tmp_path)
    model = Model()
    ckptmgr.save_checkpoint(model, "work_dirs/epoch_1.pth",
                            file_client_args={"backend": "petrel", "path_mapping": {"work_dirs/": f"{s3}/runs/"}})
    assert not (tmp_path / "work_dirs").exists()
    fresh = Model()
    ckptmgr.load_checkpoint(fresh, f"{s3}/runs/epoch_1.pth")
    assert same_weights(fresh, model)


def test_p2_options_without_a_meaning_warn_naming_storage_options(s3):
    """petrel's enable_mc (memcached) has no fsspec counterpart: DeprecationWarning, the save still happens."""
    model = Model()
    url = f"{s3}/x.pth"
    with pytest.warns(DeprecationWarning, match="storage_options"):
        ckptmgr.save_checkpoint(model, url, file_client_args={"backend": "petrel", "enable_mc": True})
    fresh = Model()
    ckptmgr.load_checkpoint(fresh, url)
    assert same_weights(fresh, model)
