"""Rank functions for the sharded tests (module level, so spawned processes can import them).

Each phase runs many checks in one set of processes: starting gloo ranks costs
seconds on a small machine, so the tests share a few runs instead of one each.
References travel between phases as ``torch.save`` files of plain tensors.
"""
from __future__ import annotations

import os
import random


def build(world, seed):
    """An FSDP2 MLP (every Linear and the root fully_shard-ed over ``world`` CPU ranks) and its AdamW."""
    import torch
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 12), nn.ReLU(), nn.Linear(12, 4))
    if world > 1:
        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)


def plain_model():
    """The same MLP, unsharded, for one process."""
    from torch import nn
    return nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 12), nn.ReLU(), nn.Linear(12, 4))


def train(model, opt, steps):
    """``steps`` AdamW steps on batches drawn from the global RNG (so RNG restore matters)."""
    import torch
    for _ in range(steps):
        model(torch.randn(8, 16)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def seed_data(value):
    import numpy as np
    import torch
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)


def full_state(model, opt):
    """Full (gathered) model and optimizer state as plain CPU tensors, identical on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    plain = {f"model/{k}": v.detach().cpu().clone() for k, v in msd.items()}
    for fqn, entry in osd["state"].items():
        for key, value in entry.items():
            plain[f"optim/{fqn}/{key}"] = value.detach().cpu().clone()
    return plain


def same(a, b):
    """Keys and every tensor bit for bit equal."""
    import torch
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def _local_equal(a, b):
    import torch
    return all(torch.equal(p.to_local(), q.to_local()) for p, q in zip(a.parameters(), b.parameters()))


def _setup():
    import torch
    torch.set_num_threads(1)


def phase_two(rank, world, root, s3_url):
    """2 ranks: round trip, async, S3 (with a forced overwrite), and the first half of the continuity run."""
    import torch

    from ckptmgr import CheckpointManager
    _setup()
    out = {}
    model, opt = build(world, 0)
    seed_data(100 + rank)
    train(model, opt, 3)
    mgr = CheckpointManager(os.path.join(root, "two"), max_to_keep=2)
    mgr.save(1, model=model, optimizer=opt, extra={"epoch": 1}, metrics={"loss": 0.25})
    ref = full_state(model, opt)
    if rank == 0:
        torch.save(ref, os.path.join(root, "ref_two.pt"))
    fresh, fresh_opt = build(world, 1)
    restored = mgr.restore(model=fresh, optimizer=fresh_opt)
    out["round_trip"] = [restored.step, restored.extra, same(ref, full_state(fresh, fresh_opt)),
                         _local_equal(model, fresh)]

    straight, straight_opt = build(world, 0)            # continuity: 20 steps straight ...
    seed_data(7 + rank)
    train(straight, straight_opt, 20)
    reference = full_state(straight, straight_opt)       # a collective: every rank gathers
    if rank == 0:
        torch.save(reference, os.path.join(root, "cont_ref.pt"))
    first, first_opt = build(world, 0)                   # ... and the first 10 of them, saved
    seed_data(7 + rank)
    train(first, first_opt, 10)
    with CheckpointManager(os.path.join(root, "cont")) as cont:
        cont.save(10, model=first, optimizer=first_opt)

    with CheckpointManager(os.path.join(root, "async"), async_save=True) as amgr:
        amgr.save(1, model=model, optimizer=opt)
        at_save = full_state(model, opt)
        train(model, opt, 1)                             # changes the live tensors while the write runs
        amgr.save(2, model=model, optimizer=opt)         # waits for the first (back-pressure)
        amgr.wait()
        back, back_opt = build(world, 3)
        amgr.restore(1, model=back, optimizer=back_opt)
        out["async"] = [amgr.all_steps(), same(at_save, full_state(back, back_opt))]

    if s3_url:
        smgr = CheckpointManager(f"{s3_url}/run")
        smgr.save(1, model=model, optimizer=opt)
        train(model, opt, 1)
        smgr.save(1, model=model, optimizer=opt, force=True)   # a second revision under rev-<id>/
        remote_ref = full_state(model, opt)
        back, back_opt = build(world, 4)
        smgr.restore(model=back, optimizer=back_opt)
        out["s3"] = [smgr.all_steps(), same(remote_ref, full_state(back, back_opt))]
    return out


def phase_four(rank, world, root):
    """4 ranks: restore the 2-rank checkpoint (2 -> 4), then a 4-rank round trip saved for the way back."""
    import torch

    from ckptmgr import CheckpointManager
    _setup()
    out = {}
    ref_two = torch.load(os.path.join(root, "ref_two.pt"), weights_only=True)
    fresh, fresh_opt = build(world, 5)
    CheckpointManager(os.path.join(root, "two")).restore(model=fresh, optimizer=fresh_opt)
    out["two_to_four"] = same(ref_two, full_state(fresh, fresh_opt))
    model, opt = build(world, 2)
    seed_data(200 + rank)
    train(model, opt, 2)
    mgr = CheckpointManager(os.path.join(root, "four"))
    mgr.save(1, model=model, optimizer=opt)
    ref = full_state(model, opt)
    if rank == 0:
        torch.save(ref, os.path.join(root, "ref_four.pt"))
    back, back_opt = build(world, 6)
    mgr.restore(model=back, optimizer=back_opt)
    out["round_trip"] = [same(ref, full_state(back, back_opt)), _local_equal(model, back)]
    return out


def phase_back(rank, world, root):
    """2 fresh ranks: restore the 4-rank checkpoint (4 -> 2); finish the continuity run (restore + 10 steps)."""
    import torch

    from ckptmgr import CheckpointManager
    _setup()
    out = {}
    ref_four = torch.load(os.path.join(root, "ref_four.pt"), weights_only=True)
    fresh, fresh_opt = build(world, 7)
    CheckpointManager(os.path.join(root, "four")).restore(model=fresh, optimizer=fresh_opt)
    out["four_to_two"] = same(ref_four, full_state(fresh, fresh_opt))
    model, opt = build(world, 8)                         # other initial weights: the restore must replace them
    seed_data(999)                                       # and another RNG stream: the restore must replace it
    restored = CheckpointManager(os.path.join(root, "cont")).restore(model=model, optimizer=opt)
    train(model, opt, 10)
    reference = torch.load(os.path.join(root, "cont_ref.pt"), weights_only=True)
    out["continuity"] = [restored.step, same(reference, full_state(model, opt))]
    return out


def phase_kill(rank, world, root):
    """2 ranks: a committed step 1, then rank 1 dies inside dcp.save of step 2 (after writing its shard)."""
    import torch

    from ckptmgr import CheckpointManager
    from ckptmgr.sharded import dcp_io as dcp_storage
    _setup()
    model, opt = build(world, 0)
    seed_data(300 + rank)
    train(model, opt, 2)
    mgr = CheckpointManager(os.path.join(root, "run"))
    mgr.save(1, model=model, optimizer=opt)
    ref = full_state(model, opt)
    if rank == 0:
        torch.save(ref, os.path.join(root, "ref_kill.pt"))
    train(model, opt, 1)
    if rank == 1:
        original = dcp_storage._LocalWriter.write_data

        def write_then_die(self, plan, planner):
            original(self, plan, planner).wait()
            os._exit(9)                                  # like kill -9: no cleanup, no goodbye
        dcp_storage._LocalWriter.write_data = write_then_die
    try:
        mgr.save(2, model=model, optimizer=opt)
        return "saved"
    except Exception as exc:
        return type(exc).__name__
