"""Read-only views of checkpoints, for people and tools: what a directory holds, is it intact, what is inside.

Training code only needs "the latest good step"; operators need more: every
entry of a manager directory with its state (committed, damaged, a crashed
save's leftovers), a byte-for-byte check that reports every bad file instead
of stopping at the first, which retention rule keeps which step, and a plain
description of a checkpoint's contents. These functions answer that for the
``ckptmgr`` command and anyone scripting around it. None of them writes, and
none unpickles unless the caller passes ``trust_pickle=True``.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from . import storage
from .errors import CheckpointError, CheckpointFormatError, CheckpointNotFoundError, CorruptCheckpointError
from .manifest import (MANIFEST_NAME, HashingReader, Manifest, is_temp_name, parse_old_name, parse_step_name,
                       step_name)
from .retention import AnyOf, CheckpointInfo, KeepAll, KeepBest, KeepEvery, KeepLast, Policy

logger = logging.getLogger(__name__)

__all__ = ["DirEntry", "scan_directory", "StepCheck", "check_step", "verify", "kept_by", "is_manager_path",
           "is_step_dir", "load_weights_and_meta", "describe_checkpoint", "jsonable"]

_LEFTOVER_RE = re.compile(r"^\.(?:tmp|old)-step_(\d{8,})-")

# --------------------------------------------------------------------------- a manager directory


@dataclass
class DirEntry:
    """One entry of a manager directory whose name ckptmgr owns (see :func:`scan_directory`).

    Attributes:
        name: The entry's name in the directory.
        status: ``'committed'``; ``'damaged'`` (its manifest does not check out);
            ``'uncommitted'`` (a step directory without a manifest: an interrupted
            upload, or a copy made by something else); ``'temporary'`` (a save in
            progress, or one that crashed); ``'replaced'`` (the old copy left by an
            interrupted forced save).
        step: The step its name carries.
        manifest: The manifest of a committed entry.
        problem: Why a damaged entry is damaged.
    """

    name: str
    status: str
    step: int
    manifest: Optional[Manifest] = None
    problem: str = ""

    @property
    def size(self) -> Optional[int]:
        """Bytes of a committed checkpoint's data files, from its manifest (None for other entries)."""
        return None if self.manifest is None else sum(e.size for e in self.manifest.files.values())

    @property
    def note(self) -> str:
        """What the status means, in words (for listings)."""
        return self.problem if self.status == "damaged" else _NOTES.get(self.status, "")


_NOTES = {
    "committed": "complete and verified by its manifest",
    "uncommitted": "no manifest.json: an interrupted upload or a copy made by something else",
    "temporary": "a save in progress, or one that crashed (the next save removes it)",
    "replaced": "the old copy of an interrupted forced save (the next save settles it)",
}


def scan_directory(directory: str, storage_options: Optional[Dict[str, Any]] = None) -> List[DirEntry]:
    """Classify what a manager directory holds, from one listing and its manifests.

    Entries whose names ckptmgr does not own are left out.

    Returns:
        The entries, ordered by step, then name.
    """
    entries: List[DirEntry] = []
    steps: Dict[str, int] = {}
    for name in storage.listdir(directory, storage_options):
        step = parse_step_name(name)
        leftover = _LEFTOVER_RE.match(name)
        if step is not None:
            steps[name] = step
        elif leftover and (is_temp_name(name) or parse_old_name(name)):
            entries.append(DirEntry(name, "temporary" if is_temp_name(name) else "replaced", int(leftover.group(1))))
    uris = {name: storage.join(directory, name, MANIFEST_NAME) for name in steps}
    raw = storage.read_many(list(uris.values()), storage_options) if uris else {}
    for name, step in steps.items():
        data = raw[uris[name]]
        if isinstance(data, FileNotFoundError):
            entries.append(DirEntry(name, "uncommitted", step))
            continue
        try:
            if isinstance(data, BaseException):
                raise data
            manifest = Manifest.from_bytes(data, source=uris[name])
            if manifest.step != step:
                raise CorruptCheckpointError(f"{uris[name]} records step {manifest.step}")
        except Exception as exc:  # reported, not raised: a listing shows damage instead of failing on it
            entries.append(DirEntry(name, "damaged", step, problem=getattr(exc, "message", str(exc))))
            continue
        entries.append(DirEntry(name, "committed", step, manifest))
    return sorted(entries, key=lambda e: (e.step, e.name))


@dataclass
class StepCheck:
    """What :func:`check_step` found: the manifest (when it could be read) and every problem, each naming its file.

    ``status`` is ``'checked'``, ``'file'`` for a single file checked against
    the hash in its name, or, for an entry :func:`verify` did not check, its
    :class:`DirEntry` status (``'uncommitted'``, ``'temporary'``, ``'replaced'``).
    """

    uri: str
    manifest: Optional[Manifest]
    problems: List[str]
    status: str = "checked"

    @property
    def ok(self) -> bool:
        """True when everything checked is intact."""
        return not self.problems and (self.manifest is not None or self.status == "file")


def check_step(step_uri: str, storage_options: Optional[Dict[str, Any]] = None) -> StepCheck:
    """Check a step directory byte for byte against its manifest.

    Unlike a restore, it does not stop at the first bad file: every listed file
    is checked for presence, size and sha256.

    Returns:
        A :class:`StepCheck`.
    """
    manifest_uri = storage.join(step_uri, MANIFEST_NAME)
    try:
        with storage.open_read(manifest_uri, storage_options) as fh:
            manifest = Manifest.from_bytes(fh.read(), source=manifest_uri)
    except CheckpointNotFoundError:
        return StepCheck(step_uri, None, [f"{MANIFEST_NAME}: missing, so this step is not committed"])
    except CheckpointError as exc:
        return StepCheck(step_uri, None, [f"{MANIFEST_NAME}: {exc.message}"])
    problems: List[str] = []
    named = parse_step_name(step_uri.rstrip("/").rsplit("/", 1)[-1])
    if named is not None and named != manifest.step:
        problems.append(f"{MANIFEST_NAME}: records step {manifest.step}, but the directory is step {named}")
    present = storage.list_files(step_uri, storage_options)
    for name, want in sorted(manifest.files.items()):
        if name not in present:
            problems.append(f"{name}: missing")
            continue
        try:
            with storage.open_read(storage.join(step_uri, name), storage_options) as fh:
                got = HashingReader(fh).finish()
        except CheckpointError as exc:
            problems.append(f"{name}: cannot be read ({exc.message})")
            continue
        if got.size != want.size:
            problems.append(f"{name}: {got.size} bytes, the manifest recorded {want.size}")
        elif got.sha256 != want.sha256:
            problems.append(f"{name}: sha256 {got.sha256[:16]}... differs from the manifest's {want.sha256[:16]}...")
    return StepCheck(step_uri, manifest, problems)


def verify(uri: str, storage_options: Optional[Dict[str, Any]] = None) -> List[StepCheck]:
    """Check a step directory, every step of a manager directory, or a file named ``NAME-<sha256 prefix>.ext``.

    Entries of a manager directory that are not committed (a crashed save's
    leftovers) are reported with their status, not checked: resume never uses them.

    Raises:
        CheckpointNotFoundError: nothing there, or a directory without checkpoints.
        CheckpointFormatError: a single file whose name carries no hash to check against.
    """
    uri = uri.rstrip("/") or uri
    if is_manager_path(uri):
        if is_step_dir(uri):
            return [check_step(uri, storage_options)]
        entries = scan_directory(uri, storage_options)
        if not entries:
            raise CheckpointNotFoundError(f"{uri} holds no checkpoints", "pass a CheckpointManager directory")
        return [check_step(storage.join(uri, e.name), storage_options) if e.status in ("committed", "damaged")
                else StepCheck(storage.join(uri, e.name), None, [], e.status) for e in entries]
    from .cache import hash_prefix
    prefix = hash_prefix(uri)
    if prefix is None:
        if not storage.exists(uri, storage_options):
            raise CheckpointNotFoundError(f"{uri} does not exist")
        raise CheckpointFormatError(f"{uri} is a single file without a sha256 prefix in its name, so there is "
                                    "nothing to check it against",
                                    "verify takes a manager or step directory, or a NAME-<sha256[:8]>.pth file")
    with storage.open_read(uri, storage_options) as fh:
        digest = HashingReader(fh).finish().sha256
    problem = [] if digest.startswith(prefix) else [f"sha256 {digest[:16]}... does not start with {prefix}, "
                                                     "the hash in the file name"]
    return [StepCheck(uri, None, problem, "file")]


def kept_by(entries: Sequence[DirEntry], policy: Policy) -> Dict[int, List[str]]:
    """For each committed entry's step, the rules of ``policy`` that keep it (empty: retention drops it).

    Labels read ``'last 3'``, ``'every 1000'``, ``'best 2 by loss'`` or ``'all'``.
    """
    infos = [CheckpointInfo(e.step, e.manifest.metrics) for e in entries if e.manifest is not None]
    out: Dict[int, List[str]] = {info.step: [] for info in infos}
    for rule in policy.policies if isinstance(policy, AnyOf) else (policy,):
        label = ("all" if isinstance(rule, KeepAll) else f"last {rule.n}" if isinstance(rule, KeepLast)
                 else f"every {rule.n}" if isinstance(rule, KeepEvery)
                 else f"best {rule.k} by {rule.metric}" if isinstance(rule, KeepBest) else type(rule).__name__)
        for step in rule.keep(infos):
            out[step].append(label)
    return out


# --------------------------------------------------------------------------- one checkpoint


def is_step_dir(uri: str) -> bool:
    """True when the last component of ``uri`` is a step directory name (``step_00000100``)."""
    return parse_step_name(str(uri).rstrip("/").rsplit("/", 1)[-1]) is not None


def is_manager_path(uri: str) -> bool:
    """True for a manager or step directory (local or fsspec); False for files and other schemes."""
    from .loaders.builtin import load_from_fsspec, load_from_local
    from .loaders.registry import CheckpointLoader
    try:
        if CheckpointLoader.get_loader(uri) not in (load_from_local, load_from_fsspec):
            return False
        return storage.isdir(uri)
    except CheckpointError:
        return False


def _load_any(uri: str, trust_pickle: bool) -> Any:
    from .loaders.registry import CheckpointLoader
    return CheckpointLoader.load_checkpoint(uri, map_location="cpu", logger="silent", trust_pickle=trust_pickle)


def load_weights_and_meta(uri: str, trust_pickle: bool = False) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(state_dict, meta)`` of any checkpoint: a file, a manager or step directory, any registered scheme.

    Raises:
        CheckpointFormatError: the checkpoint holds no model state dict.
        UnsafeCheckpointError: it needs pickle and ``trust_pickle`` is False.
    """
    from .checkpoint import extract_state_dict
    if is_manager_path(uri):
        from .loaders.directory import load_manager_checkpoint
        loaded = load_manager_checkpoint(uri, map_location="cpu")
        return loaded["state_dict"], dict(loaded["meta"], step=loaded["step"])
    ckpt = _load_any(uri, trust_pickle)
    meta = ckpt.get("meta") if isinstance(ckpt, Mapping) and isinstance(ckpt.get("meta"), Mapping) else {}
    return extract_state_dict(ckpt, uri), dict(meta)


def jsonable(value: Any) -> Any:
    """Plain JSON for reports: tensors become their value (one element) or shape and dtype, objects their repr."""
    import torch
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else {"tensor": list(value.shape), "dtype": str(value.dtype)}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _tensor_table(state_dict: Mapping[str, Any], limit: Optional[int]) -> Dict[str, Any]:
    import torch
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    dtypes: Dict[str, int] = {}
    for t in tensors.values():
        name = str(t.dtype).replace("torch.", "")
        dtypes[name] = dtypes.get(name, 0) + 1
    return {"tensors": len(tensors), "elements": sum(t.numel() for t in tensors.values()),
            "bytes": sum(t.numel() * t.element_size() for t in tensors.values()), "dtypes": dtypes,
            "other_entries": [str(k) for k in state_dict if k not in tensors],
            "keys": [{"key": k, "shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                     for k, v in list(tensors.items())[:limit]]}


def _optimizers(state: Any) -> Optional[Dict[str, Any]]:
    """Param groups (hyper-parameters, parameter counts) and per-parameter state keys of optimizer state dicts."""
    if state is None:
        return None
    if isinstance(state, Mapping) and "states" in state and "single" in state:    # as a manager stores it
        state = state["states"]
    if isinstance(state, Mapping) and "param_groups" in state:
        state = {"optimizer": state}
    if not isinstance(state, Mapping):
        return {"optimizer": jsonable(state)}
    out: Dict[str, Any] = {}
    for name, sd in state.items():
        if not (isinstance(sd, Mapping) and isinstance(sd.get("param_groups"), list)):
            out[str(name)] = {"keys": [str(k) for k in sd]} if isinstance(sd, Mapping) else jsonable(sd)
            continue
        per_param = sd.get("state") or {}
        out[str(name)] = {
            "param_groups": [dict(jsonable({k: v for k, v in g.items() if k != "params"}),
                                  params=len(g.get("params", []))) for g in sd["param_groups"]],
            "params_with_state": len(per_param),
            "state_keys": sorted({str(k) for s in per_param.values() if isinstance(s, Mapping) for k in s})}
    return out


def _describe_step(uri: str, limit: Optional[int]) -> Dict[str, Any]:
    from . import components
    from .loaders.directory import load_manager_checkpoint
    loaded = load_manager_checkpoint(uri, map_location="cpu")    # verifies the weights and meta files
    root = uri.rstrip("/") if is_step_dir(uri) else storage.join(uri.rstrip("/"), step_name(loaded["step"]))
    manifest = components.read_manifest(root)

    def component(name: str) -> Any:
        file = manifest.file_for(name)
        return None if file is None else components.read_component(root, manifest, file, True, "cpu")
    schedulers, extra = component("scheduler"), component("extra")
    return {"source": root, "kind": "manager checkpoint", "step": loaded["step"], "time": manifest.time,
            "world_size": manifest.world_size, "metrics": manifest.metrics,
            "files": {n: e.size for n, e in sorted(manifest.files.items())}, "meta": jsonable(loaded["meta"]),
            "state_dict": _tensor_table(loaded["state_dict"], limit),
            "optimizer": _optimizers(component("optimizer")),
            "scheduler": None if schedulers is None else {
                n: jsonable({k: v for k, v in s.items() if k in ("last_epoch", "_last_lr")})
                for n, s in schedulers["states"].items()},
            "extra_keys": sorted(extra) if isinstance(extra, Mapping) else None}


def _describe_file(uri: str, limit: Optional[int], trust_pickle: bool) -> Dict[str, Any]:
    from .checkpoint import extract_state_dict
    ckpt = _load_any(uri, trust_pickle)
    try:
        size: Optional[int] = storage.size(uri)
    except Exception:  # zoo names and custom schemes have no size to ask for
        size = None
    try:
        weights: Optional[Mapping[str, Any]] = extract_state_dict(ckpt, uri)
    except CheckpointFormatError:
        weights = None
    mapping = isinstance(ckpt, Mapping)
    return {"source": uri, "kind": "file", "size": size,
            "meta": jsonable(ckpt["meta"]) if mapping and isinstance(ckpt.get("meta"), Mapping) else None,
            "state_dict": None if weights is None else _tensor_table(weights, limit),
            "optimizer": _optimizers(ckpt.get("optimizer")) if mapping else None,
            "other_keys": [str(k) for k in ckpt if k not in ("meta", "state_dict", "optimizer", "model")]
            if mapping and weights is not ckpt else []}


def describe_checkpoint(uri: str, limit: Optional[int] = None, trust_pickle: bool = False) -> Dict[str, Any]:
    """What a checkpoint holds, as JSON-ready data.

    Args:
        uri: A ``.pth``/``.safetensors`` file, a manager directory (its newest
            good step) or step directory, or any URI a registered loader handles.
        limit: List at most this many state-dict keys (all when None).
        trust_pickle: Allow pickle code (only for files you trust).

    Returns:
        ``{'source', 'kind', 'meta', 'state_dict': {'tensors', 'elements', 'bytes',
        'dtypes', 'keys': [{'key', 'shape', 'dtype'}], ...}, 'optimizer', ...}``;
        manager checkpoints add step, time, world size, metrics, files, scheduler and extra keys.

    Raises:
        CheckpointNotFoundError, CorruptCheckpointError, UnsafeCheckpointError: as for loading.
    """
    if is_manager_path(uri):
        return _describe_step(uri, limit)
    return _describe_file(uri, limit, trust_pickle)
