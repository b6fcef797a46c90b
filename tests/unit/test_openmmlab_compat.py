"""Files move both ways between ckptmgr and OpenMMLab's (mmengine's) checkpoint functions."""
import logging

import pytest
import torch

import ckptmgr
from tests.conftest import ConvNet

mmengine_checkpoint = pytest.importorskip("mmengine.runner.checkpoint")


@pytest.fixture(autouse=True)
def _quiet_mmengine():
    logging.getLogger("mmengine").setLevel(logging.ERROR)


def _equal_state(a, b):
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_ours_loads_in_openmmlab(tmp_path, convnet):
    path = str(tmp_path / "ours.pth")
    ckptmgr.save_checkpoint(convnet, path, optimizer=torch.optim.SGD(convnet.parameters(), lr=0.1), meta={"epoch": 2})
    fresh = ConvNet()
    ckpt = mmengine_checkpoint.load_checkpoint(fresh, path, strict=True)
    _equal_state(fresh.state_dict(), convnet.state_dict())
    assert ckpt["meta"]["epoch"] == 2


def test_openmmlab_file_loads_in_ours(tmp_path, convnet):
    path = str(tmp_path / "theirs.pth")
    opt = torch.optim.SGD(convnet.parameters(), lr=0.1)
    mmengine_checkpoint.save_checkpoint(
        {"meta": {"epoch": 5}, "state_dict": mmengine_checkpoint.weights_to_cpu(convnet.state_dict()),
         "optimizer": opt.state_dict()}, path)
    fresh = ConvNet()
    ckpt = ckptmgr.load_checkpoint(fresh, path, strict=True)
    _equal_state(fresh.state_dict(), convnet.state_dict())
    assert ckpt["meta"]["epoch"] == 5
