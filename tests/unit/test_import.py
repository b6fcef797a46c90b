"""Importing ckptmgr stays cheap: heavy optional parts load lazily."""
import subprocess
import sys

CODE = """
import time, sys
import torch
t = time.perf_counter()
import ckptmgr
elapsed = time.perf_counter() - t
heavy = [m for m in ("torchvision", "accelerate", "torch._dynamo", "s3fs", "numpy.random") if m in sys.modules and m != "numpy.random"]
print(f"{elapsed:.3f} {','.join(heavy)}")
"""


def test_import_is_fast_and_lazy():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True).stdout.split()
    elapsed = float(out[0])
    assert elapsed < 1.0, f"import ckptmgr took {elapsed:.2f}s beyond torch"
    assert len(out) == 1, f"heavy modules imported eagerly: {out[1]}"


def test_public_names_are_exported():
    import ckptmgr
    for name in ("save_checkpoint", "load_checkpoint", "load_checkpoint_with_prefix", "load_state_dict",
                 "get_state_dict", "weights_to_cpu", "unwrap_model", "is_module_wrapper",
                 "register_module_wrapper", "CheckpointLoader", "rank_zero_first"):
        assert name in ckptmgr.__all__ and callable(getattr(ckptmgr, name))
