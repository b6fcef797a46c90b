"""Lightning runs killed mid-training (SIGTERM, kill -9, a crash while rewriting last.ckpt) resume exactly.

Each killed run is a fresh Python process (``tests/integrations/lit_toy.py``)
that signals itself right after global step 12, or dies at a ckptmgr fault
point; the restart, ``fit(ckpt_path="last")`` to step 30, runs here and must
end with weights identical to an uninterrupted 30-step run.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("lightning")

from ckptmgr import cli  # noqa: E402
from ckptmgr.integrations.lightning import load_checkpoint_dict  # noqa: E402
from tests.integrations import lit_toy as toy  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    trainer = toy.fit(str(tmp_path_factory.mktemp("ref") / "ckpts"), 30, save_on_exception=True)
    return toy.weights(trainer.lightning_module)


def _child(directory, *args, env=None):
    environ = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {}))
    return subprocess.run([sys.executable, "-m", "tests.integrations.lit_toy", str(directory), *args], cwd=ROOT,
                          env=environ, capture_output=True, text=True, timeout=300)


def _check_and_resume(directory, expect, last_step, uninterrupted):
    ckpts = os.path.join(directory, "ckpts")
    assert sorted(n for n in os.listdir(ckpts) if not n.startswith(".")) == expect
    for name in expect:
        assert cli.main(["verify", os.path.join(ckpts, name)]) == 0
    assert load_checkpoint_dict(os.path.join(ckpts, "last.ckpt"))["global_step"] == last_step
    trainer = toy.fit(ckpts, 30, ckpt_path="last", save_on_exception=True)
    assert trainer.ckpt_path == os.path.join(ckpts, "last.ckpt")
    assert toy.same(toy.weights(trainer.lightning_module), uninterrupted)


@pytest.mark.parametrize("signame, returncode, expect, last_step", [
    # SIGTERM: Lightning finishes the batch, ModelCheckpoint(save_on_exception=True) saves step 12, exits 0
    ("TERM", 0, ["epoch=0-step=5.ckpt", "epoch=1-step=10.ckpt", "epoch=1-step=12.ckpt", "last.ckpt"], 12),
    # kill -9: no chance to save; the newest periodic checkpoint is step 10
    ("KILL", -9, ["epoch=0-step=5.ckpt", "epoch=1-step=10.ckpt", "last.ckpt"], 10),
])
def test_killed_at_step_12_resumes_from_last_identically(tmp_path, uninterrupted, signame, returncode, expect,
                                                         last_step):
    proc = _child(tmp_path, "--kill-at", "12", "--signal", signame)
    assert proc.returncode == returncode, proc.stderr[-3000:]
    assert "finished at step" not in proc.stdout
    _check_and_resume(tmp_path, expect, last_step, uninterrupted)


def test_kill_while_rewriting_last_keeps_the_previous_last(tmp_path, uninterrupted):
    # Saves so far: step 5 top-k, step 5 last, step 10 top-k; the 4th manifest is last.ckpt's rewrite at step 10.
    proc = _child(tmp_path, env={"CKPTMGR_FAULT_POINT": "save.after_manifest:4", "CKPTMGR_FAULT_ACTION": "kill"})
    assert proc.returncode == -9, proc.stderr[-3000:]
    last = os.path.join(tmp_path, "ckpts", "last.ckpt")
    leftovers = [n for n in os.listdir(last) if n.startswith(".tmp-step_00000010-")]
    assert sorted(set(os.listdir(last)) - set(leftovers)) == ["step_00000005"] and leftovers
    _check_and_resume(tmp_path, ["epoch=0-step=5.ckpt", "epoch=1-step=10.ckpt", "last.ckpt"], 5, uninterrupted)
    assert os.listdir(last) == ["step_00000030"]   # the next save tidied the crashed one's leftovers
