"""Sharded checkpoints in one process: DCP's metadata pickle is checked, then read with an allowlist; export."""
import logging
import os
import pickle
import subprocess
import sys

import pytest
import torch

from ckptmgr import CheckpointManager, sharded
from ckptmgr.errors import ChecksumError, UnsafeCheckpointError
from ckptmgr.format.checksum import FileEntry
from ckptmgr.format.manifest import Manifest
from tests.sharded._workers import plain_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def saved(tmp_path):
    """Steps 1 and 2 of a plain model saved sharded (sharded=True) in one process."""
    torch.manual_seed(0)
    model = plain_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    directory = str(tmp_path / "run")
    with CheckpointManager(directory, sharded=True) as mgr:
        for step in (1, 2):
            model(torch.randn(4, 16)).sum().backward()
            opt.step()
            opt.zero_grad()
            mgr.save(step, model=model, optimizer=opt)
    return directory, model


def _metadata(directory, step=2):
    return os.path.join(directory, f"step_{step:08d}", "dcp.metadata")


class _Canary:
    """Unpickling this creates a file: proof that a pickle ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_flipped_metadata_byte_is_a_checksum_error_and_latest_falls_back(saved, caplog):
    directory, model = saved
    path = _metadata(directory)
    with open(path, "r+b") as fh:
        fh.seek(os.path.getsize(path) // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0x01]))
    mgr = CheckpointManager(directory)
    fresh = plain_model()
    for verify in (True, False):
        with pytest.raises(ChecksumError, match="dcp.metadata"):
            mgr.restore(2, model=fresh, verify=verify)
    assert mgr.restore(model=fresh).step == 1    # the damaged newest step is skipped
    assert "step 2 is damaged" in caplog.text


def test_a_malicious_metadata_pickle_is_refused_before_it_is_unpickled(saved, tmp_path):
    directory, _ = saved
    live = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Canary(str(live))))
    assert live.exists()                         # the payload is real: unpickling it creates its file
    canary = tmp_path / "canary"
    path = _metadata(directory)
    payload = pickle.dumps(_Canary(str(canary)))
    size = os.path.getsize(path)
    assert len(payload) < size
    with open(path, "wb") as fh:                 # same size, so only the checksum can tell; manifest untouched
        fh.write(payload + b"\0" * (size - len(payload)))
    mgr = CheckpointManager(directory)
    for verify in (True, False):
        with pytest.raises(ChecksumError):
            mgr.restore(2, model=plain_model(), verify=verify)
    with pytest.raises(ChecksumError):
        sharded.consolidate(os.path.dirname(path))
    with pytest.raises(ChecksumError):
        sharded.consolidate(os.path.dirname(path), verify=False)
    assert not canary.exists()


def _forge(directory, payload, step=2):
    """Replace a step's dcp.metadata with ``payload`` and recompute the manifest so every checksum matches."""
    from ckptmgr.format.checksum import digest_of
    step_dir = os.path.join(directory, f"step_{step:08d}")
    with open(os.path.join(step_dir, "dcp.metadata"), "wb") as fh:
        fh.write(payload)
    path = os.path.join(step_dir, "manifest.json")
    manifest = Manifest.from_bytes(open(path, "rb").read())
    manifest.files["dcp.metadata"] = FileEntry(len(payload), digest_of(payload, manifest.checksum))
    manifest.raw = None
    with open(path, "wb") as fh:
        fh.write(manifest.to_bytes())  # a manifest that checks out: only the allowlist stands in the way
    return step_dir


def _real_metadata_with_a_gadget(directory, canary):
    """DCP's own Metadata object for step 2, with a payload hidden in a field DCP never reads."""
    with open(_metadata(directory), "rb") as fh:
        metadata = pickle.load(fh)  # our own file, written just now by the fixture: trusted here
    metadata.planner_data = {"note": _Canary(canary)}
    return pickle.dumps(metadata)


@pytest.mark.parametrize("forgery", ["bare canary pickle", "real metadata with a gadget"])
def test_a_forged_metadata_with_a_recomputed_manifest_never_runs(saved, tmp_path, forgery, caplog):
    directory, _ = saved
    canary = tmp_path / "canary"
    payload = pickle.dumps(_Canary(str(canary))) if forgery.startswith("bare") else \
        _real_metadata_with_a_gadget(directory, str(canary))
    step_dir = _forge(directory, payload)
    mgr = CheckpointManager(directory)
    for verify in (True, False):
        with pytest.raises(UnsafeCheckpointError, match="refusing to load DCP metadata"):
            mgr.restore(2, model=plain_model(), verify=verify)
    with caplog.at_level(logging.WARNING):
        assert mgr.restore(model=plain_model()).step == 1  # the latest restore skips the forged step
    assert "step 2 is damaged" in caplog.text
    with pytest.raises(UnsafeCheckpointError):
        sharded.consolidate(step_dir)
    with pytest.raises(UnsafeCheckpointError):
        sharded.consolidate(step_dir, verify=False)
    out = tmp_path / "exported.safetensors"
    with pytest.raises(UnsafeCheckpointError):
        sharded.export(step_dir, str(out))
    assert not out.exists()
    proc = subprocess.run([sys.executable, "-m", "ckptmgr.cli", "inspect", step_dir], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "refusing to load DCP metadata" in proc.stderr, proc.stderr[-600:]
    assert "Traceback" not in proc.stderr and "--trust-pickle" not in proc.stderr
    assert not canary.exists()


def test_sharded_setting_is_validated_and_auto_keeps_plain_models_unsharded(tmp_path):
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="sharded"):
            CheckpointManager(str(tmp_path), sharded=bad)
    model = plain_model()
    from ckptmgr.sharded.detect import use_sharded
    assert not use_sharded("auto", model) and use_sharded(True, model)
    path = CheckpointManager(str(tmp_path / "plain")).save(1, model=model)
    assert "model.safetensors" in os.listdir(path)


def test_export_writes_safetensors_by_default(saved, tmp_path):
    from safetensors.torch import load_file
    directory, model = saved
    out = sharded.export(os.path.join(directory, "step_00000002"), str(tmp_path / "weights"))
    assert out.endswith(".safetensors")
    exported = load_file(out)
    assert set(exported) == set(model.state_dict())
    assert all(torch.equal(exported[k], v) for k, v in model.state_dict().items())
