"""Handing weights on: one file in another format (``convert``), or a published, hash-named file (``publish``).

Training checkpoints hold optimizer state, RNG streams and a directory of
files; the people who receive weights want one file. These functions take any
checkpoint a loader can reach (a file, a manager or step directory, sharded
or not, a zoo name) and write its weights and meta through the one
single-file writer (:mod:`ckptmgr.format.checkpoint_file`), atomically.
``convert`` is :func:`ckptmgr.exporter.export` (which also writes the Hugging
Face layout of safetensors shards and an index) under its CLI name.
"""
from __future__ import annotations

import logging
import re
import shutil
import tempfile
from typing import Any, Union

import torch

from .describe import load_weights_and_meta
from .exporter import WEIGHT_SUFFIXES, Written, export, kind_for, layout_of, plain_meta
from .format.checkpoint_file import write_checkpoint_file
from .format.checksum import HashingReader
from .inventory import is_step_dir
from .io.access import atomic_write, open_store
from .io.store import Options
from .io.uri import join
from .state.cast import cast_floating, parse_dtype

logger = logging.getLogger(__name__)

__all__ = ["WEIGHT_SUFFIXES", "Written", "kind_for", "layout_of", "parse_dtype", "convert", "check_name", "publish",
           "publish_name"]

Dtype = Union[None, str, torch.dtype]


def convert(src: str, dst: str, *, force: bool = False, trust_pickle: bool = False,
            storage_options: Options = None, dtype: Dtype = None, max_shard_size: Any = None,
            include_optimizer: bool = False) -> Written:
    """Write the weights and meta of any checkpoint to one file, or to safetensors shards with an index.

    ``.pth`` <-> ``.safetensors``, a directory -> one file, anything -> the Hugging
    Face layout: see :func:`ckptmgr.exporter.export`, which does the work.

    Args:
        src: A file, manager or step directory, or any URI a loader handles.
        dst: The file to write (its ending picks the format, see :data:`WEIGHT_SUFFIXES`),
            or a directory name for shards and an index.
        force: Replace ``dst`` if it exists.
        trust_pickle: Allow pickle code when reading ``src`` (only for files you trust).
        storage_options: fsspec options for ``dst``.
        dtype: Cast floating-point tensors (``'bfloat16'``, ...).
        max_shard_size: Largest shard of a directory (``'5GB'``).
        include_optimizer: Export the optimizer state too.

    Returns:
        What was written.

    Raises:
        ValueError: ``dst`` has an unknown ending, or ``dtype``/``max_shard_size`` is invalid.
        CheckpointExistsError: ``dst`` exists and ``force`` is False.
    """
    return export(src, dst, dtype=dtype, max_shard_size=max_shard_size, include_optimizer=include_optimizer,
                  force=force, trust_pickle=trust_pickle, storage_options=storage_options)


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
            storage_options: Options = None, dtype: Dtype = None) -> Written:
    """Write weights and meta (no optimizer or other training state) as ``DST_DIR/NAME-<sha256[:8]>.pth``.

    The name follows torch.hub's convention, so ``load_checkpoint`` and
    ``torch.hub`` check the file's sha256 against it after every download.
    ``dtype`` (``'bfloat16'``, ...) casts the floating-point tensors first.

    Raises:
        ValueError: ``name`` has characters other than letters, digits, ``.``, ``_`` and ``-``, or
            ``dtype`` is not a floating-point dtype.
    """
    name = check_name(name or publish_name(src))
    cast = parse_dtype(dtype)
    weights, meta = load_weights_and_meta(src, trust_pickle)
    weights = cast_floating(weights, cast)
    with tempfile.TemporaryFile() as tmp:
        write_checkpoint_file(tmp, "torch", {"meta": plain_meta(meta), "state_dict": dict(weights)})
        tmp.flush()
        tmp.seek(0)
        entry = HashingReader(tmp, "sha256").finish()  # torch.hub's convention: sha256, whatever the manifests use
        final = join(dst_dir.rstrip("/") or dst_dir, f"{name}-{entry.digest[:8]}.pth")
        open_store(dst_dir, storage_options).makedirs()
        tmp.seek(0)
        with atomic_write(final, storage_options) as out:
            shutil.copyfileobj(tmp, out, 4 << 20)
    return Written(final, entry.size, len(weights), entry.digest)


