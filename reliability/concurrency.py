"""Scenario 7: two jobs saving into one directory are detected; neither corrupts the other's checkpoints.

Local directories: the second manager's first save raises DirectoryInUseError
while the first holds the lock; reading (listing, restore) never needs it.
Object stores: the newer job takes the lease over and the older one's next
save raises DirectoryInUseError before it writes a manifest.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

import ckptmgr
from ckptmgr import CheckpointManager
from reliability.common import Tally, small_model


def _pair(tally: Tally, directory: str, remote: bool) -> None:
    model = small_model()
    first = CheckpointManager(directory, max_to_keep=2)
    first.save(1, model=model)
    second = CheckpointManager(directory, max_to_keep=2)
    tally.trial("read-only use needs no lock", lambda: (second.all_steps() == [1] or _fail(second.all_steps()),
                                                       second.restore(model=small_model(1)).step == 1 or _fail()))
    if not remote:
        tally.trial("second job refused while the first runs",
                    _refused(lambda: second.save(2, model=model), "the second job saved into a locked directory"))
        first.save(3, model=model)
        tally.trial("first job's steps intact", lambda: first.all_steps() == [1, 3] or _fail(first.all_steps()))
        first.close()
        tally.trial("after close the second job saves", lambda: second.save(4, model=model))
    else:
        second.save(2, model=model)  # a restarted (or mistaken) job takes the lease over
        tally.trial("older job fenced off after a takeover",
                    _refused(lambda: first.save(3, model=model), "the older job committed after a takeover"))
        tally.trial("no step from the fenced save; others intact",
                    lambda: second.all_steps() == [1, 2] or _fail(second.all_steps()))
    second.close()
    first.close()


def _fail(what: object = "") -> None:
    raise AssertionError(str(what))


def _refused(save: Callable[[], Any], why: str) -> Callable[[], None]:
    """A trial passing when ``save`` raises DirectoryInUseError, failing with ``why`` when it saves."""
    def trial() -> None:
        try:
            save()
        except ckptmgr.DirectoryInUseError:
            return
        _fail(why)
    return trial


def run_concurrency(s3_url: str = "") -> Tally:
    """Two managers on one local directory, and on one S3 prefix when ``s3_url`` is given."""
    tally = Tally("two jobs on one directory")
    with tempfile.TemporaryDirectory() as root:
        _pair(tally, os.path.join(root, "run"), remote=False)
    if s3_url:
        _pair(tally, f"{s3_url}/run", remote=True)
    return tally
