"""Rank functions for the per-rank state and engine tests (module level, so spawned processes can import them).

Three runs share the work, because starting gloo ranks costs seconds here:
``phase_save`` (2 ranks) saves every case and checks the round trips that need
no fresh job; ``phase_fresh`` (2 new ranks) restores rank state and finishes
the continuity run; ``phase_one`` (1 rank) restores the 2-rank checkpoints
with another world size. References travel as ``torch.save`` files of plain
tensors; every check returns plain values the test compares.
"""
from __future__ import annotations

import copy
import logging
import os
import random

import numpy as np
import torch
from torch import nn

CONT_STEPS, CONT_SAVE = 12, 5


class Net(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.a = nn.Linear(8, width)
        self.drop = nn.Dropout(0.2)
        self.b = nn.Linear(width, 2)

    def forward(self, x):
        return self.b(self.drop(torch.relu(self.a(x))))


def _setup(rank, seed):
    torch.set_num_threads(1)
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)
    random.seed(seed + rank)


def _init(seed, width=16):
    with torch.random.fork_rng():                   # the same weights everywhere; each rank's stream untouched
        torch.manual_seed(seed)
        return Net(width)


def _data():
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(64, 8, generator=gen)
    return torch.cat([x, (x.sum(dim=1, keepdim=True) > 0).float()], dim=1)


def _loader(rank, world):
    from tests.support.shardloader import ShardLoader
    return ShardLoader(_data(), rank, world, batch_size=3, seed=50 + rank)


def _step(model, opt, batch):
    loss = nn.functional.cross_entropy(model(batch[:, :8]), batch[:, 8].long())
    loss.backward()
    opt.step()
    opt.zero_grad()


def _twin_steps(first, second, batch):
    """One step of two (model, optimizer) pairs on the same batch with the same dropout draws."""
    rng = torch.get_rng_state()
    _step(*first, batch)
    torch.set_rng_state(rng)
    _step(*second, batch)


def _ddp(seed):
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = DDP(_init(seed))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _same(a, b):
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def _flat(tree, prefix=""):
    """Every tensor of a state tree by path (for bit-exact comparisons of optimizer states)."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree.detach().clone()}
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}/{k}"))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out.update(_flat(v, f"{prefix}/{i}"))
    return out


def _plain(state):
    """A loader's state as JSON-like values (tensors as lists), to compare across processes."""
    return {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def _attempt(func):
    try:
        func()
        return ["ok", ""]
    except Exception as exc:
        return [type(exc).__name__, str(exc)[:400]]


# --------------------------------------------------------------------------- phase 1: 2 ranks save


def phase_save(rank, world, root):
    out = {}
    out["rank_state"] = _save_rank_state(rank, world, root)
    out["continuity"] = _continuity_first_half(rank, world, root)
    out["zero"] = _zero(rank, world, root)
    out["fsdp1"] = _fsdp1(rank, world, root)
    return out


def _save_rank_state(rank, world, root):
    from ckptmgr import CheckpointManager
    _setup(rank, 0)
    model, _ = _ddp(0)
    loader = _loader(rank, world)
    for _ in range(rank + 2):                       # every rank stops at a different batch
        next(loader)
    shard = torch.arange(4.0) + 10 * rank
    with CheckpointManager(os.path.join(root, "rs")) as mgr:
        path = mgr.save(1, model=model, rank_state={"rank": rank, "shard": shard, "loader": loader})
    if rank == 0:
        torch.save(dict(model.module.state_dict()), os.path.join(root, "rs_model.pt"))
    return {"files": sorted(os.listdir(path)), "loader": _plain(loader.state_dict())}


def _continuity_first_half(rank, world, root):
    """The straight run (all steps) and the first CONT_SAVE steps of the interrupted one, saved."""
    from ckptmgr import CheckpointManager
    _setup(rank, 7)
    straight, straight_opt = _ddp(0)
    loader = _loader(rank, world)
    indices = []
    for _ in range(CONT_STEPS):
        _step(straight, straight_opt, next(loader))
        indices.append(loader.last_indices)
    if rank == 0:
        torch.save(dict(straight.module.state_dict()), os.path.join(root, "cont_ref.pt"))
    _setup(rank, 7)
    model, opt = _ddp(0)
    loader = _loader(rank, world)
    for _ in range(CONT_SAVE):
        _step(model, opt, next(loader))
    with CheckpointManager(os.path.join(root, "cont")) as mgr:
        mgr.save(CONT_SAVE, model=model, optimizer=opt, rank_state={"loader": loader})
    return {"indices": indices}


def _zero(rank, world, root):
    """DDP + ZeroRedundancyOptimizer: round trip in this job, a failing collect, and the reference for 1 rank."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ckptmgr import CheckpointManager

    def build(seed):
        model = DDP(_init(seed, width=24))
        return model, ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.Adam, lr=1e-2)
    _setup(rank, 20)
    model, opt = build(0)
    loader = _loader(rank, world)
    for _ in range(3):
        _step(model, opt, next(loader))
    out = {}
    mgr = CheckpointManager(os.path.join(root, "zero"))
    path = mgr.save(3, model=model, optimizer=opt)
    opt.consolidate_state_dict(to=0)
    reference = copy.deepcopy(opt.state_dict()) if rank == 0 else None
    if rank == 0:
        torch.save({"optimizer": reference, "model": dict(model.module.state_dict())},
                   os.path.join(root, "zero_ref.pt"))
        out["files"] = sorted(os.listdir(path))
    fresh, fresh_opt = build(1)
    mgr.restore(model=fresh, optimizer=fresh_opt)
    fresh_opt.consolidate_state_dict(to=0)
    if rank == 0:
        out["state_equal"] = _same(_flat(reference), _flat(fresh_opt.state_dict()))
    _twin_steps((model, opt), (fresh, fresh_opt), next(loader))
    out["next_step_equal"] = _same(dict(model.module.state_dict()), dict(fresh.module.state_dict()))

    def failing():
        if rank == 1:
            raise RuntimeError("injected failure while collecting on rank 1")
        return 0
    out["collect_failure"] = _attempt(lambda: mgr.save(4, model=model, optimizer=opt, rank_state={"x": failing}))
    out["steps"] = mgr.all_steps()
    mgr.close()
    return out


def _fsdp1_build(seed, width=16):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    model = FSDP(_init(seed, width), device_id=torch.device("cpu"), use_orig_params=True)
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def _full_state(model, opt):
    """Full model and optimizer state, plain CPU tensors keyed by FQN (cpu_offload=False: see the notes in
    tests/distributed/test_engines_ranks.py on FSDP1's full optimizer state)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    return {**{f"model/{k}": v.detach().cpu().clone() for k, v in msd.items()}, **_flat(osd["state"], "optim")}


def _fsdp1(rank, world, root):
    """FSDP1 (device_id=cpu) on 2 ranks: detected and saved sharded, round trip, a model dict, sharded=False."""
    import warnings

    from ckptmgr import CheckpointManager
    warnings.filterwarnings("ignore", category=FutureWarning)   # FSDP1 and ShardedTensor are deprecated
    _setup(rank, 30)
    model, opt = _fsdp1_build(0)
    loader = _loader(rank, world)
    for _ in range(3):
        _step(model, opt, next(loader))
    out = {}
    mgr = CheckpointManager(os.path.join(root, "fsdp1"))
    path = mgr.save(3, model=model, optimizer=opt)
    reference = _full_state(model, opt)
    if rank == 0:
        torch.save(reference, os.path.join(root, "fsdp1_ref.pt"))
        with open(os.path.join(path, "manifest.json")) as fh:
            import json
            out["sharded"] = "sharded" in json.load(fh)["components"]
    fresh, fresh_opt = _fsdp1_build(1)
    mgr.restore(model=fresh, optimizer=fresh_opt)
    out["round_trip"] = _same(reference, _full_state(fresh, fresh_opt))
    out["local_equal"] = all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters()))
    _twin_steps((model, opt), (fresh, fresh_opt), next(loader))
    out["next_step_equal"] = _same(_full_state(model, opt), _full_state(fresh, fresh_opt))
    out["plain_refused"] = _attempt(lambda: CheckpointManager(os.path.join(root, "fsdp1_plain"), sharded=False)
                                    .save(1, model=model, optimizer=opt))

    gan = {"g": _fsdp1_build(2), "d": _fsdp1_build(3, width=12)}   # two FSDP1 models in one checkpoint
    for _ in range(2):
        batch = next(loader)
        for m, o in gan.values():
            _step(m, o, batch)
    with CheckpointManager(os.path.join(root, "fsdp1_gan")) as gmgr:
        gmgr.save(2, model={n: m for n, (m, _) in gan.items()}, optimizer={n: o for n, (_, o) in gan.items()})
        gan_ref = {n: _full_state(m, o) for n, (m, o) in gan.items()}
        back = {"g": _fsdp1_build(4), "d": _fsdp1_build(5, width=12)}
        gmgr.restore(model={n: m for n, (m, _) in back.items()}, optimizer={n: o for n, (_, o) in back.items()})
        out["gan_round_trip"] = all(_same(gan_ref[n], _full_state(*back[n])) for n in back)
    if rank == 0:
        torch.save(gan_ref, os.path.join(root, "fsdp1_gan_ref.pt"))
    mgr.close()
    return out


# --------------------------------------------------------------------------- phase 2: 2 fresh ranks


def phase_fresh(rank, world, root):
    from ckptmgr import CheckpointManager
    out = {}
    _setup(rank, 99)
    model, _ = _ddp(5)
    loader = _loader(rank, world)
    with CheckpointManager(os.path.join(root, "rs")) as mgr:
        restored = mgr.restore(model=model, rank_state={"loader": loader})
    out["rank_state"] = {"rank": restored.rank_state["rank"], "shard": restored.rank_state["shard"].tolist(),
                         "loader_is_target": restored.rank_state["loader"] is loader,
                         "loader": _plain(loader.state_dict())}
    reference = torch.load(os.path.join(root, "cont_ref.pt"), weights_only=True)
    out["continuity"] = {}
    for label, with_rank_state in (("resumed", True), ("without_rank_state", False)):
        _setup(rank, 1000)                              # another RNG stream: the restore must replace it
        model, opt = _ddp(8)                            # other weights: the restore must replace them
        loader = _loader(rank, world)
        with CheckpointManager(os.path.join(root, "cont")) as mgr:
            restored = mgr.restore(model=model, optimizer=opt,
                                   rank_state={"loader": loader} if with_rank_state else None)
        indices = []
        for _ in range(CONT_STEPS - CONT_SAVE):
            _step(model, opt, next(loader))
            indices.append(loader.last_indices)
        out["continuity"][label] = {"step": restored.step, "indices": indices,
                                    "weights_equal": _same(reference, dict(model.module.state_dict()))}
    return out


# --------------------------------------------------------------------------- phase 3: 1 rank


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def phase_one(rank, world, root):
    import warnings

    from torch.distributed.optim import ZeroRedundancyOptimizer

    from ckptmgr import CheckpointManager
    warnings.filterwarnings("ignore", category=FutureWarning)
    _setup(rank, 0)
    out = {}
    rs = CheckpointManager(os.path.join(root, "rs"))
    loader = _loader(0, 1)
    before = _plain(loader.state_dict())
    model = _init(9)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    out["world_changed"] = _attempt(lambda: rs.restore(model=model, rank_state={"loader": loader}))
    out["untouched_after_error"] = _same(initial, dict(model.state_dict()))
    handler = _Warnings()
    logging.getLogger("ckptmgr").addHandler(handler)
    restored = rs.restore(model=model, rank_state={"loader": loader}, on_world_size_change="skip")
    logging.getLogger("ckptmgr").removeHandler(handler)
    saved_model = torch.load(os.path.join(root, "rs_model.pt"), weights_only=True)
    out["skip"] = {"rank_state": restored.rank_state, "loader_untouched": before == _plain(loader.state_dict()),
                   "model_equal": _same(saved_model, dict(model.state_dict())),
                   "warnings": [m for m in handler.messages if "rank_state" in m]}

    zero_ref = torch.load(os.path.join(root, "zero_ref.pt"), weights_only=True)
    zmgr = CheckpointManager(os.path.join(root, "zero"))
    zmodel = _init(3, width=24)
    zopt = ZeroRedundancyOptimizer(zmodel.parameters(), optimizer_class=torch.optim.Adam, lr=1e-2)
    zmgr.restore(model=zmodel, optimizer=zopt)
    zopt.consolidate_state_dict(to=0)
    plain = _init(4, width=24)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-2)
    zmgr.restore(model=plain, optimizer=plain_opt)
    out["zero"] = {"zero_world_1": _same(_flat(zero_ref["optimizer"]), _flat(zopt.state_dict())),
                   "plain_adam": _same(_flat(zero_ref["optimizer"]), _flat(plain_opt.state_dict())),
                   "model": _same(zero_ref["model"], dict(zmodel.state_dict()))}

    fsdp_ref = torch.load(os.path.join(root, "fsdp1_ref.pt"), weights_only=True)
    plain = _init(6)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-2)
    CheckpointManager(os.path.join(root, "fsdp1")).restore(model=plain, optimizer=plain_opt)
    gan_ref = torch.load(os.path.join(root, "fsdp1_gan_ref.pt"), weights_only=True)
    gan = {"g": _init(7), "d": _init(8, width=12)}
    gan_opts = {n: torch.optim.Adam(m.parameters(), lr=1e-2) for n, m in gan.items()}
    CheckpointManager(os.path.join(root, "fsdp1_gan")).restore(model=gan, optimizer=gan_opts)
    import ckptmgr
    weights = ckptmgr.sharded.consolidate(os.path.join(root, "fsdp1", "step_00000003"))
    g = _init(10)
    ckptmgr.load_checkpoint(g, os.path.join(root, "fsdp1_gan"), strict=True, model_name="g")
    out["fsdp1"] = {"plain": _same(fsdp_ref, _full_state(plain, plain_opt)),
                    "gan": all(_same(gan_ref[n], _full_state(gan[n], gan_opts[n])) for n in gan),
                    "consolidate": _same({k[len("model/"):]: v for k, v in fsdp_ref.items() if k.startswith("model/")},
                                         dict(weights)),
                    "load_checkpoint_gan": _same({k[len("model/"):]: v for k, v in gan_ref["g"].items()
                                                  if k.startswith("model/")}, dict(g.state_dict()))}
    return out
