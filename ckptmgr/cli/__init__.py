"""The ``ckptmgr`` command: list, inspect, verify, convert, publish, prune and download checkpoints.

People operating training runs need answers without writing Python: what a
directory holds, whether a checkpoint is intact, what retention would delete,
how to hand weights to someone else. Scripts need the same answers as JSON
(``--json``). :mod:`.parser` defines the command line, :mod:`.commands` the
subcommands, :mod:`.render` how results are shown.

Exit codes: 0 success, 1 failure (damage found, missing or unreadable input),
2 usage error.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from ..errors import CheckpointError, UnsafeCheckpointError
from . import commands
from .parser import UsageError
from .parser import build_parser as _build_parser

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``ckptmgr`` command (every subcommand has ``--help``)."""
    return _build_parser(commands)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``ckptmgr`` command; returns the exit code (0 ok, 1 failure, 2 usage error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:     # --help (0) and argparse usage errors (2)
        return int(exc.code or 0)
    if not logging.getLogger().handlers:
        level = logging.WARNING - 10 * min(args.verbose, 2)
        logging.basicConfig(level=level, format="ckptmgr: %(levelname)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args))
    except BrokenPipeError:  # `ckptmgr ls DIR | head`: the reader has what it wanted
        _silence_stdout()
        return 0
    except UsageError as exc:
        print(f"ckptmgr {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except UnsafeCheckpointError as exc:
        if exc.hint != UnsafeCheckpointError.default_hint:  # not a pickle file --trust-pickle could open
            print(f"ckptmgr {args.command}: error: {exc}", file=sys.stderr)
            return 1
        print(f"ckptmgr {args.command}: error: {exc.message}. Hint: if you trust this file, add --trust-pickle; "
              f"better, convert it once: ckptmgr convert SRC DST.safetensors --trust-pickle", file=sys.stderr)
        return 1
    except (CheckpointError, OSError) as exc:
        print(f"ckptmgr {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the flush at exit does not fail on the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real file descriptor (captured output): nothing to flush into a pipe
        pass
