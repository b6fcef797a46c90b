"""Skeleton encoding and the streaming safetensors reader/writer."""
import io
import json
import math
import random
import struct
from collections import OrderedDict

import numpy as np
import pytest
import torch

from ckptmgr.errors import CorruptCheckpointError, UnserializableStateError
from ckptmgr.format.checkpoint_file import sniff_format
from ckptmgr.format.safetensors import read_safetensors, read_safetensors_header, write_safetensors
from ckptmgr.format.skeleton import from_skeleton, to_skeleton


def test_skeleton_round_trip_exotic_values():
    np_state = np.random.RandomState(3).get_state()
    obj = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 2)}, 1: {}},
        "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0, 1], "foreach": None}],
        "floats": [math.inf, -math.inf], "nan": math.nan, "bytes": b"\x00\xff",
        "py_rng": random.Random(1).getstate(), "np_rng": np_state, "dtype": torch.bfloat16,
        "device": torch.device("cpu"), "__dunder_key__": 1, "shape": torch.Size([2, 3]),
        "np_scalar": np.float32(1.5),
    }
    skeleton, tensors = to_skeleton(obj)
    back = from_skeleton(json.loads(json.dumps(skeleton)), tensors)
    assert back["state"][0]["step"] is obj["state"][0]["step"]
    assert list(back["state"]) == [0, 1]  # int keys survive JSON
    assert back["param_groups"][0]["betas"] == (0.9, 0.999)
    assert back["floats"] == [math.inf, -math.inf] and math.isnan(back["nan"])
    assert back["bytes"] == b"\x00\xff"
    assert back["py_rng"] == obj["py_rng"]
    assert back["np_rng"][0] == np_state[0] and np.array_equal(back["np_rng"][1], np_state[1])
    assert back["np_rng"][1].dtype == np_state[1].dtype
    assert back["dtype"] is torch.bfloat16 and back["device"] == torch.device("cpu")
    assert back["__dunder_key__"] == 1 and back["shape"] == (2, 3) and back["np_scalar"] == 1.5


def test_skeleton_rejects_arbitrary_objects():
    with pytest.raises(UnserializableStateError, match="root.cfg"):
        to_skeleton({"cfg": object()})


def test_safetensors_round_trip_all_dtypes_and_in_place_read():
    tensors = OrderedDict()
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int8,
                  torch.uint8, torch.bool):
        tensors[str(dtype)] = (torch.randn(3, 5) * 10).to(dtype)
    tensors["scalar"] = torch.tensor(7.0)
    tensors["empty"] = torch.zeros(0, 4)
    tensors["strided"] = torch.arange(20.0).reshape(4, 5).t()  # non-contiguous
    buf = io.BytesIO()
    n = write_safetensors(buf, tensors, {"note": "x"})
    assert n == len(buf.getvalue())
    from safetensors.torch import load as reference_load
    ref = reference_load(buf.getvalue())
    buf.seek(0)
    dest = {"float32": torch.empty(3, 5)}
    dest["torch.float32"] = dest.pop("float32")
    out, meta = read_safetensors(buf, size=n, into=dest)
    assert meta == {"note": "x"}
    assert out["torch.float32"] is dest["torch.float32"]  # filled in place, no extra tensor
    for key, value in tensors.items():
        assert torch.equal(out[key], value) and torch.equal(ref[key], value), key


def _file(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize("blob", [
    b"",
    b"\x05\x00",
    struct.pack("<Q", 10 ** 12) + b"{}",                                            # huge header claim
    _file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\x00" * 4),       # truncated data
    _file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
           "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\x00" * 12),     # overlap
    _file({"a": {"dtype": "F32", "shape": [10 ** 9], "data_offsets": [0, 4 * 10 ** 9]}}),    # huge tensor claim
    _file({"a": {"dtype": "XX", "shape": [1], "data_offsets": [0, 4]}}, b"\x00" * 4),        # unknown dtype
    _file({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\x00" * 4),
    struct.pack("<Q", 4) + b"{{{{",
])
def test_bad_safetensors_raise_corrupt(blob):
    with pytest.raises(CorruptCheckpointError):
        read_safetensors(io.BytesIO(blob), size=len(blob))


def test_header_check_without_known_size_still_catches_truncation():
    blob = _file({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\x00" * 10)
    with pytest.raises(CorruptCheckpointError, match="ends early"):
        read_safetensors(io.BytesIO(blob))
    header, start = read_safetensors_header(io.BytesIO(blob))
    assert start == len(blob) - 10 and "a" in header


def test_sniff_format():
    assert sniff_format(b"PK\x03\x04rest") == "torch"
    assert sniff_format(b"\x80\x02}q") == "torch"
    assert sniff_format(_file({"a": 1})[:16]) == "safetensors"
    assert sniff_format(b"anything", "w.safetensors") == "safetensors"
    assert sniff_format(b"hello world!") == "unknown"
