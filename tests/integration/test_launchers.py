"""Real multi-process jobs: torchrun and accelerate launch, preempted with SIGTERM, restarted, bit-identical.

Each test launches ``scripts/train_demo.py worker`` (2 ranks, gloo, CPU, a
DDP-wrapped MLP with dropout, AdamW, a cosine schedule and a CheckpointHook)
under a real launcher, sends SIGTERM to the launcher mid-run (the launcher
forwards it to its workers), checks that both ranks saved the same step and
got through a clean shutdown, restarts the job, and compares the final
weights with one uninterrupted run. Every wait has a deadline.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from typing import List, Optional, Tuple

import pytest
import torch

import ckptmgr

pytestmark = pytest.mark.timeout(240)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "scripts", "train_demo.py")
STEPS = 40


def _env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CKPTMGR_DIST_TIMEOUT="60",
               HF_HOME=str(tmp_path / "hf"),            # no user accelerate config leaks in
               PYTHONPATH=ROOT + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))
    return env


def _launch(launcher: List[str], directory: str, env: dict, step_time: float = 0.0, accelerate: bool = False,
            kill_after: Optional[int] = None, timeout: float = 90) -> Tuple[int, List[str], str]:
    """Run the demo worker under ``launcher``; SIGTERM the launcher once a line reports step >= kill_after."""
    command = launcher + [DEMO, "worker", "--dir", directory, "--steps", str(STEPS), "--save-every", "10",
                          "--keep", "2", "--step-time", str(step_time)] + (["--accelerate"] if accelerate else [])
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    stderr: List[str] = []
    drain = threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True)
    drain.start()
    lines: List[str] = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            match = re.match(r"step\s+(\d+)", line)
            if kill_after is not None and match and int(match.group(1)) >= kill_after:
                kill_after = None
                proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
    drain.join(timeout=10)
    return code, lines, "".join(stderr)[-4000:]


def _torchrun() -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _accelerate() -> List[str]:
    # `--cpu` would start one process; the multi-process launcher is the torchrun-based one, which
    # works on CPU (gloo) when the script asks for Accelerator(cpu=True).
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Final weights of one uninterrupted torchrun run."""
    tmp = tmp_path_factory.mktemp("reference")
    code, lines, err = _launch(_torchrun(), str(tmp / "run"), _env(tmp))
    assert code == 0, err
    assert f"finished: {STEPS} steps, latest checkpoint step {STEPS - 1}" in lines
    return ckptmgr.CheckpointLoader.load_checkpoint(str(tmp / "run"))


def _preempt_then_resume(launcher: List[str], tmp_path, reference, accelerate: bool = False) -> None:
    directory, env = str(tmp_path / "run"), _env(tmp_path)
    code, lines, err = _launch(launcher, directory, env, step_time=0.1, accelerate=accelerate, kill_after=9)
    # Each rank prints this as the last thing it does, after the save and a clean shutdown.
    stops = re.findall(r"rank (\d+): preempted at step (\d+); checkpoint committed; exiting with 0", "\n".join(lines))
    assert sorted(rank for rank, _ in stops) == ["0", "1"], f"both ranks must report the preemption:\n{lines}\n{err}"
    steps = {int(step) for _, step in stops}
    assert len(steps) == 1, f"ranks stopped at different steps: {stops}"
    stop = steps.pop()
    assert 9 < stop < STEPS - 1, f"the signal did not land mid-run (step {stop})"
    assert code in (0, 1), f"launcher exit code {code}\n{err}"       # torchrun exits 1 after forwarding a signal

    manager = ckptmgr.CheckpointManager(directory, max_to_keep=None)
    assert manager.all_steps()[-1] == stop and len(manager.all_steps()) <= 2   # rotation kept 2
    preempted = ckptmgr.CheckpointLoader.load_checkpoint(directory)
    assert preempted["step"] == stop
    assert preempted["meta"]["user"]["trigger"] == "preemption"

    code, lines, err = _launch(launcher, directory, env, accelerate=accelerate)
    assert code == 0, err
    assert f"resumed from step {stop}, continuing at step {stop + 1}" in lines, lines
    final = ckptmgr.CheckpointLoader.load_checkpoint(directory)
    assert final["step"] == reference["step"] == STEPS - 1
    a, b = final["state_dict"], reference["state_dict"]
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ from the uninterrupted run: {different}"


def test_torchrun_sigterm_stops_both_ranks_at_one_step_and_resume_matches_an_uninterrupted_run(
        tmp_path, reference):
    _preempt_then_resume(_torchrun(), tmp_path, reference)


def test_accelerate_launch_with_prepared_model_and_optimizer_preempts_and_resumes(tmp_path, reference):
    _preempt_then_resume(_accelerate(), tmp_path, reference, accelerate=True)
