"""Scenario 3: every file kind truncated, bit-flipped or garbled must give a typed error, never a silent load.

Kinds: a manager step's manifest, weights, optimizer, RNG, extra and meta
files; the weights and optimizer files of a larger step, which restores read
on several threads (each past ``SPLIT_FROM``); and single files written by
``save_checkpoint`` (``.pth`` and ``.safetensors``). Damage: truncation at 0, 1, 8, header end - 1 / + 1,
random offsets and size - 1; random single-bit flips; garbage JSON. Each case
runs under a 30 s alarm (a hang is a failure).

Manager steps are restored with an explicit step and ``verify=True`` (every
damage must be detected), and, for truncations, with ``verify=False`` too
(sizes are always checked). Single files have no checksum: a flipped bit in
tensor data loads different numbers, so for them a bit flip may load, but
never crash with an untyped error or hang.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import struct
import tempfile
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

import ckptmgr
from ckptmgr import CheckpointManager
from ckptmgr.format.manifest import Manifest
from reliability.common import Tally, expect_typed, small_model

LIMIT_S = 30
LARGE = "larger step, read on several threads: "


def _alarm(signum: int, frame: Any) -> None:
    raise TimeoutError(f"no answer within {LIMIT_S} s")


def _build(root: str, checksum: Optional[str]) -> Dict[str, str]:
    """A committed step 1 (``checksum``; None: the manager's default) and two single files; returns kind -> path."""
    model = small_model()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 16)).sum().backward()
    opt.step()
    run = os.path.join(root, "run")
    with CheckpointManager(run, **({"checksum": checksum} if checksum else {})) as mgr:
        mgr.save(1, model=model, optimizer=opt, extra={"epoch": 3, "t": torch.arange(4)}, meta={"note": "x"})
    step = os.path.join(run, "step_00000001")
    kinds = {"manifest": "manifest.json", "weights": "model.safetensors", "optimizer": "optimizer.safetensors",
             "rng": "rng-rank00000.safetensors", "extra": "extra.safetensors", "meta": "meta.json"}
    out = {kind: os.path.join(step, name) for kind, name in kinds.items()}
    out.update(_build_large(root, checksum))
    out["single .pth"] = os.path.join(root, "single.pth")
    out["single .safetensors"] = os.path.join(root, "single.safetensors")
    ckptmgr.save_checkpoint(model, out["single .pth"], optimizer=opt)
    ckptmgr.save_checkpoint(model, out["single .safetensors"])
    return out


def _build_large(root: str, checksum: Optional[str]) -> Dict[str, str]:
    """A committed step 1 of :func:`_large_model` in ``root/large``; returns its two large kinds -> path."""
    model = _large_model(0)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 1024)).sum().backward()
    opt.step()
    with CheckpointManager(os.path.join(root, "large"), **({"checksum": checksum} if checksum else {})) as mgr:
        mgr.save(1, model=model, optimizer=opt)
    step = os.path.join(root, "large", "step_00000001")
    return {f"{LARGE}weights": os.path.join(step, "model.safetensors"),
            f"{LARGE}optimizer": os.path.join(step, "optimizer.safetensors")}


def _large_model(seed: int) -> torch.nn.Module:
    """Weights of 5 MiB (Adam moments: 10 MiB), so both files are read on several threads."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(1024, 1280), torch.nn.Linear(1280, 4))


def _flipped(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def _header_end(data: bytes) -> int:
    if len(data) >= 8:
        n = struct.unpack("<Q", data[:8])[0]
        if 8 + n <= len(data):
            return 8 + n  # safetensors: length prefix + JSON header
    return min(len(data) // 2, 64)  # JSON or a zip: some point inside the structure


def damages(data: bytes, rng: random.Random, offsets: int, flips: int) -> List[Tuple[str, Callable[[], bytes]]]:
    """(label, damaged bytes) pairs for one file."""
    size, end = len(data), _header_end(data)
    cuts = sorted({0, 1, 8, end - 1, end + 1, size - 1} | {rng.randrange(0, size) for _ in range(offsets)})
    out: List[Tuple[str, Callable[[], bytes]]] = [(f"truncate@{c}", (lambda c=c: data[:c])) for c in cuts
                                                  if 0 <= c < size]
    for _ in range(flips):
        bit = rng.randrange(size * 8)
        out.append((f"flip bit {bit}", lambda bit=bit: _flipped(data, bit)))
    out.append(("garbage JSON", lambda: b'{"format": "ckptmgr.checkpoint", "files": [1, 2,'))
    return out


def _load(kind: str, path: str, run: str, verify: bool) -> Callable[[], Any]:
    if kind.startswith(LARGE):
        model = _large_model(1)
        opt = torch.optim.Adam(model.parameters())
        large = os.path.join(os.path.dirname(run), "large")
        return lambda: CheckpointManager(large, max_to_keep=None).restore(1, model=model, optimizer=opt,
                                                                          verify=verify)
    model = small_model(1)
    if kind.startswith("single"):
        return lambda: ckptmgr.load_checkpoint(model, path, strict=True)
    opt = torch.optim.Adam(model.parameters())
    return lambda: CheckpointManager(run, max_to_keep=None).restore(1, model=model, optimizer=opt, verify=verify)


def run_corruption(offsets: int, flips: int, seed: int = 0, checksum: Optional[str] = None) -> Tally:
    """Every damage of every kind; ``offsets`` random truncations and ``flips`` bit flips per kind.

    ``checksum`` picks the manager's file checksum (None: its default); the
    tally's figures name the one the step's manifest recorded.
    """
    tally = Tally("corruption of every file kind")
    rng = random.Random(seed)
    silent: Dict[str, int] = {}
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        with tempfile.TemporaryDirectory() as root:
            paths = _build(root, checksum)
            run = os.path.join(root, "run")
            with open(paths["manifest"], "rb") as fh:
                tally.figures["manager checksum"] = Manifest.from_bytes(fh.read()).checksum
            for kind, path in paths.items():
                with open(path, "rb") as fh:
                    pristine = fh.read()
                backup = path + ".pristine"
                shutil.copyfile(path, backup)
                for label, make in damages(pristine, rng, offsets, flips):
                    def check(kind: str = kind, label: str = label, make: Callable[[], bytes] = make,
                              path: str = path) -> None:
                        with open(path, "wb") as fh:
                            fh.write(make())
                        signal.alarm(LIMIT_S)
                        try:
                            modes = [True, False] if label.startswith("truncate") else [True]
                            for verify in modes:
                                if kind.startswith("single") and label.startswith("flip"):
                                    try:  # no checksum in a single file: loading other numbers is possible
                                        _load(kind, path, run, verify)()
                                        silent[kind] = silent.get(kind, 0) + 1
                                    except ckptmgr.CheckpointError:
                                        pass
                                    continue
                                expect_typed(_load(kind, path, run, verify), f"{kind} {label} verify={verify}")
                        finally:
                            signal.alarm(0)
                    tally.trial(f"{kind}: {label}", check)
                shutil.move(backup, path)
    finally:
        signal.signal(signal.SIGALRM, previous)
    tally.figures["single-file bit flips that loaded (no checksum to catch them)"] = silent
    return tally
