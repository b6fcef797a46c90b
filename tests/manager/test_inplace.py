"""Restore reads straight into the live model and optimizer tensors (no second copy), safely."""
import pytest
import torch

from ckptmgr import CheckpointManager
from tests.conftest import ConvNet


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _flip_last_byte(path):
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0xFF
    open(path, "wb").write(bytes(data))


def test_restore_reads_into_the_live_tensors(ckpt_dir, convnet):
    opt = torch.optim.AdamW(convnet.parameters())
    convnet(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    mgr = CheckpointManager(ckpt_dir)
    mgr.save(1, model=convnet, optimizer=opt)
    saved = _state(convnet)
    moment = opt.state_dict()["state"][0]["exp_avg"].clone()
    target = ConvNet()
    target_opt = torch.optim.AdamW(target.parameters())
    target(torch.randn(2, 3, 8, 8)).sum().backward()
    target_opt.step()
    ptrs = {k: v.data_ptr() for k, v in target.state_dict().items()}
    moment_ptr = target_opt.state_dict()["state"][0]["exp_avg"].data_ptr()
    mgr.restore(model=target, optimizer=target_opt)
    assert {k: v.data_ptr() for k, v in target.state_dict().items()} == ptrs   # filled where they were
    assert target_opt.state_dict()["state"][0]["exp_avg"].data_ptr() == moment_ptr
    for key, value in saved.items():
        assert torch.equal(target.state_dict()[key], value), key
    assert torch.equal(target_opt.state_dict()["state"][0]["exp_avg"], moment)


def test_in_place_false_keeps_the_model_untouched_when_verification_fails(ckpt_dir, convnet):
    import os

    from ckptmgr import ChecksumError
    mgr = CheckpointManager(ckpt_dir)
    mgr.save(1, model=convnet)
    _flip_last_byte(os.path.join(ckpt_dir, "step_00000001", "model.safetensors"))
    target = ConvNet()
    before = _state(target)
    with pytest.raises(ChecksumError):
        mgr.restore(1, model=target, in_place=False)
    for key, value in before.items():
        assert torch.equal(target.state_dict()[key], value), key


def test_in_place_fallback_ends_with_the_older_step_everywhere(ckpt_dir, convnet):
    import os
    mgr = CheckpointManager(ckpt_dir)
    mgr.save(1, model=convnet)
    older = _state(convnet)
    with torch.no_grad():
        for p in convnet.parameters():
            p.mul_(3.0)
    mgr.save(2, model=convnet)
    _flip_last_byte(os.path.join(ckpt_dir, "step_00000002", "model.safetensors"))
    target = ConvNet()
    assert mgr.restore(model=target).step == 1
    for key, value in older.items():
        assert torch.equal(target.state_dict()[key], value), key
