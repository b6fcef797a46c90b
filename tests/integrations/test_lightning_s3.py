"""CkptmgrCheckpointIO with checkpoints on S3 (a real moto server): save, top-k removal, resume via resolve_last."""
from __future__ import annotations

import pytest

pytest.importorskip("lightning")

from ckptmgr import cli  # noqa: E402
from ckptmgr.integrations.lightning import CkptmgrCheckpointIO, load_checkpoint_dict, resolve_last  # noqa: E402
from tests.integrations import lit_toy as toy  # noqa: E402


def test_checkpoints_on_s3_rotate_verify_and_resume(s3, tmp_path):
    import s3fs
    dirpath = f"{s3}/run/ckpts"
    assert resolve_last(dirpath) is None                      # nothing yet: start from scratch
    toy.fit(dirpath, 20)
    fs = s3fs.S3FileSystem()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(dirpath[len("s3://"):], refresh=True))
    assert names == ["epoch=1-step=15.ckpt", "epoch=2-step=20.ckpt", "last.ckpt"]   # evicted ones are gone
    for name in names:
        assert cli.main(["verify", f"{dirpath}/{name}"]) == 0
    last = resolve_last(dirpath)
    assert last == f"{dirpath}/last.ckpt"
    assert load_checkpoint_dict(last)["global_step"] == 20
    resumed = toy.fit(dirpath, 25, ckpt_path=last)
    reference = toy.fit(str(tmp_path / "local"), 25)
    assert toy.same(toy.weights(resumed.lightning_module), toy.weights(reference.lightning_module))
    assert CkptmgrCheckpointIO.resolve_last(dirpath) == last
    assert load_checkpoint_dict(last)["global_step"] == 25
