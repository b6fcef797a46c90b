"""The OpenMMLab-style functional API: save_checkpoint, load_checkpoint, load_checkpoint_with_prefix.

A single-file checkpoint is ``{'meta': ..., 'state_dict': ..., 'optimizer': ...}``,
the layout OpenMMLab uses, written atomically to a local path or any fsspec URL.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .errors import CheckpointFormatError, KeyMismatchError
from .format.checkpoint_file import kind_of, write_checkpoint_file
from .format.maplocation import MapLocation
from .io.access import atomic_write
from .loaders.registry import CheckpointLoader
from .state.keys import revise_keys as _revise_keys
from .state.keys import select_prefix, strip_compile_prefix, top_level_prefixes
from .state.modules import LoggerLike, get_state_dict, load_state_dict, unwrap_model, weights_to_cpu
from .version import __version__

logger = logging.getLogger(__name__)

__all__ = ["save_checkpoint", "load_checkpoint", "load_checkpoint_with_prefix", "extract_state_dict"]

OptimizerArg = Union[None, torch.optim.Optimizer, Mapping[str, torch.optim.Optimizer]]


def _optimizer_state(optimizer: OptimizerArg) -> Any:
    if optimizer is None:
        return None
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer.state_dict()
    if isinstance(optimizer, Mapping) and all(isinstance(o, torch.optim.Optimizer) for o in optimizer.values()):
        return {str(name): opt.state_dict() for name, opt in optimizer.items()}
    raise TypeError(f"optimizer must be an Optimizer or a dict of name -> Optimizer, got {type(optimizer).__name__}")


def save_checkpoint(model: nn.Module, filename: str, optimizer: OptimizerArg = None,
                    meta: Optional[Dict[str, Any]] = None, *,
                    storage_options: Optional[Dict[str, Any]] = None) -> None:
    """Save model weights (and optimizer state) to one file, atomically.

    The file holds ``{'meta', 'state_dict', 'optimizer'}``: meta gains
    ``ckptmgr_version``, ``time`` and the model's ``CLASSES`` (when it has
    them); ``state_dict`` has the bare model's keys on the CPU. A name ending
    in ``.safetensors`` writes safetensors (no pickle at all: the weights under
    their bare keys, readable by any safetensors tool, the rest in the header);
    anything else a ``torch.save`` file that loads with ``torch.load(weights_only=True)``.

    Args:
        model: The model, wrapped or not.
        filename: A local path (parents are created) or an fsspec URL.
        optimizer: An Optimizer, or a dict of name -> Optimizer.
        meta: Extra metadata (a dict).
        storage_options: fsspec options for URLs.

    Raises:
        TypeError: ``meta`` is not a dict or ``optimizer`` has the wrong type.
        StorageError: the destination cannot be written; any previous file is intact.
    """
    if meta is None:
        meta = {}
    elif not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict or None, but got {type(meta).__name__}")
    meta = dict(meta, ckptmgr_version=__version__, time=time.asctime())
    classes = getattr(unwrap_model(model), "CLASSES", None)
    if classes is not None:
        meta.setdefault("CLASSES", classes)
    checkpoint: Dict[str, Any] = {"meta": meta, "state_dict": weights_to_cpu(get_state_dict(model))}
    opt_state = _optimizer_state(optimizer)
    if opt_state is not None:
        checkpoint["optimizer"] = opt_state
    with atomic_write(str(filename), storage_options) as fh:
        write_checkpoint_file(fh, kind_of(str(filename)), checkpoint)


def extract_state_dict(checkpoint: Any, source: str = "checkpoint") -> "OrderedDict[str, Any]":
    """Find the model state dict inside a loaded checkpoint.

    Accepts ``{'state_dict': ...}``, ``{'model': ...}`` or a bare state dict, and
    a whole pickled ``nn.Module`` (``torch.save(model)``, loaded with
    ``trust_pickle=True``), alone or under those keys: its ``state_dict()``.

    Raises:
        CheckpointFormatError: nothing that looks like a state dict is there.
    """
    if isinstance(checkpoint, nn.Module):
        return get_state_dict(checkpoint)  # type: ignore[return-value]
    if isinstance(checkpoint, Mapping):
        for key in ("state_dict", "model"):
            inner = checkpoint.get(key)
            if isinstance(inner, nn.Module):
                return get_state_dict(inner)  # type: ignore[return-value]
            if isinstance(inner, Mapping) and _looks_like_state_dict(inner):
                return inner  # type: ignore[return-value]
        if checkpoint and _looks_like_state_dict(checkpoint):
            return checkpoint  # type: ignore[return-value]
        keys = ", ".join(map(str, list(checkpoint)[:10])) or "(empty)"
        raise CheckpointFormatError(f"no state_dict found in {source}; its top-level keys are: {keys}",
                                    "pass a file holding model weights, or a dict with a 'state_dict' key")
    raise CheckpointFormatError(f"no state_dict found in {source}: it holds a {type(checkpoint).__name__}")


def _looks_like_state_dict(mapping: Mapping[str, Any]) -> bool:
    return all(isinstance(k, str) for k in mapping) and any(isinstance(v, torch.Tensor) for v in mapping.values())


def load_checkpoint(model: nn.Module, filename: str, map_location: MapLocation = None, strict: bool = False,
                    logger: LoggerLike = None,
                    revise_keys: Iterable[Tuple[str, str]] = ((r"^module\.", ""),), *,
                    trust_pickle: bool = False,
                    storage_options: Optional[Dict[str, Any]] = None, **loader_kwargs: Any) -> Any:
    """Load a checkpoint from a path or URL into ``model``.

    Args:
        model: Target module (wrapped or not).
        filename: Local path, ``file://``, any fsspec URL, ``http(s)://``, a
            model-zoo URI, a registered scheme, or a CheckpointManager directory
            (the latest step) / step directory.
        map_location: As for ``torch.load``.
        strict: Raise on missing/unexpected/mis-shaped keys.
        logger: Logger for mismatch warnings (``'silent'`` for none).
        revise_keys: ``(regex, replacement)`` rules applied in order to the keys
            (default strips a DDP ``module.`` prefix). ``torch.compile``'s
            ``_orig_mod.`` is removed before them, whatever the rules.
        trust_pickle: Allow arbitrary pickle code (only for trusted files).
        storage_options: fsspec options for URLs.
        **loader_kwargs: Options for the scheme's loader, passed on when it accepts
            them (e.g. ``check_hash=False`` for http and zoo URLs).

    Returns:
        The loaded checkpoint (usually a dict).

    Raises:
        CheckpointFormatError: the file holds no state dict.
        KeyMismatchError: ``strict`` and the keys do not match; or, even without
            ``strict``, no key matches at all (a load that loads nothing is a mistake).
        UnsafeCheckpointError: the file needs pickle and ``trust_pickle`` is False.
    """
    checkpoint = CheckpointLoader.load_checkpoint(filename, map_location, logger, trust_pickle=trust_pickle,
                                                  storage_options=storage_options, **loader_kwargs)
    state_dict = _revise_keys(strip_compile_prefix(extract_state_dict(checkpoint, str(filename))), revise_keys)
    report = load_state_dict(model, state_dict, strict=strict, logger=logger)
    if report.loaded == 0 and report.expected and state_dict:
        theirs = ", ".join(top_level_prefixes(state_dict)[:5])
        ours = ", ".join(top_level_prefixes(get_state_dict(model))[:5])
        raise KeyMismatchError(f"none of the {len(state_dict)} entries of {filename} matches the model, so nothing "
                               f"was loaded; the checkpoint's keys start with {theirs}, the model's with {ours}",
                               "rename the checkpoint's keys with revise_keys=[(r'^prefix\\.', '')], or take a "
                               "part with load_checkpoint_with_prefix('prefix', ...)")
    return checkpoint


def load_checkpoint_with_prefix(prefix: str, filename: str, map_location: MapLocation = None, *,
                                trust_pickle: bool = False, storage_options: Optional[Dict[str, Any]] = None,
                                **loader_kwargs: Any) -> "OrderedDict[str, Any]":
    """Return the part of a checkpoint's state dict under ``prefix`` (the prefix removed).

    Raises:
        CheckpointFormatError: no key has the prefix; the message lists the top-level prefixes.
    """
    checkpoint = CheckpointLoader.load_checkpoint(filename, map_location, trust_pickle=trust_pickle,
                                                  storage_options=storage_options, **loader_kwargs)
    return select_prefix(strip_compile_prefix(extract_state_dict(checkpoint, str(filename))), prefix)
