"""The Hugging Face shard layout (sizes, plans, index), dtype casts, and the exclude rules, on plain data."""
import json

import pytest
import torch

from ckptmgr.errors import CheckpointFormatError, CorruptCheckpointError
from ckptmgr.exporter import layout_of
from ckptmgr.format.hf_layout import build_index, parse_index, parse_size, plan_shards, shard_name
from ckptmgr.state.cast import cast_floating, parse_dtype
from ckptmgr.state.partial import Exclusion


@pytest.mark.parametrize("text, expected", [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30),
                                            ("10kb", 10_000), ("1.5MB", 1_500_000), ("4096", 4096), (123, 123)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["lots", "5 GBs", "-1", 0, True, "0MB"])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_plan_closes_a_shard_before_it_overflows_and_gives_a_big_tensor_its_own():
    tensors = {"a": torch.zeros(10), "b": torch.zeros(10), "big": torch.zeros(100), "c": torch.zeros(5)}  # fp32
    assert plan_shards(tensors, 80) == [["a", "b"], ["big"], ["c"]]
    assert plan_shards(tensors, None) == [["a", "b", "big", "c"]]
    assert plan_shards({}, 10) == []


def test_index_maps_every_key_and_counts_every_byte():
    tensors = {"a": torch.zeros(10), "b": torch.zeros(10, dtype=torch.bfloat16)}
    index = json.loads(build_index([["a"], ["b"]], tensors))
    assert index == {"metadata": {"total_size": 60}, "weight_map": {"a": shard_name(1, 2), "b": shard_name(2, 2)}}
    assert shard_name(1, 2) == "model-00001-of-00002.safetensors"
    assert parse_index(json.dumps(index).encode()) == index["weight_map"]


@pytest.mark.parametrize("weight_map", [{"a": "../elsewhere.safetensors"}, {"a": "sub/x.safetensors"},
                                        {"a": "x.pth"}, {"a": ".hidden.safetensors"}, ["a"]])
def test_index_names_only_safetensors_files_in_its_directory(weight_map):
    with pytest.raises(CorruptCheckpointError):
        parse_index(json.dumps({"weight_map": weight_map}).encode())
    with pytest.raises(CorruptCheckpointError):
        parse_index(b"not json")


def test_cast_changes_only_floating_point_tensors():
    state = {"w": torch.randn(3), "n": torch.tensor(5), "mask": torch.tensor([True]), "note": "x"}
    out = cast_floating(state, parse_dtype("bfloat16"))
    assert out["w"].dtype == torch.bfloat16 and torch.equal(out["w"], state["w"].to(torch.bfloat16))
    assert out["n"] is state["n"] and out["mask"] is state["mask"] and out["note"] == "x"
    assert cast_floating(state, None)["w"] is state["w"]
    assert parse_dtype("torch.float16") is torch.float16 and parse_dtype(torch.bfloat16) is torch.bfloat16
    for bad in ("int8", torch.int64, "float8"):
        with pytest.raises(ValueError):
            parse_dtype(bad)


def test_layout_of_destination_names(tmp_path):
    assert layout_of("w.safetensors") == layout_of("w.pth") == "file"
    assert layout_of(str(tmp_path / "hf")) == layout_of("s3://b/llama-3.1") == layout_of("out.v2/") == "directory"
    (tmp_path / "dir.v2").mkdir()
    assert layout_of(str(tmp_path / "dir.v2")) == "directory"
    for bad, size in (("w.txt", None), ("w.safetensors", "1GB")):
        with pytest.raises(ValueError):
            layout_of(bad, size)


def test_exclusion_rules():
    ex = Exclusion.parse(("optimizer", "re:^head\\.", "re:\\.bias$"))
    assert ex.drops("optimizer") and not ex.drops("scheduler")
    assert ex.drops_key("head.weight") and ex.drops_key("fc.bias") and not ex.drops_key("fc.weight")
    kept, dropped = ex.filter_model({"head.weight": 1, "fc.weight": 2, "fc.bias": 3})
    assert list(kept) == ["fc.weight"] and dropped == ["head.weight", "fc.bias"]
    assert not Exclusion.parse(()) and not Exclusion.parse(None) and Exclusion.parse("rng").drops("rng")
    with pytest.raises(CheckpointFormatError):
        Exclusion.parse(["head"])
