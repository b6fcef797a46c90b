"""A sharded save to an object store does not ask DCP to fsync uploads, so torch has nothing to warn about."""
import warnings

from torch import nn

from ckptmgr import CheckpointManager


def test_a_sharded_save_to_s3_raises_no_fsync_warning(s3):
    model = nn.Linear(8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with CheckpointManager(f"{s3}/sharded", sharded=True) as mgr:
            mgr.save(1, model=model)
            fresh = nn.Linear(8, 8)
            mgr.restore(model=fresh)
    assert not [w for w in caught if "fsync" in str(w.message)], [str(w.message) for w in caught]
