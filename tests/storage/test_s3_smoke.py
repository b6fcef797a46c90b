import torch

import ckptmgr


def test_save_and_load_through_moto(s3, convnet):
    url = f"{s3}/weights/model.pth"
    ckptmgr.save_checkpoint(convnet, url, meta={"epoch": 1})
    fresh = type(convnet)()
    ckpt = ckptmgr.load_checkpoint(fresh, url, strict=True)
    assert ckpt["meta"]["epoch"] == 1
    for key, value in convnet.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key
