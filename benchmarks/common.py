"""Shared pieces of the benchmarks: the state to save, timing, interleaving, memory sampling.

Every figure in benchmarks/ is a ratio of two things measured in the same run,
each the median of interleaved repetitions (A B C A B C ..., never A A A B B B),
so a noisy neighbour or a warming page cache hits all variants alike.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
from torch import nn

MiB = 1024 * 1024


def make_model(state_mib: float, width: int = 1024) -> nn.Module:
    """A stack of Linear layers whose fp32 weights + two Adam moments total about ``state_mib``."""
    params_wanted = int(state_mib * MiB / 12)  # 4 bytes of weight + 8 bytes of Adam moments per parameter
    per_layer = width * width + width
    layers = max(1, round(params_wanted / per_layer))
    if layers == 1:
        width = max(8, int((params_wanted) ** 0.5))
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def make_state(state_mib: float, seed: int = 0):
    """(model, AdamW optimizer with both moments populated, state size in bytes)."""
    torch.manual_seed(seed)
    model = make_model(state_mib)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    width = model[0].in_features
    model(torch.randn(2, width)).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters()) * 3
    return model, opt, nbytes


def fsync_path(path: str) -> None:
    """fsync a file by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_into(fh, views) -> None:
    """Fill each writable buffer in ``views`` from ``fh`` with ``readinto`` (the raw read baseline)."""
    for view in views:
        mv = memoryview(view)
        got = 0
        while got < len(mv):
            got += fh.readinto(mv[got:])


def timed(fn: Callable[[], object]) -> float:
    """Seconds ``fn`` took."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def settle(managers: Iterable[Any]) -> None:
    """Wait until every manager's background deletes (the steps its retention dropped) ended, then ``os.sync()``.

    Benchmarks call it outside the clock, so one variant's delete never runs
    inside another variant's timing (unlinking 512 MiB took 0.18 s on this
    machine's disk, mounted with ``discard``). It reads a manager's private
    ``_reclaimer``: a public wait would be API for benchmarks' sake.
    """
    for manager in managers:
        manager._reclaimer.wait()
    os.sync()


def balanced_orders(n: int) -> List[List[int]]:
    """Orders of ``n`` variants (a Williams design) in which each variant directly follows every other equally often.

    ``n`` rows for an even ``n`` (each ordered pair once), ``2n`` for an odd one.
    """
    first, low, high = [0], 1, n - 1
    while len(first) < n:
        if len(first) % 2:
            first.append(low)
            low += 1
        else:
            first.append(high)
            high -= 1
    rows = [[(x + i) % n for x in first] for i in range(n)]
    return rows + [row[::-1] for row in rows] if n % 2 else rows


def interleave(variants: Dict[str, Callable[[], float]], repeats: int,
               setup: Optional[Callable[[], None]] = None, balanced: bool = False) -> Dict[str, List[float]]:
    """Run each variant ``repeats`` times, a round of every variant after another; each returns its own seconds.

    With ``balanced``, round ``r`` runs the variants in the order of row ``r`` of
    :func:`balanced_orders` instead of always the same order, so what one
    variant leaves behind (freed memory, a cold cache) slows the variant after
    it in turn rather than always the same one.
    """
    names = list(variants)
    orders = balanced_orders(len(names)) if balanced else [list(range(len(names)))]
    samples: Dict[str, List[float]] = {name: [] for name in variants}
    for r in range(repeats):
        for i in orders[r % len(orders)]:
            if setup is not None:
                setup()
            samples[names[i]].append(variants[names[i]]())
    return samples


def median(values: List[float]) -> float:
    """Median of a list of samples."""
    return statistics.median(values)


def machine() -> Dict[str, object]:
    """What the figures were measured on."""
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree(pid: int) -> List[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo.extend(int(c) for c in fh.read().split())
        except OSError:
            continue
    return pids


def pss_bytes(pid: Optional[int] = None) -> int:
    """Proportional set size of a process and all its descendants, in bytes."""
    return sum(_pss_kib(p) for p in _tree(pid or os.getpid())) * 1024


class PeakPss:
    """Samples the PSS of this process tree in a thread; ``peak`` is the largest seen.

    Use as a context manager around the operation; ``extra`` is the peak above
    the PSS measured on entry.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, pss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakPss":
        self.baseline = pss_bytes()
        self.peak = self.baseline
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, pss_bytes())

    @property
    def extra(self) -> int:
        """Peak bytes above the baseline."""
        return self.peak - self.baseline


def emit(result: Dict[str, object], out: Optional[str]) -> None:
    """Print a result as JSON and write it to ``out`` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        with open(out, "w") as fh:
            fh.write(text + "\n")


def base_parser(description: str):
    """argparse parser with the options every benchmark takes."""
    import argparse
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--state-mib", type=float, default=512, help="state size: fp32 weights + two Adam moments")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repetitions per variant (median kept)")
    parser.add_argument("--dir", default=None, help="scratch directory on the disk to measure (default: a temp dir)")
    parser.add_argument("--out", default=None, help="write the JSON result here too")
    return parser


def run_in_scratch(name: str, args, run: Callable[[str], Dict[str, object]]) -> Dict[str, object]:
    """Call ``run(scratch_dir)`` in a fresh directory under ``args.dir``, remove it, emit the result."""
    import shutil
    import tempfile
    scratch = tempfile.mkdtemp(prefix=f"ckptmgr-bench-{name}-", dir=args.dir)
    try:
        result = run(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    emit(result, args.out)
    return result
