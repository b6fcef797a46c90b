"""Handing weights on: one file in another format (``convert``), or a published, hash-named file (``publish``).

Training checkpoints hold optimizer state, RNG streams and a directory of
files; the people who receive weights want one file. These functions take any
checkpoint a loader can reach (a file, a manager or step directory, sharded
or not, a zoo name) and write its weights and meta through the one
single-file writer (:mod:`ckptmgr.format.checkpoint_file`), atomically.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, Mapping

from .describe import jsonable, load_weights_and_meta
from .errors import CheckpointExistsError, UnserializableStateError
from .format.checkpoint_file import write_checkpoint_file
from .format.checksum import HashingReader
from .format.skeleton import to_skeleton
from .inventory import is_step_dir
from .io.access import atomic_write, open_store
from .io.store import Options
from .io.uri import join

logger = logging.getLogger(__name__)

__all__ = ["WEIGHT_SUFFIXES", "Written", "kind_for", "convert", "check_name", "publish", "publish_name"]

#: Destination endings and the format each writes.
WEIGHT_SUFFIXES = {".safetensors": "safetensors", ".pth": "torch", ".pt": "torch", ".bin": "torch", ".ckpt": "torch"}


@dataclass
class Written:
    """A file :func:`convert` or :func:`publish` wrote."""

    path: str
    size: int
    entries: int
    sha256: str = ""


def _plain_meta(meta: Mapping[str, Any]) -> Dict[str, Any]:
    """Meta that any loader can read back without pickle (JSON values only)."""
    return json.loads(json.dumps(jsonable(meta)))


def _storable(weights: Mapping[str, Any]) -> Dict[str, Any]:
    """The entries a safetensors file can hold (tensors, and values JSON can carry); the rest dropped with a warning."""
    kept, dropped = {}, []
    for key, value in weights.items():
        try:
            to_skeleton(value)
        except UnserializableStateError:
            dropped.append(key)
            continue
        kept[key] = value
    if dropped:
        logger.warning("safetensors holds tensors and plain values only; not converted: %s", ", ".join(dropped))
    return kept


def _checkpoint(weights: Mapping[str, Any], meta: Mapping[str, Any], kind: str) -> Dict[str, Any]:
    state = _storable(weights) if kind == "safetensors" else dict(weights)
    return {"meta": _plain_meta(meta), "state_dict": state}


def kind_for(dst: str) -> str:
    """The format a destination name asks for.

    Raises:
        ValueError: the name ends in none of :data:`WEIGHT_SUFFIXES`.
    """
    for suffix, kind in WEIGHT_SUFFIXES.items():
        if dst.endswith(suffix):
            return kind
    raise ValueError(f"{dst}: the destination must end in {', '.join(WEIGHT_SUFFIXES)}")


def convert(src: str, dst: str, *, force: bool = False, trust_pickle: bool = False,
            storage_options: Options = None) -> Written:
    """Write the weights and meta of any checkpoint to one file (``.pth`` <-> ``.safetensors``, directory -> file).

    Args:
        src: A file, manager or step directory, or any URI a loader handles.
        dst: The file to write; its ending picks the format (see :data:`WEIGHT_SUFFIXES`).
        force: Replace ``dst`` if it exists.
        trust_pickle: Allow pickle code when reading ``src`` (only for files you trust).
        storage_options: fsspec options for ``dst``.

    Returns:
        What was written.

    Raises:
        ValueError: ``dst`` has an unknown ending.
        CheckpointExistsError: ``dst`` exists and ``force`` is False.
    """
    kind = kind_for(dst)
    out = open_store(dst, storage_options)
    if out.exists() and not force:
        raise CheckpointExistsError(f"{dst} exists", "pass force=True (--force) to replace it")
    weights, meta = load_weights_and_meta(src, trust_pickle)
    with out.atomic_write() as fh:
        write_checkpoint_file(fh, kind, _checkpoint(weights, meta, kind))
    return Written(dst, out.size(), len(weights))


def publish_name(src: str) -> str:
    """The default name stem for publishing ``src`` (a directory's name, a file's stem; an old hash dropped)."""
    trimmed = src.rstrip("/")
    base = trimmed.rsplit("/", 1)[-1]
    if is_step_dir(trimmed):
        base = f"{trimmed.rsplit('/', 2)[-2]}-{base}"
    stem = base.split(".", 1)[0] if "://" not in base else base
    return re.sub(r"-[0-9a-f]{8,64}$", "", stem)  # republishing drops the old hash


def check_name(name: str) -> str:
    """``name`` when it is a valid file name stem for :func:`publish`.

    Raises:
        ValueError: it has characters other than letters, digits, ``.``, ``_`` and ``-``.
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ValueError(f"name {name!r}: use letters, digits, '.', '_' and '-' only")
    return name


def publish(src: str, dst_dir: str, *, name: str = "", trust_pickle: bool = False,
            storage_options: Options = None) -> Written:
    """Write weights and meta (no optimizer or other training state) as ``DST_DIR/NAME-<sha256[:8]>.pth``.

    The name follows torch.hub's convention, so ``load_checkpoint`` and
    ``torch.hub`` check the file's sha256 against it after every download.

    Raises:
        ValueError: ``name`` has characters other than letters, digits, ``.``, ``_`` and ``-``.
    """
    name = check_name(name or publish_name(src))
    weights, meta = load_weights_and_meta(src, trust_pickle)
    with tempfile.TemporaryFile() as tmp:
        write_checkpoint_file(tmp, "torch", _checkpoint(weights, meta, "torch"))
        tmp.flush()
        tmp.seek(0)
        entry = HashingReader(tmp, "sha256").finish()  # torch.hub's convention: sha256, whatever the manifests use
        final = join(dst_dir.rstrip("/") or dst_dir, f"{name}-{entry.digest[:8]}.pth")
        open_store(dst_dir, storage_options).makedirs()
        tmp.seek(0)
        with atomic_write(final, storage_options) as out:
            shutil.copyfileobj(tmp, out, 4 << 20)
    return Written(final, entry.size, len(weights), entry.digest)


