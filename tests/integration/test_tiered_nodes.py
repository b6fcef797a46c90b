"""Tiered checkpoints across two "nodes": two torchrun launches (c10d rendezvous on 127.0.0.1), own local disks, S3.

Each launch is one node (``--nnodes=2 --nproc_per_node=2``) with its own
``local_dir`` and its own request-logging proxy in front of one moto S3 server,
so the test counts, per node, the data files read from S3. One combined run:

1. the job (20 steps) saves steps 4 and 9; rank 0 is killed (SIGKILL) while uploading step
   9, right before the manifest, and the test then kills -9 every other process:
   S3 holds only committed steps (9's data objects stay uncommitted);
2. the restarted job resumes from the step committed on both local disks (no
   data file read from S3 on either node), uploads it, and trains to the end;
3. node 1's local disk is wiped (a replaced node) and the job restores again:
   node 1 reads from S3, node 0 from its disk.

The weights after 2 and 3 equal those of one uninterrupted 4-rank run.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from typing import Dict, List, Optional

import pytest

from ckptmgr import inventory
from tests.support.faultproxy import FaultProxy
from tests.support.multiproc import free_port
from tests.tiered.conftest import data_gets

pytestmark = pytest.mark.timeout(600)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(ROOT, "tests", "integration", "tiered_worker.py")
KILL_AT = "upload.before_manifest:2"   # rank 0, the second upload (step 9), all data up, manifest not
STEPS = ["--steps", "20", "--stop-at", "20"]   # saves at steps 4, 9, 14, 19


def _env(endpoint: str, **extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CKPTMGR_FAULT", "TORCHELASTIC")) and k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CKPTMGR_DIST_TIMEOUT="60", AWS_ACCESS_KEY_ID="testing",
               AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint,
               PYTHONPATH=ROOT + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))
    env.update(extra)
    return env


class Launch:
    """One torchrun agent and its workers; their JSON lines are collected as they come."""

    def __init__(self, command: List[str], env: Dict[str, str]) -> None:
        self.err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.err, text=True, env=env, cwd=ROOT)
        self.events: List[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.events.append(json.loads(line))

    def of(self, kind: str) -> List[dict]:
        return sorted((e for e in self.events if e["event"] == kind), key=lambda e: e["rank"])

    def stderr(self, tail: int = 6000) -> str:
        self.err.seek(0)
        return self.err.read()[-tail:]

    def kill(self) -> None:
        """kill -9 the workers (they run in their own sessions) and the agent."""
        for event in self.of("start"):
            try:
                os.kill(event["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self._reader.join(timeout=10)


def _torchrun(node: Optional[int], port: int, args: List[str]) -> List[str]:
    base = [sys.executable, "-m", "torch.distributed.run", "--max-restarts=0"]
    if node is None:   # the reference: one launch, 4 ranks
        return base + ["--standalone", "--nproc_per_node=4", WORKER] + args
    return base + ["--nnodes=2", f"--node_rank={node}", "--nproc_per_node=2", "--rdzv_backend=c10d",
                   f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=tiered-{port}", "--rdzv_conf=join_timeout=90",
                   f"--local-addr=127.0.0.{node + 1}",   # rendezvous ranks follow the address: node 0 gets ranks 0, 1
                   WORKER] + args


def _pair(url: str, locals_: List[str], proxies: List[FaultProxy], **extra: str) -> List[Launch]:
    port = free_port()
    return [Launch(_torchrun(node, port, ["--dir", url, "--local-dir", locals_[node]] + STEPS),
                   _env(proxies[node].endpoint, **extra)) for node in (0, 1)]


def _finish(launches: List[Launch], timeout: float = 240) -> None:
    try:
        for launch in launches:
            code = launch.proc.wait(timeout=timeout)
            assert code == 0, f"exit {code}\n{launch.stderr()}"
    finally:
        for launch in launches:
            launch.kill()


def _committed_locally(local: str) -> List[int]:
    return [e.step for e in inventory.scan_directory(local) if e.status == "committed"]


def test_two_nodes_kill_during_upload_restart_local_restore_and_a_replaced_node(tmp_path, moto_server, monkeypatch):
    for key, value in _env(moto_server).items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    import s3fs
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"tiered-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem().mkdir(bucket)
    url = f"s3://{bucket}/run"
    locals_ = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    reference = Launch(_torchrun(None, 0, ["--dir", str(tmp_path / "reference")] + STEPS), _env(moto_server))
    try:
        with FaultProxy(moto_server) as p0, FaultProxy(moto_server) as p1:
            proxies = [p0, p1]

            # 1. rank 0 dies right before the manifest of step 9's upload; then every other process is killed -9
            first = _pair(url, locals_, proxies, CKPTMGR_FAULT_POINT=KILL_AT, CKPTMGR_FAULT_RANK="0")
            try:
                first[0].proc.wait(timeout=240)          # node 0's agent ends once its rank 0 is dead
            finally:
                for launch in first:
                    launch.kill()
            assert f"fault injected at {KILL_AT.split(':')[0]}" in first[0].stderr(tail=10**7), first[0].stderr()
            entries = inventory.scan_directory(url)
            assert [e.step for e in entries if e.status == "committed"] == [4]
            assert {"step": 9, "status": "uncommitted"} in [{"step": e.step, "status": e.status} for e in entries]
            assert all(check.ok for check in inventory.verify(url) if check.status == "checked")
            both = sorted(set(_committed_locally(locals_[0])) & set(_committed_locally(locals_[1])))
            resume = both[-1]
            assert resume >= 9, both                     # committed on both disks, not in S3

            # 2. restart: resume from the local copies (no data file read from S3), upload it, train to the end
            marks = [len(p.requests) for p in proxies]
            second = _pair(url, locals_, proxies)
            _finish(second)
            for node, launch in enumerate(second):
                resumed = launch.of("resumed")
                assert [(e["step"], e["path"]) for e in resumed] == \
                    [(resume, os.path.join(locals_[node], f"step_{resume:08d}"))] * 2, resumed
                assert data_gets(proxies[node], marks[node]) == [], node
            uploaded = f"/{bucket}/run/step_{resume:08d}/manifest.json"
            assert ("PUT", uploaded) in p0.requests[marks[0]:] or ("POST", uploaded) in p0.requests[marks[0]:]
            digests = {e["digest"] for launch in second for e in launch.of("done")}
            assert len(digests) == 1
            persistent = [e.step for e in inventory.scan_directory(url) if e.status == "committed"]
            assert resume in persistent and persistent[-1] == 19 and len(persistent) == 3, persistent

            # 3. node 1 is replaced (empty disk): it reads from S3, node 0 from its disk
            shutil.rmtree(locals_[1])
            marks = [len(p.requests) for p in proxies]
            third = _pair(url, locals_, proxies)
            _finish(third)
            assert [e["path"] for e in third[0].of("resumed")] == [os.path.join(locals_[0], "step_00000019")] * 2
            assert [e["path"] for e in third[1].of("resumed")] == [f"{url}/step_00000019"] * 2
            assert data_gets(p0, marks[0]) == []
            fetched = data_gets(p1, marks[1])
            assert any(path.endswith("/model.safetensors") and "/step_00000019/" in path for path in fetched)
            assert {e["digest"] for launch in third for e in launch.of("done")} == digests

        _finish([reference])
        assert {e["digest"] for e in reference.of("done")} == digests, "weights differ from the uninterrupted run"
    finally:
        reference.kill()   # no straggler survives a failed assertion
