"""Before a restore reads into or applies to anything: check the step against the live objects, from headers.

A restore reads weights and optimizer moments straight into the live tensors
(``in_place``) and then applies the rest, so a mismatch found late leaves the
objects half-restored. Everything that can be known without tensor data is
therefore checked first, on every rank, whatever ``in_place`` says: the
model's keys and shapes (``strict``), and for optimizers, schedulers and the
scaler their names, classes and param groups. Only the headers of the
safetensors files are read (one ranged read each) and the small JSON files;
tensors are data-less stand-ins. Integrity is not judged here: the read that
follows verifies every byte.
"""
from __future__ import annotations

import io
import json
import struct
from typing import Any, Dict

from ..errors import CorruptCheckpointError, KeyMismatchError
from ..format.manifest import Manifest
from ..format.safetensors import MAX_HEADER_BYTES, read_safetensors_header, stand_ins
from ..format.skeleton import SKELETON_KEY, from_skeleton
from ..io.store import Store
from ..state import objects
from ..state.models import as_models
from ..state.modules import check_state_dict
from ..state.partial import frozen_record
from .models import saved_models
from .records import TrainingObjects

__all__ = ["check_fits", "peek"]

_FIRST_READ = 64 * 1024  # most headers fit; a bigger one costs a second ranged read


def _header(store: Store, name: str, size: int) -> Dict[str, Any]:
    head = store.read_range(name, 0, min(size, _FIRST_READ))
    if len(head) >= 8:
        (length,) = struct.unpack("<Q", head[:8])
        if len(head) < 8 + length <= min(size, 8 + MAX_HEADER_BYTES):
            head += store.read_range(name, len(head), 8 + length - len(head))
    header, _ = read_safetensors_header(io.BytesIO(head), None)
    return header


def peek(store: Store, manifest: Manifest, name: str) -> Any:
    """The structure of one file of a step, its tensors as data-less stand-ins (shape and dtype only).

    Raises:
        CorruptCheckpointError: the file is not what the manifest says it is.
    """
    if name not in manifest.files:
        raise CorruptCheckpointError(f"{store.root}: the manifest names {name} as a component but has no entry "
                                     "for it")
    store.check_inside(name)
    if name.endswith(".json"):
        try:
            return from_skeleton(json.loads(store.read_bytes(name).decode("utf-8")), {})
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptCheckpointError(f"{store.root}: {name} is not valid JSON: {exc}") from exc
    if not name.endswith(".safetensors"):
        raise CorruptCheckpointError(f"{store.root}: {name} is neither JSON nor safetensors; refusing to read it")
    header = _header(store, name, manifest.files[name].size)
    metadata = header.get("__metadata__") or {}
    tensors = stand_ins(header)
    skeleton = metadata.get(SKELETON_KEY)
    try:
        return tensors if skeleton is None else from_skeleton(json.loads(skeleton), tensors)
    except json.JSONDecodeError as exc:
        raise CorruptCheckpointError(f"{store.root}: {name}: structure metadata is not JSON") from exc


def check_fits(store: Store, manifest: Manifest, objs: TrainingObjects, strict: bool, *, model: bool = True,
               optimizer: bool = True) -> None:
    """Raise before anything is read or applied when the step cannot be restored into ``objs``.

    Args:
        store: The step directory.
        manifest: Its manifest.
        objs: The live objects.
        strict: Model keys and shapes must match; every object passed must have saved state.
        model: Check the model (False when another engine, DCP, loads it and checks it itself).
        optimizer: Check optimizers (False likewise).

    Raises:
        KeyMismatchError: ``strict`` and the model's keys or shapes differ from the step's.
        CheckpointFormatError: an optimizer, scheduler or scaler does not fit (see
            :func:`ckptmgr.state.fit.check_saved`).
        CorruptCheckpointError: a header is malformed.
    """
    def saved(component: str) -> Any:
        name = manifest.file_for(component)
        return None if name is None else peek(store, manifest, name)

    if model and strict and not objs.exclude.drops("model") and not objs.exclude.patterns:
        _check_models(store, manifest, objs)
    for component, arg in (("optimizer", objs.optimizer if optimizer else None),
                           ("scheduler", objs.scheduler), ("scaler", objs.scaler)):
        if arg is not None:
            objects.check_named(arg, saved(component), component, strict)


def _check_models(store: Store, manifest: Manifest, objs: TrainingObjects) -> None:
    """Each live model against its saved file's header (keys and shapes); frozen parameters left out are checked
    by the restore itself (:func:`ckptmgr.state.partial.check_frozen`).

    Raises:
        KeyMismatchError: a model's keys or shapes differ from the step's.
    """
    saved = saved_models(manifest)
    if saved is None:
        return
    single, live = as_models(objs.model)
    if single != saved[0]:
        return  # the restore raises the typed error naming both forms
    for name, module in live.items():
        file = saved[1].get(name)
        if file is None:
            continue  # the restore names the missing model
        report = check_state_dict(module, peek(store, manifest, file))
        frozen = frozen_record(manifest.components, None if single else name)
        if frozen:  # left out on purpose: checked against the record, not called missing
            report.missing_keys = [k for k in report.missing_keys if k not in frozen]
        if not report.ok:
            label = "the model" if single else f"model {name!r}"
            raise KeyMismatchError(f"step {manifest.step} does not match {label}; nothing was restored:\n"
                                   + report.summary(),
                                   "pass strict=False to load what matches (the rest keeps its values)")
