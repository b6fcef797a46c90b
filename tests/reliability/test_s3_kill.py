"""kill -9 on S3 between the data uploads and the manifest: nothing is committed, the previous step restores."""
import os
import subprocess
import sys

import pytest
import torch

from ckptmgr import CheckpointManager
from ckptmgr import io as storage

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHILD = """
import sys, torch
from ckptmgr import CheckpointManager
torch.manual_seed(2)
model = torch.nn.Linear(64, 64)
CheckpointManager(sys.argv[1], max_to_keep=3).save(2, model=model)
print("saved", flush=True)   # never reached: the fault point kills this process first
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("point", ["save.before_manifest", "save.after_data_file:2"])
def test_kill_between_upload_and_manifest_on_s3(s3, point):
    url = f"{s3}/run"
    torch.manual_seed(1)
    model = torch.nn.Linear(64, 64)
    with CheckpointManager(url, max_to_keep=3) as mgr:
        mgr.save(1, model=model)
    env = dict(os.environ, CKPTMGR_FAULT_POINT=point)
    proc = subprocess.run([sys.executable, "-c", CHILD, url], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=90)
    assert proc.returncode == -9, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    assert "saved" not in proc.stdout
    assert "step_00000002" in storage.listdir(url)            # data objects were uploaded...
    assert CheckpointManager(url).all_steps() == [1]          # ...but without a manifest nothing is committed
    fresh = torch.nn.Linear(64, 64)
    assert CheckpointManager(url).restore(model=fresh).step == 1
    assert torch.equal(fresh.weight, model.weight)
    with CheckpointManager(url, max_to_keep=3) as mgr:        # the next save clears the partial upload
        mgr.save(3, model=model)
    assert "step_00000002" not in storage.listdir(url)
    assert CheckpointManager(url).all_steps() == [1, 3]
