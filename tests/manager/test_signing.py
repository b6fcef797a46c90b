"""Signed manifests: a step restores only with the key that signed it; unsigned or altered steps are skipped."""
import json
import logging
import os
import shutil

import pytest

import ckptmgr
from ckptmgr import CheckpointManager
from ckptmgr.errors import ChecksumError, CorruptCheckpointError, SignatureError, StorageError
from ckptmgr.format.manifest import Manifest
from tests.conftest import ConvNet
from tests.manager.helpers import filled

KEY_A = b"a" * 32
KEY_B = b"b" * 32
FIXTURE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "v0_1")


def _model(value):
    return filled(ConvNet(), value)


def _value(model):
    return float(model.conv.weight.detach().flatten()[0])


def _manifest_path(directory, step):
    return os.path.join(directory, f"step_{step:08d}", "manifest.json")


@pytest.fixture
def signed(tmp_path):
    """Steps 1 and 2 signed with key A (weights 1.0 and 2.0)."""
    directory = str(tmp_path / "run")
    with CheckpointManager(directory, signing_key=KEY_A) as mgr:
        mgr.save(1, model=_model(1.0))
        mgr.save(2, model=_model(2.0))
    return directory


def test_a_step_signed_with_a_restores_with_a_only(signed):
    body = json.loads(open(_manifest_path(signed, 2), "rb").read())
    assert body["signature"]["algorithm"] == "hmac-sha256" and len(body["signature"]["hmac"]) == 64
    assert all(len(entry["sha256"]) == 64 for entry in body["files"].values())
    fresh = ConvNet()
    assert CheckpointManager(signed, signing_key=KEY_A).restore(model=fresh).step == 2 and _value(fresh) == 2.0
    with pytest.raises(SignatureError, match="another key"):
        CheckpointManager(signed, signing_key=KEY_B).restore(2, model=ConvNet())
    with pytest.raises(SignatureError, match="no checkpoint .* is signed with the given key"):
        CheckpointManager(signed, signing_key=KEY_B).restore(model=ConvNet())
    assert CheckpointManager(signed, signing_key=False).restore(model=ConvNet()).step == 2  # no key: unchanged


def test_an_unsigned_step_is_refused_with_a_key_before_any_other_file_is_read(tmp_path):
    directory = str(tmp_path / "run")
    with CheckpointManager(directory) as mgr:
        mgr.save(1, model=_model(1.0))
        mgr.save(2, model=_model(2.0))
    assert "signature" not in json.loads(open(_manifest_path(directory, 2), "rb").read())
    os.remove(os.path.join(directory, "step_00000002", "model.safetensors"))  # any read of it would fail
    mgr = CheckpointManager(directory, signing_key=KEY_A)
    with pytest.raises(SignatureError, match="not signed"):
        mgr.restore(2, model=ConvNet())
    with pytest.raises(SignatureError) as info:  # nothing to fall back to, and it says why for every step
        mgr.restore(model=ConvNet())
    assert "step 2:" in str(info.value) and "step 1:" in str(info.value) and "not signed" in str(info.value)
    fresh = ConvNet()
    assert CheckpointManager(directory).restore(1, model=fresh).step == 1 and _value(fresh) == 1.0  # no key


def test_flipping_a_manifest_byte_of_a_signed_step_makes_restore_skip_it(signed, caplog):
    path = _manifest_path(signed, 2)
    data = bytearray(open(path, "rb").read())
    data[data.index(b'"step": 2') + len(b'"step": ')] ^= 0x01  # 2 -> 3
    open(path, "wb").write(bytes(data))
    fresh = ConvNet()
    with caplog.at_level(logging.WARNING):
        assert CheckpointManager(signed, signing_key=KEY_A).restore(model=fresh).step == 1
    assert _value(fresh) == 1.0 and "step 2" in caplog.text
    with pytest.raises(CorruptCheckpointError):
        CheckpointManager(signed, signing_key=KEY_A).restore(2, model=ConvNet())


def test_a_forged_manifest_with_a_recomputed_checksum_fails_the_signature(signed, caplog):
    """What an attacker without the key can do: swap the weights and write a manifest that checks out."""
    step2 = os.path.join(signed, "step_00000002")
    evil = os.path.join(signed, "evil")
    with CheckpointManager(evil, checksum="sha256") as mgr:
        mgr.save(2, model=_model(666.0))
    shutil.copyfile(os.path.join(evil, "step_00000002", "model.safetensors"), os.path.join(step2, "model.safetensors"))
    manifest = Manifest.from_bytes(open(os.path.join(step2, "manifest.json"), "rb").read())
    forged = Manifest.from_bytes(open(os.path.join(evil, "step_00000002", "manifest.json"), "rb").read())
    manifest.files["model.safetensors"] = forged.files["model.safetensors"]
    manifest.raw = None                        # re-render from the fields, keeping the old signature
    open(os.path.join(step2, "manifest.json"), "wb").write(manifest.to_bytes())
    shutil.rmtree(evil)
    fresh = ConvNet()
    assert CheckpointManager(signed).restore(2, model=fresh).step == 2 and _value(fresh) == 666.0  # no key: loads
    with pytest.raises(SignatureError, match="changed after it was signed"):
        CheckpointManager(signed, signing_key=KEY_A).restore(2, model=ConvNet())
    with caplog.at_level(logging.WARNING):
        assert CheckpointManager(signed, signing_key=KEY_A).restore(model=fresh).step == 1
    assert _value(fresh) == 1.0 and "not signed with the key" in caplog.text


def test_falls_back_to_the_newest_signed_step(signed):
    with CheckpointManager(signed, signing_key=False) as mgr:  # another job, without the key
        mgr.save(3, model=_model(3.0))
    fresh = ConvNet()
    assert CheckpointManager(signed, signing_key=KEY_A).restore(model=fresh).step == 2 and _value(fresh) == 2.0
    assert ckptmgr.resume_from_latest(signed, model=fresh, signing_key=KEY_A) == 3


def test_key_from_the_environment_a_file_or_bytes(tmp_path, monkeypatch):
    key_file = tmp_path / "signing.key"
    key_file.write_bytes(KEY_A + b"\n")              # the newline is not part of the key
    directory = str(tmp_path / "run")
    monkeypatch.setenv("CKPTMGR_SIGNING_KEY", str(key_file))
    with CheckpointManager(directory) as mgr:
        mgr.save(1, model=_model(1.0))
    monkeypatch.delenv("CKPTMGR_SIGNING_KEY")
    assert CheckpointManager(directory, signing_key=KEY_A).restore(1, model=ConvNet()).step == 1
    assert CheckpointManager(directory, signing_key=str(key_file)).restore(1, model=ConvNet()).step == 1
    monkeypatch.setenv("CKPTMGR_SIGNING_KEY", KEY_B.decode())  # the key itself
    with pytest.raises(SignatureError):
        CheckpointManager(directory).restore(1, model=ConvNet())
    with pytest.raises(SignatureError):                  # load_checkpoint on a manager directory honours it too
        ckptmgr.load_checkpoint(ConvNet(), directory)
    monkeypatch.setenv("CKPTMGR_SIGNING_KEY", str(tmp_path / "missing" / "key"))
    with pytest.raises(ValueError, match="not a file"):
        CheckpointManager(directory)
    monkeypatch.delenv("CKPTMGR_SIGNING_KEY")
    with pytest.raises(ValueError, match="at least 16"):
        CheckpointManager(directory, signing_key=b"short")
    with pytest.raises(StorageError):
        CheckpointManager(directory, signing_key=str(tmp_path / "nope.key"))


def test_a_0_1_directory_restores_without_a_key_and_is_refused_with_one(tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(os.path.join(FIXTURE, "run"), run)
    from tests.compat.test_v0_1_fixture import _fresh
    model, opt, sched = _fresh()
    assert CheckpointManager(run).restore(model=model, optimizer=opt, scheduler=sched) is not None
    with pytest.raises(SignatureError):
        CheckpointManager(run, signing_key=KEY_A).restore(model=model, optimizer=opt, scheduler=sched)


def test_sharded_steps_are_signed_and_checked(tmp_path):
    from ckptmgr import sharded
    from tests.sharded._workers import plain_model
    directory = str(tmp_path / "run")
    model = plain_model()
    with CheckpointManager(directory, sharded=True, signing_key=KEY_A) as mgr:
        mgr.save(1, model=model)
    step = os.path.join(directory, "step_00000001")
    assert set(sharded.consolidate(step, signing_key=KEY_A)) == set(model.state_dict())
    with pytest.raises(SignatureError):
        sharded.consolidate(step, signing_key=KEY_B)
    assert CheckpointManager(directory, signing_key=KEY_A).restore(model=plain_model()).step == 1


def test_a_signed_manifest_that_names_a_weak_checksum_is_refused(signed):
    """A manifest saying its files use another checksum (written by a ckptmgr that has one) carries no signature."""
    from ckptmgr.format.signing import load_key
    key = load_key(KEY_A)
    manifest = Manifest.from_bytes(open(_manifest_path(signed, 2), "rb").read())
    key.check(manifest, "step 2")
    manifest.raw["checksum"] = "xxh3"
    manifest.raw["signature"]["hmac"] = key._mac(manifest.raw).hex()  # even correctly signed over that field
    with pytest.raises(SignatureError, match="sha256"):
        key.check(manifest, "step 2")


def test_checksum_error_is_not_a_signature_error():
    assert issubclass(SignatureError, CorruptCheckpointError) and not issubclass(ChecksumError, SignatureError)
