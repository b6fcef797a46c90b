"""Issue 19, points 5-7: scheme prefixes, how loaders are called, unknown keywords.

Upstream prefixes are regular expressions tried with ``re.match``
(mmengine/runner/checkpoint.py:293-308, mmcv :273-288), the local loader is
registered under ``''`` (mmengine :333, mmcv :317), S3 names may carry a
cluster (``r'(\\S+\\:)?s3://'``, mmengine :419-420, mmcv :403), loaders are called
``checkpoint_loader(filename, map_location)`` (mmengine :330, mmcv :314), and
no loading function takes ``**kwargs``.
"""
import re

import pytest
import torch

import ckptmgr
from ckptmgr import errors
from ckptmgr.errors import UnknownSchemeError
from tests.compat.upstream import Model, same_weights

registry = ckptmgr.CheckpointLoader


def _loader(name):
    def load(filename, map_location=None):
        return {"loader": name, "filename": filename}
    load.__name__ = name
    return load


# --------------------------------------------------------------------------- point 5: prefixes


def test_p5_regex_prefixes_match_with_re_match():
    loader = _loader("load_from_myfs")
    registry.register_scheme(r"(\S+\:)?myfs://", loader)
    assert registry.get_loader("myfs://bucket/x.pth") is loader
    assert registry.get_loader("cluster1:myfs://bucket/x.pth") is loader
    assert registry.load_checkpoint("cluster1:myfs://bucket/x.pth")["loader"] == "load_from_myfs"


@pytest.mark.parametrize("name", ["open-mmlab:s3://bucket/x.pth", "openmmlab:s3://bucket/x.pth",
                                  "cluster1:s3://bucket/x.pth"])
def test_p5_cluster_qualified_s3_routes_to_the_s3_loader(name):
    assert registry.get_loader(name) is registry.get_loader("s3://bucket/x.pth")


def test_p5_replacing_the_s3_loader_covers_cluster_qualified_names():
    """The longer built-in regex must not shadow a user's force=True replacement of 's3://'."""
    mine = _loader("load_from_my_s3")
    registry.register_scheme("s3://", mine, force=True)
    assert registry.get_loader("s3://bucket/x.pth") is mine
    assert registry.get_loader("cluster1:s3://bucket/x.pth") is mine


def test_p5_cluster_qualified_s3_loads_from_s3(s3):
    model = Model()
    ckptmgr.save_checkpoint(model, f"{s3}/w.pth")
    fresh = Model()
    ckptmgr.load_checkpoint(fresh, f"open-mmlab:{s3}/w.pth")
    assert same_weights(fresh, model)


@pytest.mark.parametrize("name", [" s3://xx.xx/xx.pth", ":s3://xx.xx/xx.path"])
def test_p5_near_misses_without_a_scheme_are_local_paths(name):
    """The suites' table: these go to load_from_local upstream too."""
    assert registry.get_loader(name) is registry.get_loader("plain/relative/path.pth")
    with pytest.raises(ckptmgr.CheckpointNotFoundError):
        registry.load_checkpoint(name)


@pytest.mark.parametrize("name", ["ss3://xx.xx/xx.pth", "openmmlabs3://xx.xx/xx.pth"])
def test_p5_unknown_schemes_are_refused_and_are_file_not_found(name):
    """Upstream hands these to load_from_local, which raises FileNotFoundError (mmengine :345-346); ckptmgr
    refuses them before touching the disk (README: never a local path) with an error that is both."""
    with pytest.raises(UnknownSchemeError) as info:
        ckptmgr.load_checkpoint(Model(), name)
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(FileNotFoundError):
        registry.get_loader(name)


def test_p5_longest_prefix_wins_between_a_regex_and_a_literal():
    short, long_ = _loader("short"), _loader("long")
    registry.register_scheme("zoo://", short)
    registry.register_scheme(r"zoo://[a-z]+/special/", long_)
    assert registry.get_loader("zoo://team/special/x.pth") is long_
    assert registry.get_loader("zoo://team/other/x.pth") is short


def test_p5_a_compiled_pattern_is_a_regex():
    loader = _loader("load_from_versioned")
    registry.register_scheme(re.compile(r"v\d+\.store://"), loader)
    assert registry.get_loader("v12.store://x.pth") is loader


def test_p5_guard_plain_prefixes_with_scheme_characters_match_literally():
    """'+' and '.' are legal in a scheme and a path: they never make a prefix a regex."""
    loader = _loader("load_from_weird")
    registry.register_scheme("weird+fs://bucket.v1/", loader)
    assert registry.get_loader("weird+fs://bucket.v1/x.pth") is loader
    assert registry.get_loader("WEIRD+FS://bucket.v1/x.pth") is loader  # scheme case-insensitive, as before
    with pytest.raises(UnknownSchemeError):
        registry.get_loader("weird+fs://bucketXv1/x.pth")


def test_p5_guard_upstream_sort_duplicates_and_force():
    """The suites' 'test sort' (a/b vs a/b/c), KeyError on a duplicate, force=True."""
    ab, abc = _loader("load_from_ab"), _loader("load_from_abc")
    registry.register_scheme(prefixes="a/b", loader=ab)
    registry.register_scheme(prefixes="a/b/c", loader=abc)
    assert registry.get_loader("a/b/c/d") is abc
    with pytest.raises(KeyError):
        registry.register_scheme("a/b", abc)
    registry.register_scheme("a/b", abc, force=True)
    assert registry.get_loader("a/b/x") is abc


def test_p5_the_private_get_checkpoint_loader_is_kept():
    """Both suites (and downstream code) call CheckpointLoader._get_checkpoint_loader(path)."""
    assert registry._get_checkpoint_loader("http://x/y.pth") is registry.get_loader("http://x/y.pth")
    assert registry._get_checkpoint_loader("x.pth").__name__ == "load_from_local"


def test_p5_the_empty_prefix_is_the_local_fallback(tmp_path):
    """Upstream registers load_from_local under ''; force=True replaces it."""
    with pytest.raises(KeyError):
        registry.register_scheme("", _loader("mine"))
    registry.register_scheme("", _loader("my_local"), force=True)
    assert registry.load_checkpoint(str(tmp_path / "x.pth"))["loader"] == "my_local"


# --------------------------------------------------------------------------- point 6: positional calls


def test_p6_loaders_get_map_location_by_position():
    model = Model()
    calls = []

    def load_from_pos(path, loc):
        calls.append((path, loc))
        return {"state_dict": model.state_dict()}

    registry.register_scheme("posfs://", load_from_pos)
    assert list(registry.load_checkpoint("posfs://a.pth", "cpu")) == ["state_dict"]
    fresh = Model()
    ckptmgr.load_checkpoint(fresh, "posfs://b.pth", map_location="cpu")
    assert same_weights(fresh, model)
    assert calls == [("posfs://a.pth", "cpu"), ("posfs://b.pth", "cpu")]


def test_p6_framework_keywords_reach_only_loaders_that_declare_them():
    seen = {}

    def plain(path, loc=None):
        return {"w": torch.zeros(1)}

    def declaring(filename, map_location=None, trust_pickle=False, check_hash=True):
        seen.update(trust_pickle=trust_pickle, check_hash=check_hash)
        return {"w": torch.zeros(1)}

    registry.register_scheme("plainfs://", plain)
    registry.register_scheme("optfs://", declaring)
    assert "w" in registry.load_checkpoint("plainfs://x", None, trust_pickle=True, storage_options=None)
    registry.load_checkpoint("optfs://x", trust_pickle=True, check_hash=False)
    assert seen == {"trust_pickle": True, "check_hash": False}


# --------------------------------------------------------------------------- point 7: unknown keywords


@pytest.fixture
def state_dict_file(tmp_path):
    path = tmp_path / "sd.pth"
    torch.save(Model().state_dict(), path)
    return str(path)


@pytest.mark.parametrize("call", [
    pytest.param(lambda f: ckptmgr.load_checkpoint(Model(), f, map_locaton="cpu"), id="load_checkpoint"),
    pytest.param(lambda f: ckptmgr.load_checkpoint_with_prefix("block", f, map_locaton="cpu"),
                 id="load_checkpoint_with_prefix"),
    pytest.param(lambda f: registry.load_checkpoint(f, map_locaton="cpu"), id="CheckpointLoader.load_checkpoint"),
])
def test_p7_unknown_keywords_raise_type_error(state_dict_file, call):
    with pytest.raises(TypeError, match="map_locaton") as info:
        call(state_dict_file)
    assert isinstance(info.value, errors.UnexpectedKeywordError)


def test_p7_a_keyword_the_chosen_loader_does_not_declare_is_rejected(state_dict_file):
    """check_hash means something to the http and zoo loaders only; for a local file it is a mistake."""
    with pytest.raises(TypeError, match="check_hash.*load_from_local"):
        ckptmgr.load_checkpoint(Model(), state_dict_file, check_hash=False)


def test_p7_guard_zoo_names_that_resolve_to_local_files_still_load(tmp_path, monkeypatch):
    """The zoo loaders pass check_hash on only to loaders that take it (a zoo entry may name a file)."""
    import json
    import os
    home = os.environ["CKPTMGR_HOME"]
    model = Model()
    torch.save({"state_dict": model.state_dict()}, os.path.join(home, "mine.pth"))
    with open(os.path.join(home, "open_mmlab.json"), "w") as fh:
        json.dump({"compat_local_model": "mine.pth"}, fh)
    fresh = Model()
    ckptmgr.load_checkpoint(fresh, "open-mmlab://compat_local_model")
    assert same_weights(fresh, model)
