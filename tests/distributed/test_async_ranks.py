"""Async saves on real gloo ranks: the background agreement runs beside DDP's collectives."""
import pytest

from tests.support.multiproc import run_ranks

pytestmark = pytest.mark.timeout(180)

ENV = {"CKPTMGR_DIST_TIMEOUT": "30", "OMP_NUM_THREADS": "1"}


def _train_with_async_saves(rank, world, directory, fail_rank):
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ckptmgr import CheckpointManager
    from ckptmgr.step.formats import PlainFormat
    from tests.conftest import ConvNet

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = DDP(ConvNet())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mgr = CheckpointManager(directory, max_to_keep=2, async_save=True)
    torch.manual_seed(10 + rank)
    snapshots, raised = {}, []
    for step in range(1, 9):
        model(torch.randn(4, 3, 8, 8)).pow(2).mean().backward()   # DDP all-reduces while a save may be running
        opt.step()
        opt.zero_grad()
        if step % 2 == 0:
            if fail_rank is not None and step == 6 and rank == fail_rank:
                mgr.wait()  # step 4 is done; only step 6's background write breaks

                def broken(*args, **kwargs):
                    raise OSError(28, "No space left on device")
                PlainFormat.write = broken  # type: ignore[method-assign]
            try:
                mgr.save(step, model=model, optimizer=opt)
            except Exception as exc:  # the background failure of the previous save
                raised.append([step, type(exc).__name__])
                continue
            snapshots[step] = {k: v.clone() for k, v in model.module.named_parameters()}
    mgr.close()
    outcome = raised or "ok"
    from ckptmgr import distributed as dist
    dist.barrier(timeout=30)  # retention runs on rank 0 after the commit; let it finish before listing
    steps = CheckpointManager(directory).all_steps()
    fresh = DDP(ConvNet())
    restored = CheckpointManager(directory).restore(model=fresh, strict=True)
    match = all(torch.equal(v, dict(fresh.module.named_parameters())[k])
                for k, v in snapshots[restored.step].items())
    return outcome, steps, restored.step, match


@pytest.mark.parametrize("world", [2])
def test_async_saves_beside_ddp_training(tmp_path, world):
    results = run_ranks(_train_with_async_saves, world, str(tmp_path / "run"), None, env=ENV)
    for status, value in results:
        assert status == "ok", value
        assert tuple(value) == ("ok", [6, 8], 8, True)


def test_background_failure_on_one_rank_surfaces_on_every_rank(tmp_path):
    results = run_ranks(_train_with_async_saves, 2, str(tmp_path / "run"), 1, env=ENV)
    for status, value in results:
        assert status == "ok", value
        outcome, steps, restored, match = value
        # step 6 failed on rank 1: both ranks learn it at the save of step 8, which is then not queued
        assert outcome[0][0] == 8 and steps == [2, 4] and restored == 4 and match, value
    assert results[1][1][0] == [[8, "OSError"]]            # the rank that failed raises its own error
    assert results[0][1][0] == [[8, "DistributedError"]]   # the other names it
