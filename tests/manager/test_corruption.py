"""Damaged checkpoints are detected before anything is loaded; pickle never runs on the load path."""
import json
import logging
import os
import pickle

import pytest
import torch

import ckptmgr
from ckptmgr import CheckpointManager, CorruptCheckpointError
from ckptmgr.format.checksum import digest_of
from ckptmgr.format.manifest import FileEntry, Manifest
from tests.conftest import ConvNet
from tests.manager.helpers import assert_same

DAMAGES = ["truncate-half", "truncate-one", "empty", "flip-first", "flip-middle", "flip-last"]


def _damage(path, how):
    with open(path, "rb") as fh:
        data = bytearray(fh.read())
    if how == "truncate-half":
        data = data[: len(data) // 2]
    elif how == "truncate-one":
        data = data[:-1]
    elif how == "empty":
        data = bytearray()
    else:
        index = {"flip-first": 0, "flip-middle": len(data) // 2, "flip-last": len(data) - 1}[how]
        data[index] ^= 0x10
    with open(path, "wb") as fh:
        fh.write(data)


def _setup(ckpt_dir):
    torch.manual_seed(1)
    good = ConvNet()
    latest = ConvNet()
    opt = torch.optim.AdamW(latest.parameters(), lr=1e-3)
    latest(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    mgr = CheckpointManager(ckpt_dir)
    mgr.save(1, model=good, optimizer=opt, extra={"epoch": 1})
    mgr.save(2, model=latest, optimizer=opt, extra={"epoch": 2}, scheduler=torch.optim.lr_scheduler.StepLR(opt, 3),
             scaler=torch.amp.GradScaler("cpu"))
    return mgr, good, opt


def test_any_damaged_file_is_detected_and_latest_falls_back(ckpt_dir, caplog):
    mgr, good, opt = _setup(ckpt_dir)
    step_dir = os.path.join(ckpt_dir, "step_00000002")
    names = sorted(os.listdir(step_dir))
    assert len(names) == 8   # model, optimizer, scheduler, scaler, extra, meta, rng, manifest
    checked = 0
    for name in names:
        path = os.path.join(step_dir, name)
        with open(path, "rb") as fh:
            pristine = fh.read()
        for how in DAMAGES:
            _damage(path, how)
            with pytest.raises(CorruptCheckpointError):
                mgr.restore(2, model=ConvNet(), optimizer=torch.optim.AdamW(ConvNet().parameters()))
            fresh = ConvNet()
            with caplog.at_level(logging.WARNING):
                restored = CheckpointManager(ckpt_dir).restore(model=fresh)
            assert restored.step == 1, (name, how)
            assert_same(good.state_dict(), fresh.state_dict())
            with open(path, "wb") as fh:
                fh.write(pristine)
            checked += 1
    assert checked == len(names) * len(DAMAGES)
    assert mgr.restore(model=ConvNet()).step == 2   # undamaged again


def test_damaged_weights_are_never_loaded_by_load_checkpoint(ckpt_dir):
    _setup(ckpt_dir)
    path = os.path.join(ckpt_dir, "step_00000002", "model.safetensors")
    _damage(path, "flip-last")
    target = ConvNet()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ckptmgr.ChecksumError):
        ckptmgr.load_checkpoint(target, os.path.join(ckpt_dir, "step_00000002"))
    assert_same(before, target.state_dict())
    assert ckptmgr.load_checkpoint(target, ckpt_dir)["step"] == 1


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(ckpt_dir):
    mgr, _, _ = _setup(ckpt_dir)
    for step in (1, 2):
        _damage(os.path.join(ckpt_dir, f"step_{step:08d}", "model.safetensors"), "flip-middle")
    with pytest.raises(CorruptCheckpointError, match="every checkpoint"):
        mgr.restore(model=ConvNet())


def test_verify_false_still_checks_sizes(ckpt_dir):
    mgr, _, _ = _setup(ckpt_dir)
    _damage(os.path.join(ckpt_dir, "step_00000002", "optimizer.safetensors"), "truncate-one")
    with pytest.raises(CorruptCheckpointError):
        mgr.restore(2, model=ConvNet(), verify=False)
    assert mgr.restore(model=ConvNet(), verify=False).step == 1


class _Bomb:
    """Unpickling this creates the canary file: proof that pickle ran."""

    def __init__(self, canary):
        self.canary = canary

    def __reduce__(self):
        return (open, (self.canary, "w"))


def _rewrite_manifest(step_dir, edit):
    with open(os.path.join(step_dir, "manifest.json"), "rb") as fh:
        manifest = Manifest.from_bytes(fh.read())
    edit(manifest)
    for name in list(manifest.files):
        with open(os.path.join(step_dir, name), "rb") as fh:
            data = fh.read()
        manifest.files[name] = FileEntry(len(data), digest_of(data, manifest.checksum))
    with open(os.path.join(step_dir, "manifest.json"), "wb") as fh:
        fh.write(manifest.to_bytes())


def test_pickle_bombs_among_checkpoint_files_are_never_unpickled(ckpt_dir, tmp_path):
    mgr, _, _ = _setup(ckpt_dir)
    canary = str(tmp_path / "canary")
    bomb = pickle.dumps(_Bomb(canary))
    step_dir = os.path.join(ckpt_dir, "step_00000002")
    for name in ("model.pth", "optimizer.pt", "state.pkl", "data.pkl"):
        with open(os.path.join(step_dir, name), "wb") as fh:
            fh.write(bomb)
    torch.save({"x": _Bomb(canary)}, os.path.join(step_dir, "extra.pt"))
    # Bombs in the manifest as well: it names pickle files for components (hashes made to match).

    def point_at_bombs(manifest):
        manifest.components["optimizer"] = "optimizer.pt"
        manifest.components["meta"] = "state.pkl"
        manifest.files["optimizer.pt"] = FileEntry(0, digest_of(b"", manifest.checksum))
        manifest.files["state.pkl"] = FileEntry(0, digest_of(b"", manifest.checksum))
    _rewrite_manifest(step_dir, point_at_bombs)
    with pytest.raises(CorruptCheckpointError, match="refusing"):
        mgr.restore(2, model=ConvNet())
    assert mgr.restore(model=ConvNet(), optimizer=torch.optim.AdamW(ConvNet().parameters())).step == 1
    # A pickle bomb in place of the weights, with a manifest that vouches for it.
    with open(os.path.join(step_dir, "model.safetensors"), "wb") as fh:
        fh.write(bomb)
    _rewrite_manifest(step_dir, lambda m: m.components.update(optimizer="optimizer.safetensors", meta="meta.json"))
    with pytest.raises(CorruptCheckpointError):
        mgr.restore(2, model=ConvNet())
    with pytest.raises(CorruptCheckpointError):
        ckptmgr.load_checkpoint(ConvNet(), step_dir)
    assert ckptmgr.load_checkpoint(ConvNet(), ckpt_dir)["step"] == 1
    _rewrite_manifest(step_dir, lambda m: m.components.update(model="model.pth"))
    with pytest.raises(CorruptCheckpointError):
        ckptmgr.load_checkpoint(ConvNet(), step_dir)
    assert not os.path.exists(canary)
    with open(os.path.join(step_dir, "manifest.json")) as fh:
        assert json.load(fh)["components"]["model"] == "model.pth"
