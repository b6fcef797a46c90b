"""Every ```python snippet of README.md runs as written, each in a fresh interpreter and an empty directory.

A snippet that starts a process group gets the environment ``torchrun
--nproc_per_node=1`` would give it. Nothing is added to the code.
"""
import os
import re
import subprocess
import sys

import pytest

from tests.support.multiproc import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _snippets():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        text = fh.read()
    blocks = re.findall(r"^```python\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)
    heading = [re.findall(r"^#+ (.*)$", text[:text.index(block)], flags=re.MULTILINE)[-1] for block in blocks]
    return [pytest.param(block, id=f"{i}-{re.sub(r'[^a-z0-9]+', '-', title.lower()).strip('-')}")
            for i, (block, title) in enumerate(zip(blocks, heading))]


def test_the_readme_has_snippets():
    assert len(_snippets()) >= 5


@pytest.mark.timeout(600)
@pytest.mark.parametrize("code", _snippets())
def test_readme_snippet_runs_as_written(code, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    if "init_process_group" in code:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    (tmp_path / "snippet.py").write_text(code)
    proc = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
