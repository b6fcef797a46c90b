"""The integrations import their framework only when imported, and say how to install it when it is missing."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

FRAMEWORKS = ("lightning", "lightning_fabric", "pytorch_lightning", "mmengine", "mmcv")

# A meta-path finder that makes the named top-level packages look uninstalled.
BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Block())
"""


def _run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_ckptmgr_and_the_integrations_package_import_no_framework():
    code = ("import json, sys, ckptmgr, ckptmgr.integrations\n"
            f"print(json.dumps(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules)))")
    assert _run(code) == []


@pytest.mark.parametrize("module, blocked, extra", [
    ("ckptmgr.integrations.lightning", ("lightning", "lightning_fabric", "pytorch_lightning"), "ckptmgr[lightning]"),
    ("ckptmgr.integrations.mmengine", ("mmengine",), "ckptmgr[mmengine]"),
])
def test_a_missing_framework_raises_missing_dependency_error_with_the_extra(module, blocked, extra):
    code = BLOCK.format(blocked=set(blocked)) + f"""
import json
from ckptmgr.errors import MissingDependencyError
try:
    import {module}
except MissingDependencyError as exc:
    print(json.dumps({{"error": type(exc).__name__, "hint": exc.hint,
                      "is_import_error": isinstance(exc, ImportError)}}))
else:
    print(json.dumps({{"error": None}}))
"""
    result = _run(code)
    assert result["error"] == "MissingDependencyError" and result["is_import_error"]
    assert extra in result["hint"]
