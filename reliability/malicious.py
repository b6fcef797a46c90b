"""Scenario 4: hostile files through every load path: no code runs, nothing outside the directory is touched.

* a pickle whose ``__reduce__`` would create a canary file (in the weights), loaded through
  ``load_checkpoint`` with a local path, ``file://``, ``memory://``, ``s3://``
  (moto), ``http://`` (the test server), ``open-mmlab://`` (through
  CKPTMGR_URL_MIRRORS), a manager step that names it, and the CLI
  (``inspect``, ``convert``);
* safetensors headers claiming huge sizes or overlapping offsets;
* manifests listing ``../`` or absolute names, and a symlink in a step
  directory that points at a file outside it (with the right bytes).

Every case must raise a typed error (a pickle beside the weights is skipped by
``load_checkpoint``, which wants the weights only); the canary must never exist.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from typing import Any, Callable, List, Tuple

import torch

import ckptmgr
from ckptmgr import CheckpointManager
from ckptmgr.format.manifest import Manifest
from reliability.common import Tally, expect_typed, new_bucket, s3_env, small_model, start_moto

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Canary:
    """Unpickling this calls ``open(path, 'w')``: the file appearing means pickle code ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Tuple[Any, ...]:
        return (open, (self.path, "w"))


def evil_bytes(canary: str, beside_weights: bool = False) -> bytes:
    """A torch file with the canary in its weights (every load refuses it), or beside them in ``meta``
    (``load_checkpoint`` wants only the weights: it skips the canary, never running it)."""
    buf = io.BytesIO()
    if beside_weights:
        torch.save({"state_dict": small_model().state_dict(), "meta": Canary(canary)}, buf)
    else:
        torch.save({"state_dict": {"w": torch.zeros(2), "evil": Canary(canary)}}, buf)
    return buf.getvalue()


def _skipped_beside_weights(path: str) -> None:
    checkpoint = ckptmgr.load_checkpoint(small_model(1), path, strict=True)
    assert "meta" not in checkpoint, "the pickled meta was not skipped"
    expect_typed(lambda: ckptmgr.CheckpointLoader.load_checkpoint(path), path)  # the whole file: refused


def _safetensors(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _bad_safetensors() -> List[Tuple[str, bytes]]:
    huge = {"w": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 4 << 40]}}
    overlap = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
               "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    return [("huge tensor", _safetensors(huge, b"\0" * 16)),
            ("overlapping offsets", _safetensors(overlap, b"\0" * 24)),
            ("header length 2**63", struct.pack("<Q", 1 << 63) + b"{}"),
            ("shape disagrees with offsets", _safetensors({"w": {"dtype": "F32", "shape": [1000],
                                                                 "data_offsets": [0, 16]}}, b"\0" * 16))]


def _manifest_cases(root: str) -> List[Tuple[str, Callable[[], Any]]]:
    """Manager steps whose manifest points outside, or holding a symlink out."""
    model = small_model()
    run = os.path.join(root, "run")
    with CheckpointManager(run) as mgr:
        mgr.save(1, model=model)
    step = os.path.join(run, "step_00000001")
    good = Manifest.from_bytes(open(os.path.join(step, "manifest.json"), "rb").read())
    outside = os.path.join(root, "outside.safetensors")
    shutil.copyfile(os.path.join(step, "model.safetensors"), outside)
    cases = []
    for label, name in [("../ name", "../outside.safetensors"), ("absolute name", outside),
                        ("pickle component", "model.pth")]:
        def case(name: str = name, label: str = label) -> Any:
            d = os.path.join(root, label.replace(" ", "_").replace("/", ""))
            shutil.copytree(run, d, dirs_exist_ok=True)
            files = dict(good.files)
            files[name] = files.pop("model.safetensors")
            comps = dict(good.components, model=name)
            raw = Manifest(1, files, comps, world_size=1, checksum=good.checksum).to_bytes()
            with open(os.path.join(d, "step_00000001", "manifest.json"), "wb") as fh:
                fh.write(raw)
            return CheckpointManager(d).restore(1, model=small_model(1))
        cases.append((f"manifest with {label}", case))

    def symlink() -> Any:
        d = os.path.join(root, "symlinked")
        shutil.copytree(run, d)
        target = os.path.join(d, "step_00000001", "model.safetensors")
        os.remove(target)
        os.symlink(outside, target)
        return CheckpointManager(d).restore(1, model=small_model(1))
    cases.append(("symlink out of the step directory", symlink))
    cases.append(("symlink via load_checkpoint(step dir)",
                  lambda: ckptmgr.load_checkpoint(small_model(1), os.path.join(root, "symlinked", "step_00000001"))))
    return cases


def run_malicious(http_server: Any = None, s3_endpoint: str = "") -> Tally:
    """Every load path with a canary pickle, bad safetensors headers and escaping manifests."""
    tally = Tally("malicious inputs")
    with tempfile.TemporaryDirectory() as root:
        canary = os.path.join(root, "CANARY")
        evil = evil_bytes(canary)
        local = os.path.join(root, "evil.pth")
        with open(local, "wb") as fh:
            fh.write(evil)
        sources: List[Tuple[str, str]] = [("local path", local), ("file://", "file://" + local)]
        import fsspec
        with fsspec.open("memory://rel/evil.pth", "wb") as fh:
            fh.write(evil)
        sources.append(("memory://", "memory://rel/evil.pth"))
        if s3_endpoint:
            bucket = new_bucket(s3_endpoint)
            os.environ.update(s3_env(s3_endpoint))
            import s3fs
            s3fs.S3FileSystem.clear_instance_cache()
            s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=s3_endpoint).pipe(f"{bucket}/evil.pth",
                                                                                              evil)
            sources.append(("s3://", f"s3://{bucket}/evil.pth"))
        if http_server is not None:
            sources.append(("http://", http_server.add("/evil.pth", evil)))
            http_server.add("/pretrain/third_party/resnet50_v1c-2cccc1ad.pth", evil)
            os.environ["CKPTMGR_URL_MIRRORS"] = f"https://download.openmmlab.com/={http_server.url('/')}"
            sources.append(("open-mmlab:// via mirror", "open-mmlab://resnet50_v1c"))
        for label, uri in sources:
            tally.trial(f"pickle via {label}", lambda uri=uri: expect_typed(
                lambda: ckptmgr.load_checkpoint(small_model(), uri), uri))
        beside = os.path.join(root, "evil_meta.pth")
        with open(beside, "wb") as fh:
            fh.write(evil_bytes(canary, beside_weights=True))
        tally.trial("pickle beside the weights: skipped by load_checkpoint", lambda: _skipped_beside_weights(beside))
        os.environ.pop("CKPTMGR_URL_MIRRORS", None)
        for command in (["inspect", local], ["convert", local, os.path.join(root, "out.safetensors")]):
            def cli(command: List[str] = command) -> None:
                proc = subprocess.run([sys.executable, "-m", "ckptmgr.cli"] + command, cwd=ROOT, capture_output=True,
                                      text=True, timeout=120)
                assert proc.returncode != 0, f"exit 0: {proc.stdout[-300:]}"
                assert "Traceback" not in proc.stderr, proc.stderr[-400:]
            tally.trial(f"pickle via CLI {command[0]}", cli)
        for label, data in _bad_safetensors():
            path = os.path.join(root, f"{label.replace(' ', '_')}.safetensors")
            with open(path, "wb") as fh:
                fh.write(data)
            tally.trial(f"safetensors: {label}", lambda path=path: expect_typed(
                lambda: ckptmgr.load_checkpoint(small_model(), path), path))
        for label, case in _manifest_cases(root):
            tally.trial(label, lambda case=case, label=label: expect_typed(case, label))
        tally.trial("canary never created", lambda: _assert_absent(canary))
    return tally


def _assert_absent(path: str) -> None:
    assert not os.path.exists(path), "pickle code ran: the canary file exists"


def with_servers(func: Callable[..., Tally]) -> Tally:
    """Run ``func(http_server=..., s3_endpoint=...)`` with a moto server and the test HTTP server."""
    from tests.support.httpserver import FileServer
    moto = start_moto()
    try:
        with FileServer() as server:
            return func(http_server=server, s3_endpoint=moto.endpoint)
    finally:
        moto.stop()
