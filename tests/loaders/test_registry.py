"""The scheme registry: dispatch, registration, isolation, logging."""
import logging
import pathlib

import pytest
import torch

import ckptmgr
from ckptmgr.errors import MissingDependencyError, UnknownSchemeError
from ckptmgr.loaders.fsspec import load_from_fsspec
from ckptmgr.loaders.http import load_from_http
from ckptmgr.loaders.local import load_from_local
from ckptmgr.loaders.zoo import load_from_mmcls, load_from_openmmlab, load_from_torchvision


@pytest.mark.parametrize("uri,loader", [
    ("http://host/x.pth", load_from_http),
    ("https://host/x.pth", load_from_http),
    ("modelzoo://resnet50", load_from_torchvision),
    ("torchvision://resnet50", load_from_torchvision),
    ("open-mmlab://resnet50_v1c", load_from_openmmlab),
    ("openmmlab://resnet50_v1c", load_from_openmmlab),
    ("mmcls://resnet50", load_from_mmcls),
    ("s3://bucket/x.pth", load_from_fsspec),
    ("S3://bucket/x.pth", load_from_fsspec),
    ("memory://x.pth", load_from_fsspec),
    ("gs://bucket/x.pth", load_from_fsspec),
    ("az://container/x.pth", load_from_fsspec),
    ("file:///tmp/x.pth", load_from_local),
    ("/tmp/x.pth", load_from_local),
    ("relative/dir/x.pth", load_from_local),
    (pathlib.Path("/tmp/x.pth"), load_from_local),
])
def test_dispatch_table(registry, uri, loader):
    assert registry.get_loader(uri) is loader


def test_unregistered_scheme_is_an_error_not_a_local_path(registry):
    with pytest.raises(UnknownSchemeError) as info:
        registry.get_loader("ss3://x")
    text = str(info.value)
    assert "ss3://" in text and "s3://" in text and "open-mmlab://" in text  # lists what is registered
    with pytest.raises(UnknownSchemeError):
        registry.load_checkpoint("ss3://x")


def test_longest_prefix_wins(registry):
    def load_ab(filename, map_location=None):
        return "a/b"

    def load_abc(filename, map_location=None):
        return "a/b/c"
    registry.register_scheme("a/b", load_ab)
    registry.register_scheme("a/b/c", load_abc)
    assert registry.get_loader("a/b/c/d") is load_abc
    assert registry.get_loader("a/b/x") is load_ab
    assert registry.load_checkpoint("a/b/c/d") == "a/b/c"


def test_longer_prefix_beats_a_builtin(registry):
    def special(filename, map_location=None):
        return "special"
    registry.register_scheme("https://internal.example/", special)
    assert registry.get_loader("https://internal.example/w.pth") is special
    assert registry.get_loader("https://public.example/w.pth") is load_from_http


def test_register_as_call_and_decorator_and_duplicates(registry):
    def first(filename, map_location=None):
        return 1
    assert registry.register_scheme(["myfs://", "myfs2://"], first) is first

    @registry.register_scheme("mydeco://")
    def deco(filename, map_location=None):
        return 2
    assert registry.get_loader("myfs2://x") is first and registry.load_checkpoint("mydeco://x") == 2

    with pytest.raises(KeyError, match="force=True"):
        registry.register_scheme("myfs://", deco)
    with pytest.raises(KeyError):
        registry.register_scheme(("brand-new://", "myfs2://"), deco)
    assert "brand-new://" not in registry.registered_schemes()  # all or nothing
    with pytest.raises(KeyError):
        registry.register_scheme("http://", deco)  # built-ins are protected too

    registry.register_scheme("myfs://", deco, force=True)
    assert registry.get_loader("myfs://x") is deco

    @registry.register_scheme("http://", force=True)
    def override(filename, map_location=None):
        return "mine"
    assert registry.load_checkpoint("http://example.invalid/x.pth") == "mine"


@pytest.mark.parametrize("bad", [[], [None], 3, r"(\S+:s3://"])
def test_bad_prefixes_are_rejected(registry, bad):
    with pytest.raises(TypeError):
        registry.register_scheme(bad, lambda filename, map_location=None: None)


def test_empty_prefix_is_the_local_fallback_and_protected(registry):
    with pytest.raises(KeyError, match="force=True"):
        registry.register_scheme("", lambda filename, map_location=None: None)
    assert registry.get_loader("relative/x.pth") is load_from_local


def test_loader_must_be_callable(registry):
    with pytest.raises(TypeError):
        registry.register_scheme("x://", "not callable")


def test_snapshot_and_restore_undo_registrations(registry):
    snap = registry.snapshot()
    registry.register_scheme("temp://", lambda filename, map_location=None: None)
    registry.register_scheme("http://", lambda filename, map_location=None: None, force=True)
    registry.restore(snap)
    assert "temp://" not in registry.registered_schemes()
    assert registry.get_loader("http://x") is load_from_http


def test_registrations_do_not_leak_between_tests_part1(registry):
    registry.register_scheme("leaky://", lambda filename, map_location=None: None)


def test_registrations_do_not_leak_between_tests_part2(registry):
    assert "leaky://" not in registry.registered_schemes()


def test_loader_receives_only_the_keywords_it_accepts(registry):
    seen = {}

    def minimal(filename, map_location=None):
        seen["args"] = (filename, map_location)
        return {}

    def greedy(filename, map_location=None, **kwargs):
        seen["kwargs"] = kwargs
        return {}
    registry.register_scheme("min://", minimal)
    registry.register_scheme("greedy://", greedy)
    registry.load_checkpoint("min://x", "cpu", trust_pickle=True)  # a framework keyword: dropped
    assert seen["args"] == ("min://x", "cpu")
    with pytest.raises(TypeError, match="check_hash"):  # an option the loader does not declare
        registry.load_checkpoint("min://x", "cpu", check_hash=False)
    registry.load_checkpoint("greedy://x", trust_pickle=True, check_hash=False)
    assert seen["kwargs"] == {"trust_pickle": True, "check_hash": False}


def test_load_logs_the_loader_at_debug(registry, tmp_path, caplog):
    path = tmp_path / "w.pth"
    torch.save({"w": torch.ones(2)}, path)
    with caplog.at_level(logging.DEBUG, logger="ckptmgr"):
        registry.load_checkpoint(str(path))
    assert any("load_from_local" in r.getMessage() and r.levelno == logging.DEBUG for r in caplog.records)
    mine = logging.getLogger("my.training")
    with caplog.at_level(logging.DEBUG, logger="my.training"):
        registry.load_checkpoint(str(path), logger=mine)
    assert any(r.name == "my.training" for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        registry.load_checkpoint(str(path), logger="silent")
    assert not any("load checkpoint from" in r.getMessage() for r in caplog.records)


def test_local_loader_honours_map_location_for_torch_and_safetensors(registry, tmp_path, convnet):
    pth, st = tmp_path / "w.pth", tmp_path / "w.safetensors"
    ckptmgr.save_checkpoint(convnet, str(pth))
    ckptmgr.save_checkpoint(convnet, str(st))
    for path in (str(pth), f"file://{st}"):
        ckpt = registry.load_checkpoint(path, map_location="meta")
        assert all(v.device.type == "meta" for v in ckpt["state_dict"].values())


def test_local_loader_is_weights_only(registry, tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"obj": pathlib.PurePosixPath("/x")}, path)  # needs a global to unpickle
    with pytest.raises(ckptmgr.UnsafeCheckpointError):
        registry.load_checkpoint(str(path))
    assert registry.load_checkpoint(str(path), trust_pickle=True)["obj"] == pathlib.PurePosixPath("/x")


def test_missing_fsspec_backend_names_the_package(registry):
    import importlib.util
    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    with pytest.raises(MissingDependencyError, match="gcsfs"):
        registry.load_checkpoint("gs://bucket/model.pth")
    with pytest.raises(MissingDependencyError, match="gcsfs"):
        ckptmgr.load_checkpoint(torch.nn.Linear(1, 1), "gcs://bucket/model.pth")


def test_memory_urls_load_through_fsspec(registry, convnet):
    ckptmgr.save_checkpoint(convnet, "memory://registry-test/w.pth")
    ckpt = registry.load_checkpoint("memory://registry-test/w.pth", map_location="cpu")
    assert torch.equal(ckpt["state_dict"]["conv.weight"], convnet.conv.weight)
    with pytest.raises(ckptmgr.CheckpointNotFoundError):
        registry.load_checkpoint("memory://registry-test/missing.pth")
