"""The ``ckptmgr`` command: list, inspect, verify, convert, publish, prune and download checkpoints.

People operating training runs need answers without writing Python: what a
directory holds, whether a checkpoint is intact, what retention would delete,
how to hand weights to someone else. Scripts need the same answers as JSON
(``--json``). Each subcommand is a thin layer over the library (the manifest
inventory, retention policies, the manager's deletion protocol, the loader
registry, the download cache); ``ls``, ``inspect`` and ``verify`` never write
where they read. Nothing is unpickled unless ``--trust-pickle`` is given.

Exit codes: 0 success, 1 failure (damage found, missing or unreadable input),
2 usage error.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from typing import Any, Dict, Mapping, Optional, Sequence

from . import storage
from .errors import (CheckpointError, CheckpointExistsError, CheckpointNotFoundError, DirectoryInUseError,
                     UnsafeCheckpointError)
from .inventory import (describe_checkpoint, is_step_dir, jsonable, kept_by, load_weights_and_meta,
                        scan_directory, verify)
from .manifest import HashingReader
from .ownership import DirectoryOwner

logger = logging.getLogger(__name__)

__all__ = ["main", "build_parser"]

TOP_DEFAULT = 20


class UsageError(Exception):
    """A bad combination or value of arguments (exit code 2)."""


# --------------------------------------------------------------------------- small helpers


def _size(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _when(iso: str) -> str:
    return iso.replace("T", " ").replace("+00:00", "") if iso else "-"


def _metrics(metrics: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()) or "-"


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def _need_dir(uri: str) -> str:
    if not storage.isdir(uri):
        raise CheckpointNotFoundError(f"{uri} is not a directory", "pass a CheckpointManager directory")
    return uri.rstrip("/") or uri


def _policy(args: argparse.Namespace):
    from .retention import build_policy
    try:
        return build_policy(args.keep, args.keep_every, args.best_metric, args.best_mode, args.keep_best)
    except ValueError as exc:   # name the flags, not the Python arguments behind them
        text = str(exc)
        for arg, flag in (("max_to_keep", "--keep"), ("keep_every_n_steps", "--keep-every"),
                          ("keep_best", "--keep-best"), ("best_metric", "--best-metric")):
            text = text.replace(arg, flag)
        raise UsageError(text) from None


# --------------------------------------------------------------------------- ls


def cmd_ls(args: argparse.Namespace) -> int:
    directory = _need_dir(args.path)
    entries = scan_directory(directory)
    committed = [e for e in entries if e.status == "committed"]
    incomplete = [e for e in entries if e.status != "committed"]
    rules = any(v is not None for v in (args.keep, args.keep_every)) or bool(args.keep_best)
    kept = kept_by(committed, _policy(args)) if rules else None
    if args.json:
        _print_json({"directory": directory, "checkpoints": [
            {"step": e.step, "name": e.name, "time": e.manifest.time, "size": e.size, "metrics": e.manifest.metrics,
             "world_size": e.manifest.world_size, **({"kept_by": kept[e.step]} if kept is not None else {})}
            for e in committed],
            "incomplete": [{"name": e.name, "step": e.step, "status": e.status, "problem": e.problem or None}
                           for e in incomplete]})
        return 0
    if not entries and is_step_dir(directory):
        print(f"{directory} is a step directory; try `ckptmgr inspect` or `ckptmgr verify` on it")
        return 0
    latest = f" (latest: step {committed[-1].step})" if committed else ""
    print(f"{directory}: {len(committed)} committed checkpoint{'s' * (len(committed) != 1)}{latest}")
    if committed:
        rows = [("STEP", "COMMITTED (UTC)", "SIZE", "METRICS") + (("KEPT BY",) if kept is not None else ())]
        for e in committed:
            row = (str(e.step), _when(e.manifest.time), _size(e.size), _metrics(e.manifest.metrics))
            if kept is not None:
                row += (", ".join(kept[e.step]) or "(prune would delete it)",)
            rows.append(row)
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  " + "  ".join(c.rjust(w) if i == 0 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
                  .rstrip())
    if incomplete:
        print("not committed (resume never uses these):")
        for e in incomplete:
            print(f"  {e.name}  {e.status}: {e.note}")
    return 0


# --------------------------------------------------------------------------- inspect


def _inline(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def _print_optimizers(kind: str, summary: Mapping[str, Any]) -> None:
    for name, opt in summary.items():
        if "param_groups" not in opt:
            print(f"{kind} {name!r}: {_inline(opt)}")
            continue
        state = f", state for {opt['params_with_state']} params ({', '.join(opt['state_keys'])})" \
            if opt["params_with_state"] else ""
        print(f"{kind} {name!r}: {len(opt['param_groups'])} param group(s){state}")
        for i, group in enumerate(opt["param_groups"]):
            hyper = ", ".join(f"{k}={_inline(v)}" for k, v in group.items()
                              if k != "params" and v is not None and v is not False)   # unset switches are noise
            print(f"  group {i}: {group['params']} params, {hyper}")


def cmd_inspect(args: argparse.Namespace) -> int:
    info = describe_checkpoint(args.path, None if args.all else args.top, args.trust_pickle)
    if args.json:
        _print_json(info)
        return 0
    if info["kind"] == "manager checkpoint":
        print(f"{info['source']}: manager checkpoint, step {info['step']}, committed {_when(info['time'])} UTC by "
              f"{info['world_size']} rank(s), {_size(sum(info['files'].values()))} in {len(info['files'])} files")
        print(f"metrics: {_metrics(info['metrics'])}")
    else:
        print(f"{info['source']}: {_size(info['size'])}" if info["size"] is not None else info["source"])
    if info.get("meta"):
        print("meta:")
        for key, value in info["meta"].items():
            print(f"  {key}: {_inline(value)}")
    _print_optimizers("optimizer", info.get("optimizer") or {})
    for name, sched in (info.get("scheduler") or {}).items():
        print(f"scheduler {name!r}: " + ", ".join(f"{k}={_inline(v)}" for k, v in sched.items()))
    if info.get("extra_keys"):
        print(f"extra: {', '.join(info['extra_keys'])}")
    if info.get("other_keys"):
        print(f"other top-level keys: {', '.join(info['other_keys'])}")
    table = info["state_dict"]
    if table is None:
        print("no model state dict found")
        return 0
    dtypes = ", ".join(f"{n} {d}" for d, n in table["dtypes"].items())
    print(f"state_dict: {table['tensors']} tensors ({dtypes}), {table['elements']:,} elements, "
          f"{_size(table['bytes'])}")
    width = max([len(k["key"]) for k in table["keys"]] + [3])
    for k in table["keys"]:
        print(f"  {k['key'].ljust(width)}  {str(tuple(k['shape'])):<18} {k['dtype']}")
    if len(table["keys"]) < table["tensors"]:
        print(f"  ... {table['tensors'] - len(table['keys'])} more (--all shows every key)")
    if table["other_entries"]:
        print(f"  non-tensor entries: {', '.join(table['other_entries'])}")
    return 0


# --------------------------------------------------------------------------- verify


def cmd_verify(args: argparse.Namespace) -> int:
    results = verify(args.path)
    checked = [r for r in results if r.status in ("checked", "file")]
    bad = [r for r in checked if not r.ok]
    if args.json:
        _print_json({"ok": not bad, "checked": [{"path": r.uri, "status": r.status, "ok": r.ok if r in checked
                                                 else None, "problems": r.problems} for r in results]})
        return 1 if bad else 0
    for r in results:
        what = f"{len(r.manifest.files)} files" if r.manifest else "sha256 matches its name"
        print(f"{r.uri}  not committed ({r.status}; resume never uses it)" if r not in checked else
              f"{r.uri}  OK ({what})" if r.ok else f"{r.uri}  DAMAGED")
        for problem in r.problems:
            print(f"    {problem}")
    print(f"{len(bad)} of {len(checked)} damaged" if bad else f"all {len(checked)} intact")
    return 1 if bad else 0


# --------------------------------------------------------------------------- convert, publish


def _plain_meta(meta: Mapping[str, Any]) -> Dict[str, Any]:
    """Meta that any loader can read back without pickle (JSON values only)."""
    return json.loads(json.dumps(jsonable(meta)))


def _write_torch(fh: Any, weights: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    from .serialization import save_torch
    save_torch({"meta": _plain_meta(meta), "state_dict": dict(weights)}, fh)


def _write_safetensors(fh: Any, weights: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    import torch
    from .serialization import write_safetensors
    dropped = [k for k, v in weights.items() if not isinstance(v, torch.Tensor)]
    if dropped:
        logger.warning("safetensors holds tensors only; not converted: %s", ", ".join(dropped))
    tensors = {k: v for k, v in weights.items() if isinstance(v, torch.Tensor)}
    write_safetensors(fh, tensors, {"format": "pt", "ckptmgr.meta": json.dumps(_plain_meta(meta))})


def cmd_convert(args: argparse.Namespace) -> int:
    dst = args.dst
    if dst.endswith(".safetensors"):
        write = _write_safetensors
    elif dst.endswith((".pth", ".pt", ".bin", ".ckpt")):
        write = _write_torch
    else:
        raise UsageError(f"{dst}: the destination must end in .safetensors, .pth, .pt, .bin or .ckpt")
    if storage.exists(dst) and not args.force:
        raise CheckpointExistsError(f"{dst} exists", "pass --force to replace it")
    weights, meta = load_weights_and_meta(args.src, args.trust_pickle)
    with storage.atomic_write(dst) as fh:
        write(fh, weights, meta)
    if args.json:
        _print_json({"source": args.src, "path": dst, "tensors": len(weights), "size": storage.size(dst)})
    else:
        print(f"wrote {dst}: {len(weights)} entries, {_size(storage.size(dst))} (weights and meta only)")
    return 0


def _publish_name(src: str) -> str:
    trimmed = src.rstrip("/")
    base = trimmed.rsplit("/", 1)[-1]
    if is_step_dir(trimmed):
        base = f"{trimmed.rsplit('/', 2)[-2]}-{base}"
    stem = base.split(".", 1)[0] if "://" not in base else base
    return re.sub(r"-[0-9a-f]{8,64}$", "", stem)   # republishing drops the old hash


def cmd_publish(args: argparse.Namespace) -> int:
    name = args.name or _publish_name(args.src)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise UsageError(f"--name {name!r}: use letters, digits, '.', '_' and '-' only")
    weights, meta = load_weights_and_meta(args.src, args.trust_pickle)
    with tempfile.TemporaryFile() as tmp:
        _write_torch(tmp, weights, meta)    # weights and meta: optimizer and other training state stay behind
        tmp.flush()
        tmp.seek(0)
        entry = HashingReader(tmp).finish()
        final = storage.join(args.dst_dir.rstrip("/") or args.dst_dir, f"{name}-{entry.sha256[:8]}.pth")
        storage.makedirs(args.dst_dir)
        tmp.seek(0)
        with storage.atomic_write(final) as out:
            shutil.copyfileobj(tmp, out, 4 << 20)
    if args.json:
        _print_json({"path": final, "sha256": entry.sha256, "size": entry.size, "tensors": len(weights)})
    else:
        print(f"published {final} ({_size(entry.size)}, {len(weights)} entries)")
        print(f"sha256 {entry.sha256}")
    return 0


# --------------------------------------------------------------------------- prune, download


def cmd_prune(args: argparse.Namespace) -> int:
    from . import stepdir
    from .retention import CheckpointInfo, steps_to_delete
    policy = _policy(args)
    directory = _need_dir(args.path)
    entries = scan_directory(directory)
    committed = [e for e in entries if e.status == "committed"]
    doomed = steps_to_delete([CheckpointInfo(e.step, e.manifest.metrics) for e in committed], policy)
    deleted, failed = [], []
    owner = None
    if doomed and not args.dry_run and storage.is_local(directory):
        owner = DirectoryOwner(directory)     # the lock a saving job holds: never prune under a live job
        try:
            owner.claim()
        except DirectoryInUseError as exc:
            raise DirectoryInUseError(f"not pruning: {exc.message}", "the job's own retention (max_to_keep) "
                                      "prunes it; run prune after the job stops") from None
    try:
        for step in doomed if not args.dry_run else ():
            try:
                stepdir.delete_step(directory, step)    # uncommit first, then delete: never a partial committed step
                deleted.append(step)
            except (CheckpointError, OSError) as exc:
                failed.append(f"step {step}: {exc}")
    finally:
        if owner is not None:
            owner.release()
    kept = [e.step for e in committed if e.step not in doomed]
    skipped = [e.name for e in entries if e.status != "committed"]
    if args.json:
        _print_json({"directory": directory, "dry_run": args.dry_run, "delete": doomed, "deleted": deleted,
                     "kept": kept, "untouched": skipped, "errors": failed})
    else:
        verb = "would delete" if args.dry_run else "deleted"
        done = doomed if args.dry_run else deleted
        print(f"{directory}: {verb} {len(done)} checkpoint(s){': steps ' + str(done) if done else ''}; "
              f"kept steps {kept}")
        if skipped:
            print(f"not committed, left alone: {', '.join(skipped)}")
        for line in failed:
            print(f"error: {line}", file=sys.stderr)
    return 1 if failed else 0


def _resolve(uri: str) -> str:
    """Zoo names resolve to the URL (or path) they stand for; other URIs are returned unchanged."""
    protocol, rest = storage.split_protocol(uri)
    from .loaders import zoo
    if protocol in ("torchvision", "modelzoo"):
        return zoo.resolve_torchvision(rest)
    if protocol in ("open-mmlab", "openmmlab", "mmcls"):
        return zoo.resolve_zoo_name("mmcls" if protocol == "mmcls" else "open-mmlab", rest)
    return uri


def cmd_download(args: argparse.Namespace) -> int:
    from .cache import cached_path
    source = _resolve(args.uri)
    path = cached_path(source, check_hash=not args.no_check_hash, sync_ranks=False)
    if args.json:
        _print_json({"uri": args.uri, "source": source, "path": path, "size": os.path.getsize(path)})
    else:
        print(path)
    return 0


# --------------------------------------------------------------------------- wiring


def _retention_flags(p: argparse.ArgumentParser, keep_required: bool) -> None:
    p.add_argument("--keep", type=int, required=keep_required, metavar="N", help="keep the N newest checkpoints")
    p.add_argument("--keep-every", type=int, metavar="N", help="also keep every step divisible by N")
    p.add_argument("--best-metric", metavar="NAME", help="metric that ranks checkpoints for --keep-best")
    p.add_argument("--best-mode", choices=("min", "max"), default="min", help="lower (min) or higher (max) is better")
    p.add_argument("--keep-best", type=int, default=0, metavar="K", help="also keep the K best by --best-metric")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``ckptmgr`` command (every subcommand has ``--help``)."""
    parser = argparse.ArgumentParser(prog="ckptmgr", description=__doc__.split("\n\n")[0],
                                     epilog="exit codes: 0 ok, 1 failure (damage found, missing input), 2 usage error")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON for machines instead of text")
    unpickle = argparse.ArgumentParser(add_help=False)
    unpickle.add_argument("--trust-pickle", action="store_true", help="allow pickle code (only for files you trust)")

    def add(name: str, func: Any, help_text: str, loads: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common, unpickle] if loads else [common], help=help_text,
                           description=help_text)
        p.set_defaults(func=func)
        return p
    p = add("ls", cmd_ls, "list the checkpoints of a manager directory; flag the ones that are not committed")
    p.add_argument("path", metavar="DIR_OR_URL")
    _retention_flags(p, keep_required=False)
    p = add("inspect", cmd_inspect, "show meta, keys with shapes and dtypes, and optimizer state of a checkpoint "
                                    "(a .pth/.safetensors file, a manager or step directory, or any scheme)",
            loads=True)
    p.add_argument("path", metavar="PATH_OR_URI")
    p.add_argument("--top", type=int, default=TOP_DEFAULT, metavar="N", help=f"keys to show (default {TOP_DEFAULT})")
    p.add_argument("--all", action="store_true", help="show every key")
    p = add("verify", cmd_verify, "check sizes and sha256 of every file against the manifest (a step directory, "
                                  "or every step of a manager directory); exit 1 on damage")
    p.add_argument("path", metavar="PATH_OR_URL")
    p = add("convert", cmd_convert, "convert weights: .pth <-> .safetensors, manager checkpoint -> one file",
            loads=True)
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST", help="ends in .safetensors, .pth, .pt, .bin or .ckpt")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p = add("publish", cmd_publish, "write weights without optimizer state as NAME-<sha256[:8]>.pth "
                                    "(the torch.hub convention) and print the hash", loads=True)
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst_dir", metavar="DST_DIR")
    p.add_argument("--name", help="file name stem (default: from SRC)")
    p = add("prune", cmd_prune, "delete committed checkpoints that a retention policy drops (never touches other "
                                "files; refuses a local DIR a job is saving into; on object stores, do not run "
                                "it while a job with a smaller --keep writes to DIR)")
    p.add_argument("path", metavar="DIR")
    _retention_flags(p, keep_required=True)
    p.add_argument("--dry-run", action="store_true", help="only say what would be deleted")
    p = add("download", cmd_download, "download a URI (http, s3, any fsspec URL, zoo name) into the cache; "
                                      "print the local path")
    p.add_argument("uri", metavar="URI")
    p.add_argument("--no-check-hash", action="store_true", help="do not check a NAME-<sha256>.ext name's hash")
    return parser


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
        return args.func(args)
    except UsageError as exc:
        print(f"ckptmgr {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except UnsafeCheckpointError as exc:
        print(f"ckptmgr {args.command}: error: {exc.message}. Hint: if you trust this file, add --trust-pickle; "
              f"better, convert it once: ckptmgr convert SRC DST.safetensors --trust-pickle", file=sys.stderr)
        return 1
    except (CheckpointError, OSError) as exc:
        print(f"ckptmgr {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
