"""Fine-tuning on 2 real gloo ranks: warm start from an HTTP URL (one download), trainable-only saves, resume."""
import io

import pytest
import torch

from tests.support.multiproc import run_ranks

pytestmark = pytest.mark.timeout(180)


def _net():
    from torch import nn
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def _worker(rank, world, directory, url, missing_url):
    from torch.nn.parallel import DistributedDataParallel as DDP

    import ckptmgr
    torch.set_num_threads(1)
    model = _net()
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    model[0].requires_grad_(False)  # the base comes from the warm start and stays frozen
    wrapped = DDP(model)
    opt = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.1)
    out = {"first": ckptmgr.resume_from_latest(directory, model=wrapped, optimizer=opt, init_from=url)}
    out["warm"] = all(torch.equal(a, b) for a, b in zip(_net().state_dict().values(), model.state_dict().values()))
    wrapped(torch.randn(2, 16)).sum().backward()
    opt.step()
    with ckptmgr.CheckpointManager(directory, save_frozen=False) as manager:
        manager.save(3, model=wrapped, optimizer=opt)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    again = DDP(_net())
    again.module[0].requires_grad_(False)
    out["second"] = ckptmgr.resume_from_latest(directory, model=again, init_from=url)
    out["resumed"] = all(torch.equal(trained[k], v) for k, v in again.module.state_dict().items())
    try:
        ckptmgr.resume_from_latest(f"{directory}-other", model=_net(), init_from=missing_url)
        out["missing"] = "no error"
    except Exception as exc:  # what every rank sees when the source is missing
        out["missing"] = type(exc).__name__
    return out


def test_warm_start_and_trainable_only_saves_on_two_ranks(http_server, tmp_path):
    buffer = io.BytesIO()
    torch.save({"state_dict": _net().state_dict()}, buffer)
    url = http_server.add("/zoo/net.pth", buffer.getvalue(), delay=0.2)  # slow enough for the ranks to overlap
    missing = http_server.url("/zoo/absent.pth")
    results = run_ranks(_worker, 2, str(tmp_path / "run"), url, missing, env={"CKPTMGR_DIST_TIMEOUT": "30"})
    for status, value in results:
        assert status == "ok", value
        assert value == {"first": 0, "warm": True, "second": 4, "resumed": True,
                         "missing": value["missing"]}
    assert {v["missing"] for _, v in results} <= {"CheckpointNotFoundError", "DistributedError"}
    assert results[0][1]["missing"] == "CheckpointNotFoundError"
    assert http_server.gets("/zoo/net.pth") == 1  # local rank 0 downloaded, rank 1 read the cache
