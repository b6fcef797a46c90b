"""CkptmgrHook in a real mmengine Runner (CPU): stop, resume=True, identical weights; retention; best; damage."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("mmengine")

from ckptmgr import CheckpointManager, cli  # noqa: E402
from ckptmgr.integrations.mmengine import SCHEME, CkptmgrHook, load_from_ckptmgr  # noqa: E402
from tests.integrations import mm_toy as toy  # noqa: E402

EPOCH_HOOK = dict(type="CkptmgrHook", interval=1, max_keep_ckpts=2)
ITER_HOOK = dict(type="CkptmgrHook", interval=5, by_epoch=False, max_keep_ckpts=2)


def _steps(work_dir):
    return CheckpointManager(os.path.join(work_dir, "checkpoints")).all_steps()


def _last_checkpoint(work_dir):
    return open(os.path.join(work_dir, "last_checkpoint")).read()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs: 4 epochs, and 20 iterations."""
    probe = toy.RngProbe()
    epochs = toy.make_runner(str(tmp_path_factory.mktemp("ref_epoch")), EPOCH_HOOK, custom_hooks=[probe])
    epochs.train()
    iters = toy.make_runner(str(tmp_path_factory.mktemp("ref_iter")), ITER_HOOK, by_epoch=False)
    iters.train()
    return {"rng": probe.states, "epoch": (toy.weights(epochs), epochs.optim_wrapper.get_lr()),
            "iter": (toy.weights(iters), iters.optim_wrapper.get_lr())}


def test_stopped_after_2_epochs_resumes_to_identical_weights(tmp_path, reference, capsys):
    work_dir = str(tmp_path)
    toy.train_until_crash(toy.make_runner(work_dir, EPOCH_HOOK, crash=toy.Crash(epoch=2)))
    assert _steps(work_dir) == [1, 2]
    assert _last_checkpoint(work_dir) == SCHEME + os.path.join(work_dir, "checkpoints", "step_00000002")

    probe = toy.RngProbe()
    resumed = toy.make_runner(work_dir, EPOCH_HOOK, resume=True, custom_hooks=[probe])
    resumed.train()
    assert resumed.epoch == 4
    assert sorted(probe.states) == [2, 3]                  # resumed at epoch index 2 (the third epoch) ...
    assert all(torch.equal(probe.states[e], reference["rng"][e]) for e in (2, 3))  # ... with the saved RNG
    weights, lr = reference["epoch"]
    assert toy.same(toy.weights(resumed), weights)
    assert resumed.optim_wrapper.get_lr() == lr            # the MultiStepLR milestones (a Counter) came back
    assert _steps(work_dir) == [3, 4]                      # max_keep_ckpts=2, applied after each commit
    assert cli.main(["verify", os.path.join(work_dir, "checkpoints")]) == 0
    assert "all 2 intact" in capsys.readouterr().out


def test_killed_mid_epoch_resumes_from_the_iteration_checkpoint(tmp_path, reference):
    work_dir = str(tmp_path)
    toy.train_until_crash(toy.make_runner(work_dir, ITER_HOOK, by_epoch=False, crash=toy.Crash(iteration=12)))
    assert _steps(work_dir) == [5, 10]
    resumed = toy.make_runner(work_dir, ITER_HOOK, by_epoch=False, resume=True)
    resumed.train()
    weights, lr = reference["iter"]
    assert resumed.iter == 20 and toy.same(toy.weights(resumed), weights) and resumed.optim_wrapper.get_lr() == lr


def test_a_damaged_newest_checkpoint_is_skipped_on_resume(tmp_path, reference):
    work_dir = str(tmp_path)
    toy.train_until_crash(toy.make_runner(work_dir, ITER_HOOK, by_epoch=False, crash=toy.Crash(iteration=12)))
    path = os.path.join(work_dir, "checkpoints", "step_00000010", "optimizer.safetensors")
    data = bytearray(open(path, "rb").read())
    data[-2] ^= 0x01
    open(path, "wb").write(bytes(data))
    resumed = toy.make_runner(work_dir, ITER_HOOK, by_epoch=False, resume=True)
    resumed.train()   # before_run pointed last_checkpoint at step 5, the newest step that verifies
    assert toy.same(toy.weights(resumed), reference["iter"][0])


def test_load_from_a_step_with_resume_and_the_loader_dict(tmp_path, reference):
    work_dir = str(tmp_path)
    toy.train_until_crash(toy.make_runner(work_dir, ITER_HOOK, by_epoch=False, crash=toy.Crash(iteration=12)))
    step5 = SCHEME + os.path.join(work_dir, "checkpoints", "step_00000005")
    checkpoint = load_from_ckptmgr(step5, "cpu")
    assert {"meta", "state_dict", "message_hub", "optimizer", "param_schedulers"} <= set(checkpoint)
    assert checkpoint["meta"]["iter"] == 5 and checkpoint["meta"]["dataset_meta"]["classes"] == ("a", "b")
    assert type(checkpoint["param_schedulers"][0]["milestones"]).__name__ == "Counter"
    resumed = toy.make_runner(str(tmp_path / "other"), ITER_HOOK, by_epoch=False, resume=True, load_from=step5)
    resumed.train()   # an explicit older step, resumed exactly
    assert toy.same(toy.weights(resumed), reference["iter"][0])


def test_save_best_keeps_the_best_step_across_a_resume(tmp_path):
    work_dir = str(tmp_path)
    hook = dict(type="CkptmgrHook", interval=1, max_keep_ckpts=1, save_best="auto", rule="greater")
    toy.ScriptedScore.scores = [0.5, 0.9, 0.7]
    toy.train_until_crash(toy.make_runner(work_dir, hook, validate=True, crash=toy.Crash(epoch=3)))
    assert _steps(work_dir) == [2, 3]                       # the best (epoch 2) and the newest
    toy.ScriptedScore.scores = [0.6]
    resumed = toy.make_runner(work_dir, hook, validate=True, resume=True)
    resumed.train()
    manager = CheckpointManager(os.path.join(work_dir, "checkpoints"), best_metric="score", best_mode="max")
    assert manager.all_steps() == [2, 4] and manager.best_step() == 2
    assert resumed.message_hub.get_info("best_ckpt").endswith("step_00000002")


def test_unsupported_arguments_are_refused():
    with pytest.raises(ValueError, match="filename_tmpl"):
        CkptmgrHook(filename_tmpl="ep{}.pth")
    with pytest.raises(ValueError, match="one metric"):
        CkptmgrHook(save_best=["acc", "loss"])
