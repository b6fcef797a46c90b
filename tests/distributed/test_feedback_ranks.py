"""On two real gloo ranks: a model saved without DDP (the accelerate-on-CPU launch mistake) is pointed out once."""
import logging

from tests.support.multiproc import run_ranks


def _save_twice(rank, world, directory, wrapped):
    import torch
    from torch import nn

    from ckptmgr import CheckpointManager
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("ckptmgr.advice").addHandler(handler)
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    if wrapped:
        model = nn.parallel.DistributedDataParallel(model)
    with CheckpointManager(directory) as mgr:
        mgr.save(1, model=model)
        mgr.save(2, model=model)
    return records


def run_two_ranks(directory, wrapped):
    results = run_ranks(_save_twice, 2, directory, wrapped, timeout=120)
    assert all(status == "ok" for status, _ in results), results
    return [value for _, value in results]


def test_unwrapped_and_wrapped(tmp_path):
    said = run_two_ranks(str(tmp_path / "plain"), False)
    assert len(said[0]) == 1 and "2 processes save" in said[0][0] and said[1] == []
    assert run_two_ranks(str(tmp_path / "ddp"), True) == [[], []]
