"""The ``ckptmgr`` command line: subcommands, their flags, and usage errors (exit code 2)."""
from __future__ import annotations

import argparse
from typing import Any, Callable, Optional

from ..retention import Policy, build_policy
from ..version import __version__

__all__ = ["UsageError", "build_parser", "policy_from_args", "TOP_DEFAULT"]

TOP_DEFAULT = 20
DESCRIPTION = "List, inspect, verify, convert, publish, prune and download checkpoints."
EPILOG = "exit codes: 0 ok, 1 failure (damage found, missing input), 2 usage error"


class UsageError(Exception):
    """A bad combination or value of arguments (exit code 2)."""


def policy_from_args(args: argparse.Namespace) -> Optional[Policy]:
    """The retention policy the flags describe; None when no retention flag is given (use the run's own).

    Raises:
        UsageError: a flag is out of range (the message names the flag).
    """
    if (args.keep is None and args.keep_every is None and args.best_metric is None and not args.keep_best
            and args.best_mode == "min"):
        return None
    try:
        return build_policy(args.keep, args.keep_every, args.best_metric, args.best_mode, args.keep_best)
    except ValueError as exc:   # name the flags, not the Python arguments behind them
        text = str(exc)
        for arg, flag in (("max_to_keep", "--keep"), ("keep_every_n_steps", "--keep-every"),
                          ("keep_best", "--keep-best"), ("best_metric", "--best-metric")):
            text = text.replace(arg, flag)
        raise UsageError(text) from None


def _retention_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep", type=int, metavar="N",
                   help="keep the N newest checkpoints (without any retention flag: the policy recorded with the run)")
    p.add_argument("--keep-every", type=int, metavar="N", help="also keep every step divisible by N")
    p.add_argument("--best-metric", metavar="NAME", help="metric that ranks checkpoints for --keep-best")
    p.add_argument("--best-mode", choices=("min", "max"), default="min", help="lower (min) or higher (max) is better")
    p.add_argument("--keep-best", type=int, default=0, metavar="K", help="also keep the K best by --best-metric")


def build_parser(commands: Any) -> argparse.ArgumentParser:
    """The argument parser; ``commands`` provides one ``cmd_<name>`` function per subcommand."""
    parser = argparse.ArgumentParser(prog="ckptmgr", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for debug)")
    parser.add_argument("--version", action="version", version=f"ckptmgr {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON for machines instead of text")
    unpickle = argparse.ArgumentParser(add_help=False)
    unpickle.add_argument("--trust-pickle", action="store_true", help="allow pickle code (only for files you trust)")

    def add(name: str, help_text: str, loads: bool = False) -> argparse.ArgumentParser:
        func: Callable[[argparse.Namespace], int] = getattr(commands, f"cmd_{name}")
        p = sub.add_parser(name, parents=[common, unpickle] if loads else [common], help=help_text,
                           description=help_text)
        p.set_defaults(func=func)
        return p
    p = add("ls", "list the checkpoints of a manager directory; flag the ones that are not committed")
    p.add_argument("path", metavar="DIR_OR_URL")
    p.add_argument("--local-dir", metavar="PATH", help="the job's local_dir on this node: also list its copies and "
                   "show where each step is (local, persistent, both)")
    _retention_flags(p)
    p = add("inspect", "show meta, keys with shapes and dtypes, and optimizer state of a checkpoint "
                       "(a .pth/.safetensors file, a manager or step directory, or any scheme)", loads=True)
    p.add_argument("path", metavar="PATH_OR_URI")
    p.add_argument("--top", type=int, default=TOP_DEFAULT, metavar="N", help=f"keys to show (default {TOP_DEFAULT})")
    p.add_argument("--all", action="store_true", help="show every key")
    p = add("verify", "check sizes and checksums of every file against the manifest (a step directory, "
                      "or every step of a manager directory); exit 1 on damage")
    p.add_argument("path", metavar="PATH_OR_URL")
    p.add_argument("--key-file", metavar="PATH", help="also check each manifest's signature with this key "
                                                      "(default: CKPTMGR_SIGNING_KEY when set)")
    p = add("convert", "convert weights: .pth <-> .safetensors, any checkpoint -> one file, or -> a directory of "
                       "safetensors shards with model.safetensors.index.json (the Hugging Face layout)", loads=True)
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST", help="ends in .safetensors, .pth, .pt, .bin or .ckpt for one file; a "
                                              "directory name (no extension, or a trailing /) for shards")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--dtype", metavar="DTYPE", help="cast floating-point tensors (bfloat16, float16, float32)")
    p.add_argument("--max-shard-size", metavar="SIZE", help="largest shard of a directory DST (5GB, 500MB, 2GiB)")
    p.add_argument("--include-optimizer", action="store_true", help="export the optimizer state too")
    p = add("publish", "write weights without optimizer state as NAME-<sha256[:8]>.pth "
                       "(the torch.hub convention) and print the hash", loads=True)
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst_dir", metavar="DST_DIR")
    p.add_argument("--name", help="file name stem (default: from SRC)")
    p.add_argument("--dtype", metavar="DTYPE", help="cast floating-point tensors (bfloat16, float16, float32)")
    p = add("prune", "delete committed checkpoints that a retention policy drops: the flags' policy, or without "
                     "flags the one recorded with the run (never touches other files; refuses a local DIR a job "
                     "is saving into; on object stores, do not run it while a job with a smaller --keep writes "
                     "to DIR)")
    p.add_argument("path", metavar="DIR")
    _retention_flags(p)
    p.add_argument("--dry-run", action="store_true", help="only say what would be deleted")
    p = add("download", "download a URI (http, s3, any fsspec URL, zoo name) into the cache; print the local path")
    p.add_argument("uri", metavar="URI")
    p.add_argument("--no-check-hash", action="store_true", help="do not check a NAME-<sha256>.ext name's hash")
    return parser
