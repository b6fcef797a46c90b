"""Training continues bit for bit across a save, a new process and a restore."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ckptmgr import CheckpointManager
from tests.manager import _training

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.timeout(120)
def test_twenty_steps_equal_ten_save_new_process_restore_ten(ckpt_dir, tmp_path):
    threads = torch.get_num_threads()
    try:
        straight = _training.build(init_seed=0)
        _training.seed_everything(7)
        _training.train(*straight, steps=20)
        reference = {k: v.clone() for k, v in straight[0].state_dict().items()}

        first = _training.build(init_seed=0)
        _training.seed_everything(7)
        _training.train(*first, steps=10)
        model, optimizers, schedulers, scaler = first
        CheckpointManager(ckpt_dir).save(10, model=model, optimizer=optimizers, scheduler=schedulers, scaler=scaler)
    finally:
        torch.set_num_threads(threads)
    out = str(tmp_path / "final.safetensors")
    proc = subprocess.run([sys.executable, "-m", "tests.manager._training", ckpt_dir, "10", out], cwd=ROOT,
                          capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = load_file(out)
    assert set(resumed) == set(reference)
    for key, value in reference.items():
        assert torch.equal(value, resumed[key]), key
    assert not torch.equal(reference["fc1.weight"], first[0].state_dict()["fc1.weight"])  # it did train on
