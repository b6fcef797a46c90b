"""The allowlist unpickler for DCP metadata: real metadata loads as pickle would; every way to name code is refused."""
import copyreg
import io
import os
import pickle

import pytest
import torch

from ckptmgr import CheckpointManager
from ckptmgr.errors import CorruptCheckpointError, UnsafeCheckpointError
from ckptmgr.sharded.safe_pickle import allowed_globals, load_metadata
from tests.sharded._workers import plain_model

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def metadata_bytes(tmp_path_factory):
    """dcp.metadata of a sharded save holding several dtypes, a 0-dim and an empty tensor, and AdamW state."""
    directory = str(tmp_path_factory.mktemp("dcp") / "run")
    model = plain_model()
    model.register_buffer("bf16", torch.zeros(3, dtype=torch.bfloat16))
    model.register_buffer("flags", torch.ones(2, dtype=torch.bool))
    model.register_buffer("count", torch.tensor(7, dtype=torch.int64))
    model.register_buffer("empty", torch.zeros(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, amsgrad=True)
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    with CheckpointManager(directory, sharded=True) as mgr:
        mgr.save(1, model=model, optimizer=opt)
    with open(os.path.join(directory, "step_00000001", "dcp.metadata"), "rb") as fh:
        return fh.read()


def _globals(data):
    """The (module, name) pairs a pickle references, recorded by the standard unpickler (our own file: trusted)."""
    found = set()

    class Recording(pickle.Unpickler):
        def find_class(self, module, name):
            found.add((module, name))
            return super().find_class(module, name)
    Recording(io.BytesIO(data)).load()
    return found


def test_real_metadata_loads_exactly_as_pickle_does(metadata_bytes):
    assert _globals(metadata_bytes) <= set(allowed_globals())  # the allowlist covers what this torch writes
    loaded = load_metadata(metadata_bytes, "test")
    reference = pickle.loads(metadata_bytes)  # our own file: trusted here, as the reference
    assert loaded.state_dict_metadata == reference.state_dict_metadata
    assert loaded.storage_data == reference.storage_data and loaded.planner_data == reference.planner_data


class _Gadget:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _forgeries(canary):
    yield "builtins.open via __reduce__", pickle.dumps(_Gadget(canary))
    yield "protocol 0 GLOBAL os.system", b"cos\nsystem\n(S'true'\ntR."
    yield "a dotted name inside an allowed module", (
        b"\x80\x04\x8c%torch.distributed.checkpoint.metadata\x8c\x0eMetadata.mro()\x93.")
    yield "torch.load", b"\x80\x02ctorch\nload\nq\x00."
    yield "a persistent id", b"\x80\x02X\x01\x00\x00\x00xQ."
    copyreg.add_extension("os", "system", 0x7E)
    try:
        yield "copyreg extension code 0x7e -> os.system", b"\x80\x02\x82\x7e(X\x04\x00\x00\x00truetR."
    finally:
        copyreg.remove_extension("os", "system", 0x7E)


def test_every_way_to_name_code_is_refused(tmp_path):
    canary = str(tmp_path / "canary")
    for label, data in _forgeries(canary):
        with pytest.raises(UnsafeCheckpointError, match="refusing to load DCP metadata"):
            load_metadata(data, label)
    assert not os.path.exists(canary)


def test_garbage_and_other_objects_are_corrupt_not_unsafe(metadata_bytes):
    with pytest.raises(CorruptCheckpointError):
        load_metadata(metadata_bytes[: len(metadata_bytes) // 2], "truncated")
    with pytest.raises(CorruptCheckpointError, match="holds a Size"):
        load_metadata(pickle.dumps(torch.Size([1, 2])), "a Size")
