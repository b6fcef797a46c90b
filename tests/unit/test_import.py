"""Importing ckptmgr stays cheap: heavy parts load only when a feature needs them.

Structural, not timed: what a fresh interpreter has imported after
``import torch; import ckptmgr`` (or a CLI command) is checked, never how long
it took. The time figure is ``benchmarks/bench_import.py``.
"""
import json
import subprocess
import sys

HEAVY = ("torch.distributed.checkpoint", "torch.distributed.tensor", "torch.distributed.fsdp",
         "torch.distributed.optim", "torchvision",
         "accelerate", "s3fs", "torch._dynamo", "lightning", "pytorch_lightning", "mmengine", "mmcv")

PROBE = """
import json, sys
{setup}
print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))
"""


def _imported_after(setup: str) -> list:
    code = PROBE.format(setup=setup, heavy=HEAVY)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_import_ckptmgr_pulls_in_no_heavy_module():
    assert _imported_after("import torch\nimport ckptmgr\n"
                           "ckptmgr.CheckpointManager, ckptmgr.CheckpointHook, ckptmgr.load_checkpoint") == []


TORCH_FREE = """
import contextlib, io, json, sys
import ckptmgr
from ckptmgr.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    codes = [main(["--help"]), main(["ls", {run!r}]), main(["ls", {run!r}, "--json"]), main(["verify", {run!r}]),
             main(["verify", {step!r}]), main(["prune", {run!r}, "--dry-run"])]
print(json.dumps({{"codes": codes, "torch": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))}}))
"""


def test_cli_help_ls_and_verify_of_a_manager_directory_import_no_torch(tmp_path):
    run = tmp_path / "run"
    subprocess.run([sys.executable, "-c", f"""
import torch, ckptmgr
with ckptmgr.CheckpointManager({str(run)!r}, max_to_keep=2) as mgr:
    for step in range(3):
        mgr.save(step, model=torch.nn.Linear(2, 2), metrics={{"loss": 1.0}})
"""], check=True)
    code = TORCH_FREE.format(run=str(run), step=str(run / "step_00000002"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result == {"codes": [0, 0, 0, 0, 0, 0], "torch": []}


def test_the_facade_loads_names_lazily_and_still_lists_them():
    code = """
import json, sys
import ckptmgr
before = "torch" in sys.modules
from ckptmgr import CheckpointManager, StorageError
import ckptmgr.errors
print(json.dumps({"before": before, "after": "torch" in sys.modules, "all": ckptmgr.__all__,
                  "dir": dir(ckptmgr), "same": ckptmgr.StorageError is ckptmgr.errors.StorageError,
                  "sharded": callable(ckptmgr.sharded.consolidate)}))
"""
    result = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                       check=True).stdout.strip().splitlines()[-1])
    assert result["before"] is False and result["after"] is True
    assert set(result["all"]) <= set(result["dir"]) and result["same"] and result["sharded"]
    assert not {"Any", "Dict", "importlib", "TYPE_CHECKING"} & set(result["dir"])


def test_cli_help_and_ls_of_a_local_directory_import_neither_dcp_nor_s3fs(tmp_path):
    run = tmp_path / "run"
    setup = f"""
import contextlib, io, torch
from torch import nn
import ckptmgr
from ckptmgr.cli import main
with ckptmgr.CheckpointManager({str(run)!r}) as mgr:
    mgr.save(1, model=nn.Linear(2, 2))
with contextlib.redirect_stdout(io.StringIO()):
    main(["--help"])
    assert main(["ls", {str(run)!r}]) == 0
    assert main(["verify", {str(run)!r}]) == 0
"""
    assert _imported_after(setup) == []


def test_saving_an_optimizer_imports_neither_zero_nor_dcp(tmp_path):
    """The ZeRO and FSDP checks look for instances of classes already imported; they import nothing.

    (Creating any torch optimizer imports torch._dynamo, and with it FSDP, so
    only the modules ckptmgr alone could have pulled in are checked here.)
    """
    setup = f"""
import torch
from torch import nn
import ckptmgr
model = nn.Linear(2, 2)
with ckptmgr.CheckpointManager({str(tmp_path / "run")!r}) as mgr:
    mgr.save(1, model=model, optimizer=torch.optim.Adam(model.parameters()))
    mgr.restore(model=model, optimizer=torch.optim.Adam(model.parameters()))
"""
    imported = _imported_after(setup)
    assert "torch.distributed.optim" not in imported and "torch.distributed.checkpoint" not in imported


def test_public_names_are_exported():
    import ckptmgr
    for name in ("save_checkpoint", "load_checkpoint", "load_checkpoint_with_prefix", "load_state_dict",
                 "get_state_dict", "weights_to_cpu", "unwrap_model", "is_module_wrapper",
                 "register_module_wrapper", "CheckpointLoader", "rank_zero_first"):
        assert name in ckptmgr.__all__ and callable(getattr(ckptmgr, name))
