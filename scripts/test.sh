#!/usr/bin/env bash
# The README's test command: from a fresh clone, build .venv if needed, install
# ckptmgr with its test extras (torch 2.14.1 / torchvision 0.29.1, the tested
# versions), check lint (ruff) and types (mypy), then run the whole pytest
# suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# Reinstall only when the packaging changed since the last install.
stamp=.venv/.ckptmgr-installed
want=$(cat setup.cfg setup.py pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
    .venv/bin/python -m pip install -q -e ".[test]"
    echo "$want" > "$stamp"
fi
export PYTHONDONTWRITEBYTECODE=1
echo "ruff check ."
.venv/bin/ruff check .
echo "mypy ckptmgr"
.venv/bin/mypy ckptmgr
exec .venv/bin/python -m pytest "$@"
