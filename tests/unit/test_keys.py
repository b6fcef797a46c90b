"""Pure key remapping."""
from collections import OrderedDict

import pytest

from ckptmgr.errors import CheckpointFormatError
from ckptmgr.state.keys import revise_keys, select_prefix, strip_compile_prefix, top_level_prefixes


def test_revise_keys_in_order_and_metadata():
    sd = OrderedDict([("module.backbone.w", 1), ("module.head.b", 2)])
    sd._metadata = OrderedDict([("module", {"version": 1}), ("module.backbone", {"version": 2})])
    out = revise_keys(sd, [(r"^module\.", ""), (r"^backbone\.", "trunk.")])
    assert list(out) == ["trunk.w", "head.b"]
    # the wrapper's own prefix maps to the root, the rules rename module prefixes like keys
    assert out._metadata == OrderedDict([("", {"version": 1}), ("trunk", {"version": 2})])
    assert list(revise_keys(sd, [])) == list(sd)
    with pytest.raises(TypeError):
        revise_keys(sd, [("only-one",)])


def test_select_prefix():
    sd = OrderedDict([("backbone.a", 1), ("backbone.b.c", 2), ("neck.x", 3), ("backbonex.y", 4)])
    sd._metadata = OrderedDict([("backbone", {"version": 1}), ("backbone.b", {"version": 2}), ("neck", {})])
    out = select_prefix(sd, "backbone")
    assert out == OrderedDict([("a", 1), ("b.c", 2)])
    assert out._metadata == OrderedDict([("", {"version": 1}), ("b", {"version": 2})])
    assert select_prefix(sd, "backbone.") == out
    with pytest.raises(CheckpointFormatError, match="backbone, backbonex, neck"):
        select_prefix(sd, "head")
    with pytest.raises(CheckpointFormatError):
        select_prefix(sd, "")
    assert top_level_prefixes(["a.b", "c", "a.d"]) == ["a", "c"]


def test_strip_compile_prefix_wherever_compile_put_it():
    sd = OrderedDict([("_orig_mod.fc.w", 1), ("_orig_mod.module.head.b", 2), ("module._orig_mod.x", 3),
                      ("backbone._orig_mod.conv.w", 4), ("my_orig_mod.y", 5)])
    assert list(strip_compile_prefix(sd)) == ["fc.w", "module.head.b", "module.x", "backbone.conv.w", "my_orig_mod.y"]
    plain = OrderedDict([("fc.w", 1)])
    assert strip_compile_prefix(plain) is plain
