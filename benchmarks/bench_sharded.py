"""Sharded (FSDP2 + torch.distributed.checkpoint) save and restore against the unsharded rank-0 path.

For 2 and 4 gloo ranks on this machine's CPUs, one job holds the same state
twice: an FSDP2 model (each rank owns 1/N of the weights and Adam moments) and a
plain replicated copy. Interleaved, it times

    sharded   CheckpointManager.save / restore of the FSDP2 model (every rank writes its shards)
    unsharded CheckpointManager(sharded=False) save / restore of the plain model (rank 0 writes it all)

and reports throughput ratios (unsharded time / sharded time; above 1: sharded is
faster). Both paths are durable (fsync) and restores verify every checksum. On a machine
with fewer cores than ranks the ranks share cores, so the figures are "info":
they show the cost of the sharded path here, not its scaling on a cluster.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import socket
import sys
import traceback
from datetime import timedelta

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import base_parser, interleave, machine, make_model, median, run_in_scratch, timed  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _populated(model):
    """AdamW over ``model`` with both moments filled (one step)."""
    import torch
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    width = model[0].in_features
    model(torch.randn(2, width)).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


def _rank(rank: int, world: int, port: int, state_mib: float, repeats: int, scratch: str, queue) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import ckptmgr
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
        torch.manual_seed(0)
        plain = make_model(state_mib)
        plain_opt = _populated(plain)
        torch.manual_seed(0)
        sharded = make_model(state_mib)
        mesh = init_device_mesh("cpu", (world,))
        for layer in sharded:
            fully_shard(layer, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        sharded_opt = _populated(sharded)
        nbytes = sum(p.numel() * p.element_size() for p in plain.parameters()) * 3
        managers = {"sharded": ckptmgr.CheckpointManager(os.path.join(scratch, f"sharded-{world}"), max_to_keep=1),
                    "unsharded": ckptmgr.CheckpointManager(os.path.join(scratch, f"plain-{world}"), max_to_keep=1,
                                                           sharded=False)}
        objects = {"sharded": (sharded, sharded_opt), "unsharded": (plain, plain_opt)}
        steps = {"sharded": 0, "unsharded": 0}

        def save(kind):
            def run():
                steps[kind] += 1
                model, opt = objects[kind]
                dist.barrier()
                seconds = timed(lambda: (managers[kind].save(steps[kind], model=model, optimizer=opt),
                                         dist.barrier()))
                return seconds
            return run

        def load(kind):
            def run():
                model, opt = objects[kind]
                dist.barrier()
                return timed(lambda: (managers[kind].restore(model=model, optimizer=opt), dist.barrier()))
            return run

        samples = interleave({"sharded_save": save("sharded"), "unsharded_save": save("unsharded"),
                              "sharded_load": load("sharded"), "unsharded_load": load("unsharded")}, repeats)
        queue.put((rank, "ok", {"state_bytes": nbytes, "samples": samples}))
    except BaseException as exc:  # report to the parent
        queue.put((rank, "err", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        queue.close()
        queue.join_thread()  # flush the result before leaving without a clean shutdown
        os._exit(0)


def run_world(world: int, state_mib: float, repeats: int, scratch: str) -> dict:
    """Run the interleaved measurements on ``world`` ranks; rank 0's samples are returned."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, state_mib, repeats, scratch, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    while len(results) < world:
        try:
            rank, status, value = queue.get(timeout=1.0)
            results[rank] = (status, value)
        except queue_mod.Empty:
            if all(not p.is_alive() for p in procs) and queue.empty():  # a rank died without reporting
                break
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    missing = [r for r in range(world) if r not in results]
    if missing:
        raise RuntimeError(f"{world}-rank run: ranks {missing} died without a result")
    errors = [v for s, v in results.values() if s != "ok"]
    if errors:
        raise RuntimeError(f"{world}-rank run failed:\n{errors[0]}")
    return results[0][1]


def run(state_mib: float, repeats: int, scratch: str) -> dict:
    out = {"metric": "sharded", "repeats": repeats, "machine": machine()}
    for world in (2, 4):
        got = run_world(world, state_mib, repeats, scratch)
        med = {name: median(values) for name, values in got["samples"].items()}
        nbytes = got["state_bytes"]
        out["state_bytes"] = nbytes
        out[f"{world}_ranks"] = {"median_seconds": med, "samples": got["samples"],
                                 "MiB_per_s": {k: nbytes / v / 2 ** 20 for k, v in med.items()}}
        out[f"sharded_save_vs_unsharded_{world}r"] = med["unsharded_save"] / med["sharded_save"]
        out[f"sharded_load_vs_unsharded_{world}r"] = med["unsharded_load"] / med["sharded_load"]
    return out


def main(argv=None) -> dict:
    parser = base_parser(__doc__)
    parser.set_defaults(state_mib=128, repeats=3)
    args = parser.parse_args(argv)
    return run_in_scratch("sharded", args, lambda scratch: run(args.state_mib, args.repeats, scratch))


if __name__ == "__main__":
    main()
