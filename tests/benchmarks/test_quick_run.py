"""The benchmark suite runs end to end (small sizes) and produces every figure, peers included."""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


@pytest.mark.timeout(300)
def test_run_all_quick_produces_every_figure(tmp_path):
    import run_all
    results = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run_all.py"), "--quick",
                           "--results", str(results), "--dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(results.read_text())
    for key, bench, *_ in run_all.FIGURES:
        value = data[bench][key]
        if key in run_all.SIGNED:  # a difference of two timings: any sign at these sizes, undefined when zero
            assert value is None or (isinstance(value, float) and math.isfinite(value)), (key, value)
            continue
        assert isinstance(value, float), (key, value)
        # memory figures may truly be zero at these sizes (in-place loads, reused buffers); times never are
        assert value >= 0 if key.startswith("M5") else value > 0, (key, value)
    for bench in {b for _, b, *_ in run_all.FIGURES}:
        assert data[bench]["machine"]["torch"], bench
    for bench, peers in (("save", ["torch_save", "dcp_save", "accelerate_save", "dcp_async_blocking"]),
                         ("load", ["torch_load", "dcp_load", "accelerate_load", "restore_verified", "restore"]),
                         ("train_loop", ["dcp_async", "async", "sync"])):
        assert all(data[bench]["median_seconds"][p] > 0 for p in peers), bench  # every peer measured in the run
    table = proc.stdout
    assert "M1 sync durable save throughput" in table and "retention" in table
    assert "| durable save |" in table and "accelerate" in table
    assert os.listdir(tmp_path) == ["results.json"]  # scratch space cleaned up


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_balanced_orders_let_each_variant_follow_each_other_equally_often(n):
    from common import balanced_orders, interleave
    rows = balanced_orders(n)
    assert all(sorted(row) == list(range(n)) for row in rows)
    follows = {}
    for row in rows:
        for a, b in zip(row, row[1:]):
            follows[a, b] = follows.get((a, b), 0) + 1
    assert len(follows) == n * (n - 1) and len(set(follows.values())) <= 1  # every ordered pair, as often
    ran = []
    samples = interleave({str(i): (lambda i=i: ran.append(i) or 0.0) for i in range(n)}, len(rows), balanced=True)
    assert ran == [i for row in rows for i in row] and all(len(v) == len(rows) for v in samples.values())
