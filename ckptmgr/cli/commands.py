"""The subcommands of ``ckptmgr``: each a thin layer over the library, printing text or ``--json``.

``ls``, ``inspect`` and ``verify`` never write where they read; nothing is
unpickled unless ``--trust-pickle`` is given. The work is done by
:mod:`ckptmgr.inventory` (listing, verifying, pruning), :mod:`ckptmgr.describe`
(what a checkpoint holds), :mod:`ckptmgr.release` (convert, publish) and the
download cache.
"""
from __future__ import annotations

import argparse
import os
import sys

from ..errors import CheckpointNotFoundError
from ..io.access import open_store
from . import render
from .parser import UsageError, policy_from_args

__all__ = ["cmd_ls", "cmd_inspect", "cmd_verify", "cmd_convert", "cmd_publish", "cmd_prune", "cmd_download"]


def _need_dir(uri: str) -> str:
    store = open_store(uri)
    if not store.isdir():
        if store.exists():
            raise CheckpointNotFoundError(f"{uri} is a file, not a directory",
                                          "pass a CheckpointManager directory; `ckptmgr inspect` reads single files")
        raise CheckpointNotFoundError(f"{uri} does not exist", "check the path; pass a CheckpointManager directory")
    return uri.rstrip("/") or uri


def _nothing_here(directory: str) -> CheckpointNotFoundError:
    others = open_store(directory).listdir()
    what = (f"{len(others)} other entr{'ies' if len(others) != 1 else 'y'}, none of them ckptmgr's" if others
            else "it is empty")
    return CheckpointNotFoundError(f"{directory} holds no checkpoints ({what})",
                                   "pass the directory a CheckpointManager saved into")


def cmd_ls(args: argparse.Namespace) -> int:
    """List the checkpoints of a manager directory."""
    from ..inventory import is_step_dir, kept_by, recorded_settings, scan_directory
    directory = _need_dir(args.path)
    entries = scan_directory(directory)
    where = None
    if getattr(args, "local_dir", None):  # tiered: also this node's local copies, and where each step is
        from ..inventory import with_local_tier
        entries, where = with_local_tier(entries, args.local_dir)
    if not entries and is_step_dir(directory):
        print(f"{directory} is a step directory; try `ckptmgr inspect` or `ckptmgr verify` on it")
        return 0
    if not entries:
        raise _nothing_here(directory)
    committed = [e for e in entries if e.manifest is not None]
    incomplete = [e for e in entries if e.manifest is None]
    policy, recorded = policy_from_args(args), None
    if policy is None:
        recorded = recorded_settings(committed)
        policy = recorded.policy() if recorded is not None else None
    kept = kept_by(committed, policy) if policy is not None else None
    names = {e.step: e.manifest.model_names() for e in committed if e.manifest is not None}
    several = any(n != ["model"] for n in names.values())
    if args.json:
        render.print_json({"directory": directory, "retention": recorded.to_json() if recorded else None,
                           "checkpoints": [
            {"step": e.step, "name": e.name, "time": e.manifest.time, "size": e.size, "metrics": e.manifest.metrics,
             "world_size": e.manifest.world_size, "models": names[e.step],
             **({"kept_by": kept[e.step]} if kept is not None else {}),
             **({"where": where[e.step]} if where is not None else {})}
            for e in committed if e.manifest is not None],
            "incomplete": [{"name": e.name, "step": e.step, "status": e.status, "problem": e.problem or None}
                           for e in incomplete]})
        return 0
    latest = f" (latest: step {committed[-1].step})" if committed else ""
    print(f"{directory}: {len(committed)} committed checkpoint{'s' * (len(committed) != 1)}{latest}")
    if recorded is not None:
        print(f"retention recorded with the run: {recorded.describe()}")
    if committed:
        rows = [["STEP", "COMMITTED (UTC)", "SIZE", "METRICS"] + (["MODELS"] if several else [])
                + (["WHERE"] if where is not None else []) + (["KEPT BY"] if kept is not None else [])]
        for e, manifest in ((e, e.manifest) for e in committed if e.manifest is not None):
            row = [str(e.step), render.when(manifest.time), render.size(e.size), render.metrics(manifest.metrics)]
            if several:
                row.append(", ".join(names[e.step]))
            if where is not None:
                row.append(where[e.step])
            if kept is not None:
                row.append(", ".join(kept[e.step]) or "(prune would delete it)")
            rows.append(row)
        render.print_table(rows)
    if incomplete:
        print("not committed (resume never uses these):")
        for e in incomplete:
            print(f"  {e.name}  {e.status}: {e.note}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Show what a checkpoint holds."""
    from ..describe import describe_checkpoint
    info = describe_checkpoint(args.path, None if args.all else args.top, args.trust_pickle)
    if args.json:
        render.print_json(info)
        return 0
    if info["kind"] == "manager checkpoint":
        print(f"{info['source']}: manager checkpoint, step {info['step']}, committed {render.when(info['time'])} UTC "
              f"by {info['world_size']} rank(s), {render.size(sum(info['files'].values()))} in "
              f"{len(info['files'])} files")
        print(f"metrics: {render.metrics(info['metrics'])}")
    else:
        kind = "" if info["kind"] == "file" else f" ({info['kind']})"
        print(f"{info['source']}: {render.size(info['size'])}{kind}" if info["size"] is not None
              else info["source"] + kind)
    if info.get("meta"):
        print("meta:")
        for key, value in info["meta"].items():
            print(f"  {key}: {render.inline(value)}")
    render.print_optimizers("optimizer", info.get("optimizer") or {})
    for name, sched in (info.get("scheduler") or {}).items():
        print(f"scheduler {name!r}: " + ", ".join(f"{k}={render.inline(v)}" for k, v in sched.items()))
    if info.get("extra_keys"):
        print(f"extra: {', '.join(info['extra_keys'])}")
    if info.get("other_keys"):
        print(f"other top-level keys: {', '.join(info['other_keys'])}")
    if info.get("models"):
        print(f"models: {', '.join(info['models'])}")
        for name, table in info["models"].items():
            _print_tensors(f"model {name!r}", table)
        return 0
    if info["state_dict"] is None:
        print("no model state dict found")
        return 0
    _print_tensors("state_dict", info["state_dict"])
    return 0


def _print_tensors(title: str, table: dict) -> None:
    dtypes = ", ".join(f"{n} {d}" for d, n in table["dtypes"].items())
    print(f"{title}: {table['tensors']} tensors ({dtypes}), {table['elements']:,} elements, "
          f"{render.size(table['bytes'])}")
    width = max([len(k["key"]) for k in table["keys"]] + [3])
    for k in table["keys"]:
        print(f"  {k['key'].ljust(width)}  {str(tuple(k['shape'])):<18} {k['dtype']}")
    if len(table["keys"]) < table["tensors"]:
        print(f"  ... {table['tensors'] - len(table['keys'])} more (--all shows every key)")
    if table["other_entries"]:
        print(f"  non-tensor entries: {', '.join(table['other_entries'])}")


def cmd_verify(args: argparse.Namespace) -> int:
    """Check every file of a step, a manager directory or a hash-named file."""
    from ..format.signing import load_key
    from ..inventory import verify
    try:
        key = load_key(args.key_file)
    except ValueError as exc:
        raise UsageError(f"--key-file: {exc}") from None
    results = verify(args.path, signing_key=key)
    checked = [r for r in results if r.status in ("checked", "file")]
    bad = [r for r in checked if not r.ok]
    if args.json:
        render.print_json({"ok": bool(checked) and not bad, "checked": [
            {"path": r.uri, "status": r.status, "ok": r.ok if r in checked else None, "problems": r.problems,
             "signed_by": r.signed_by or None} for r in results]})
        return 1 if bad or not checked else 0
    for r in results:
        what = f"{len(r.manifest.files)} files" if r.manifest else "sha256 matches its name"
        what += f", signed with key id {r.signed_by}" if r.signed_by else ""
        print(f"{r.uri}  not committed ({r.status}; resume never uses it)" if r not in checked else
              f"{r.uri}  OK ({what})" if r.ok else f"{r.uri}  DAMAGED")
        for problem in r.problems:
            print(f"    {problem}")
    if not checked:
        print(f"{args.path}: nothing committed to verify", file=sys.stderr)
        return 1
    print(f"{len(bad)} of {len(checked)} damaged" if bad else f"all {len(checked)} intact")
    return 1 if bad else 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Write a checkpoint's weights and meta to one file, or to safetensors shards and an index."""
    from ..format.hf_layout import parse_size
    from ..release import convert, layout_of, parse_dtype
    try:
        layout_of(args.dst, args.max_shard_size)
        parse_dtype(args.dtype)
        parse_size(args.max_shard_size)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    written = convert(args.src, args.dst, force=args.force, trust_pickle=args.trust_pickle, dtype=args.dtype,
                      max_shard_size=args.max_shard_size, include_optimizer=args.include_optimizer)
    if args.json:
        render.print_json({"source": args.src, "path": written.path, "tensors": written.entries, "size": written.size,
                           "files": written.files})
    else:
        what = "weights and meta" + (" and optimizer" if args.include_optimizer else "") + " only"
        shards = f" in {len(written.files)} files" if len(written.files) > 1 else ""
        print(f"wrote {written.path}: {written.entries} entries, {render.size(written.size)}{shards} ({what})")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    """Write weights under a torch.hub-style hashed name."""
    from ..release import check_name, parse_dtype, publish, publish_name
    try:
        name = check_name(args.name or publish_name(args.src))
    except ValueError as exc:
        raise UsageError(f"--{exc}") from None
    try:
        parse_dtype(args.dtype)
    except ValueError as exc:
        raise UsageError(f"--{exc}") from None
    written = publish(args.src, args.dst_dir, name=name, trust_pickle=args.trust_pickle, dtype=args.dtype)
    if args.json:
        render.print_json({"path": written.path, "sha256": written.sha256, "size": written.size,
                           "tensors": written.entries})
    else:
        print(f"published {written.path} ({render.size(written.size)}, {written.entries} entries)")
        print(f"sha256 {written.sha256}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    """Delete the committed checkpoints a retention policy drops."""
    from ..errors import CheckpointFormatError
    from ..inventory import prune
    try:
        result = prune(_need_dir(args.path), policy_from_args(args), dry_run=args.dry_run)
    except CheckpointFormatError as exc:  # no flags, and no policy recorded with the run
        raise UsageError(f"{exc.message}; say what to keep with --keep N (and --keep-every, --keep-best)") from None
    if args.json:
        render.print_json({"directory": result.directory, "dry_run": args.dry_run, "delete": result.delete,
                           "deleted": result.deleted, "kept": result.kept, "untouched": result.untouched,
                           "errors": result.errors})
    else:
        verb = "would delete" if args.dry_run else "deleted"
        done = result.delete if args.dry_run else result.deleted
        print(f"{result.directory}: {verb} {len(done)} checkpoint(s){': steps ' + str(done) if done else ''}; "
              f"kept steps {result.kept}")
        if result.untouched:
            print(f"not committed, left alone: {', '.join(result.untouched)}")
        for line in result.errors:
            print(f"error: {line}", file=sys.stderr)
    return 1 if result.errors else 0


def cmd_download(args: argparse.Namespace) -> int:
    """Fill the download cache and print the local path."""
    from ..hub.cache import cached_path
    from ..hub.zoo import resolve
    source = resolve(args.uri)
    path = cached_path(source, check_hash=not args.no_check_hash, sync_ranks=False)
    if args.json:
        render.print_json({"uri": args.uri, "source": source, "path": path, "size": os.path.getsize(path)})
    else:
        print(path)
    return 0
