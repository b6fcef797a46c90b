"""CkptmgrHook with mmengine's EMAHook, which edits the checkpoint dict in before_save_checkpoint."""
from __future__ import annotations

import os

import pytest

pytest.importorskip("mmengine")

import ckptmgr  # noqa: E402
from tests.integrations import mm_toy as toy  # noqa: E402

HOOK = dict(type="CkptmgrHook", interval=1, max_keep_ckpts=2)


def _ema(runner):
    from mmengine.hooks import EMAHook
    hook = next(h for h in runner.hooks if isinstance(h, EMAHook))
    return {k: v.detach().clone() for k, v in hook.ema_model.module.state_dict().items()}


def test_ema_weights_are_saved_as_the_model_and_resume_exactly(tmp_path):
    reference = toy.make_runner(str(tmp_path / "ref"), HOOK, custom_hooks=[dict(type="EMAHook")])
    reference.train()

    work_dir = str(tmp_path / "run")
    crashed = toy.make_runner(work_dir, HOOK, custom_hooks=[dict(type="EMAHook")], crash=toy.Crash(epoch=2))
    toy.train_until_crash(crashed)
    deployed = toy.ToyModel()   # as with the stock hook, the weights file holds the averaged (EMA) weights
    ckptmgr.load_checkpoint(deployed, os.path.join(work_dir, "checkpoints", "step_00000002"), strict=True)
    assert toy.same({k: v for k, v in deployed.state_dict().items()}, _ema(crashed))
    assert not toy.same(toy.weights(crashed), _ema(crashed))

    resumed = toy.make_runner(work_dir, HOOK, custom_hooks=[dict(type="EMAHook")], resume=True)
    resumed.train()
    assert toy.same(toy.weights(resumed), toy.weights(reference))
    assert toy.same(_ema(resumed), _ema(reference))
