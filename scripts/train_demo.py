"""ckptmgr demo: a 2-process torchrun job is preempted with SIGTERM, restarts, and ends bit-identical.

    python scripts/train_demo.py [--dir runs/demo]     # what scripts/demo.sh runs

It trains a small MLP with dropout, AdamW and a cosine LR schedule on
synthetic data under ``torchrun --nproc_per_node=2`` (gloo, CPU; the model is
DDP-wrapped, every rank has its own CheckpointManager and rank 0 writes the
replicated state). A CheckpointHook saves every few steps with rotation. In
the middle of the run the demo sends SIGTERM to torchrun, which forwards it to
its workers: both ranks save the current step, wait until it is committed and
exit 0. The same command then resumes from that checkpoint and finishes. A
third, uninterrupted run gives the reference, and the final weights must be
equal (torch.equal) to it.

``python scripts/train_demo.py worker ...`` is the training job itself (run it
under torchrun, or under ``accelerate launch`` with ``--accelerate``).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

# --------------------------------------------------------------------------- the training job (one rank)


def _batch(step: int, rank: int, world: int):
    """This rank's share of the global batch of ``step``: a function of the step only, so a resumed
    run sees the same data as an uninterrupted one."""
    import torch
    teacher = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1000 + step))
    y = (x @ teacher).argmax(dim=1)
    return x[rank::world], y[rank::world]


def _say(line: str) -> None:
    """One write per line: both ranks share the launcher's stdout, and print() writes the newline separately."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def worker(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as tdist
    from torch import nn

    import ckptmgr

    torch.set_num_threads(1)              # same float reductions in every run
    torch.manual_seed(args.seed)          # same initial weights on every rank and in every run
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    if args.accelerate:
        from accelerate import Accelerator
        accelerator = Accelerator(cpu=True)
        model, optimizer = accelerator.prepare(model, optimizer)   # DDP + AcceleratedOptimizer
        backward = accelerator.backward
    else:
        tdist.init_process_group("gloo")
        model = nn.parallel.DistributedDataParallel(model)
        backward = torch.Tensor.backward
    rank, world = tdist.get_rank(), tdist.get_world_size()
    torch.manual_seed(args.seed + 100 + rank)   # a different dropout stream per rank

    manager = ckptmgr.CheckpointManager(args.dir, max_to_keep=args.keep)
    hook = ckptmgr.CheckpointHook(manager, model=model, optimizer=optimizer, scheduler=scheduler,
                                  every_n_steps=args.save_every)
    start = hook.resume()
    if rank == 0:
        _say(f"resumed from step {start - 1}, continuing at step {start}" if start else
             f"starting at step 0 ({world} ranks)")
    model.train()
    preempted = False
    for step in range(start, args.steps):
        x, y = _batch(step, rank, world)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        backward(loss)
        optimizer.step()
        scheduler.step()
        if args.step_time:
            time.sleep(args.step_time)      # a slower step, so the preemption lands mid-run
        if hook.after_step(step, metrics={"loss": loss.item()}):
            preempted = True
            break
        if rank == 0 and (step % 5 == 4 or hook.last_saved_step == step):
            saved = f"  saved step_{step:08d}" if hook.last_saved_step == step else ""
            _say(f"step {step:3d}  loss {loss.item():.4f}{saved}")
    if not preempted and args.steps - 1 not in (hook.last_saved_step, start - 1):
        manager.save(args.steps - 1, model=model, optimizer=optimizer, scheduler=scheduler, meta={"trigger": "end"})
    if not preempted and rank == 0:
        _say(f"finished: {args.steps} steps, latest checkpoint step {manager.latest_step()}")
    hook.close()
    manager.close()
    tdist.destroy_process_group()
    if preempted:   # the last thing a rank does: it got through the save and the shutdown cleanly
        _say(f"rank {rank}: preempted at step {hook.last_saved_step}; checkpoint committed; exiting with 0")
    return 0


# --------------------------------------------------------------------------- the demo (launches the jobs)


def _job_command(directory: str, args: argparse.Namespace, step_time: float) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            os.path.abspath(__file__), "worker", "--dir", directory, "--steps", str(args.steps),
            "--save-every", str(args.save_every), "--keep", str(args.keep), "--step-time", str(step_time)]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_job(command: List[str], kill_at: Optional[int] = None, timeout: float = 120,
            echo: bool = True) -> Tuple[int, List[str], str]:
    """Run a launcher command, echo its workers' lines, and send SIGTERM once a line reports step >= kill_at.

    Returns:
        ``(exit code, stdout lines, stderr text)``.
    """
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True, env=_env(), cwd=ROOT)
        timer = threading.Timer(timeout, proc.kill)   # a stuck job fails the demo instead of hanging it
        timer.start()
        lines: List[str] = []
        try:
            for line in proc.stdout:
                line = line.rstrip("\n")
                lines.append(line)
                if echo:
                    print(f"    {line}", flush=True)
                match = re.match(r"step\s+(\d+)", line)
                if kill_at is not None and match and int(match.group(1)) >= kill_at:
                    kill_at = None
                    print(f"  >> sending SIGTERM to torchrun (pid {proc.pid}), as a cluster scheduler would",
                          flush=True)
                    proc.send_signal(signal.SIGTERM)
            code = proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
        err.seek(0)
        return code, lines, err.read()


def _clear(directory: str) -> None:
    """Remove a previous demo's checkpoints; refuse to touch a directory holding anything else."""
    from ckptmgr.step.names import is_temp_name, parse_old_name, parse_step_name
    from ckptmgr.step.ownership import LOCK_NAME, OWNER_NAME
    if not os.path.isdir(directory):
        return
    foreign = [n for n in os.listdir(directory) if parse_step_name(n) is None and not is_temp_name(n)
               and parse_old_name(n) is None and n not in (LOCK_NAME, OWNER_NAME)]
    if foreign:
        raise SystemExit(f"{directory} holds files that are not checkpoints ({', '.join(foreign[:3])}); "
                         "pass an empty or new directory with --dir")
    shutil.rmtree(directory)


def _show(path: str) -> str:
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def _fail(message: str, stderr: str = "") -> int:
    print(f"\nFAILED: {message}", flush=True)
    if stderr:
        print("last lines of the launcher's stderr:\n" + "\n".join(stderr.strip().splitlines()[-15:]), flush=True)
    return 1


def demo(args: argparse.Namespace) -> int:
    import torch

    import ckptmgr
    began = time.monotonic()
    directory = os.path.abspath(args.dir)
    reference = directory.rstrip("/") + "-reference"
    for path in (directory, reference):
        _clear(path)
    shown = _show(directory)
    print(f"ckptmgr demo: torchrun job with 2 ranks (gloo, CPU), MLP on synthetic data, {args.steps} steps;\n"
          f"a checkpoint every {args.save_every} steps into {shown} (the {args.keep} newest are kept)\n", flush=True)

    print("[1/3] train; SIGTERM arrives mid-run", flush=True)
    code, lines, err = run_job(_job_command(directory, args, args.step_time), kill_at=args.steps // 3)
    found = re.findall(r"rank (\d+): preempted at step (\d+)", "\n".join(lines))
    stops = {int(step) for _, step in found}
    if sorted(int(rank) for rank, _ in found) != [0, 1] or len(stops) != 1:
        return _fail(f"expected both ranks to stop at one step, got: {found}", err)
    stop = stops.pop()
    manager = ckptmgr.CheckpointManager(directory, max_to_keep=None)
    kept = manager.all_steps()
    trigger = ckptmgr.CheckpointLoader.load_checkpoint(directory)["meta"]["user"].get("trigger")
    print(f"  torchrun exited with code {code} (it reports the signal it got; both workers exited 0)\n"
          f"  {shown} holds steps {kept}; the latest, {kept[-1]}, was written on {trigger}\n", flush=True)
    if kept[-1] != stop or trigger != "preemption":
        return _fail(f"the latest checkpoint is step {kept[-1]} ({trigger}), not the preemption step {stop}")

    print("[2/3] restart the same command", flush=True)
    code, lines, err = run_job(_job_command(directory, args, args.step_time))
    expected = f"resumed from step {stop}, continuing at step {stop + 1}"
    if code != 0 or expected not in lines:
        return _fail(f"the restart did not resume from step {stop} (exit code {code})", err)

    print(f"\n[3/3] uninterrupted reference run into {_show(reference)}", flush=True)
    code, lines, err = run_job(_job_command(reference, args, 0.0), echo=False)
    if code != 0:
        return _fail(f"the reference run failed with exit code {code}", err)
    print(f"    {lines[-1]}", flush=True)

    resumed = ckptmgr.CheckpointLoader.load_checkpoint(directory)
    straight = ckptmgr.CheckpointLoader.load_checkpoint(reference)
    a, b = resumed["state_dict"], straight["state_dict"]
    same = resumed["step"] == straight["step"] == args.steps - 1 and a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) for k in a)
    print(f"\nfinal weights (step {resumed['step']}) of the preempted+resumed run vs the uninterrupted run: "
          f"{'identical' if same else 'DIFFERENT'} (torch.equal on all {len(a)} tensors)", flush=True)
    tool = _show(os.path.join(os.path.dirname(sys.executable), "ckptmgr"))
    print(f"look at them: {tool} ls {shown}   ({tool} --help for more)", flush=True)
    print(f"done in {time.monotonic() - began:.1f}s", flush=True)
    return 0 if same else 1


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    job = sub.add_parser("worker", help="the training job itself (run it under torchrun or accelerate launch)")
    for p in (parser, job):
        p.add_argument("--dir", default="runs/demo", help="checkpoint directory (default: runs/demo)")
        p.add_argument("--steps", type=int, default=60, help="training steps (default: 60)")
        p.add_argument("--save-every", type=int, default=10, help="checkpoint every N steps (default: 10)")
        p.add_argument("--keep", type=int, default=3, help="checkpoints kept by rotation (default: 3)")
        p.add_argument("--step-time", type=float, default=0.05,
                       help="extra seconds per step, so a signal lands mid-run (default: 0.05)")
    job.add_argument("--seed", type=int, default=0, help="initial weights and dropout seed")
    job.add_argument("--accelerate", action="store_true",
                     help="use accelerate.Accelerator().prepare (run under `accelerate launch`)")
    args = parser.parse_args(argv)
    return worker(args) if args.command == "worker" else demo(args)


if __name__ == "__main__":
    sys.exit(main())
