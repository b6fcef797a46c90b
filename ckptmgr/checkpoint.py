"""The OpenMMLab-style functional API: save_checkpoint, load_checkpoint, load_checkpoint_with_prefix.

A single-file checkpoint is ``{'meta': ..., 'state_dict': ..., 'optimizer': ...}``,
the layout OpenMMLab uses, written atomically to a local path or any fsspec URL.
Calls written for mmcv 1.x or mmengine run unchanged: ``save_checkpoint`` takes
either's calling convention and their storage arguments, loading functions take
their keywords (and refuse unknown ones, as theirs do), and the weights of an
mmengine Runner checkpoint load without ``trust_pickle`` (its pickled extras are
skipped, with a warning).
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .errors import CheckpointFormatError, KeyMismatchError, NoStateDictError, SaveArgumentError
from .format.checkpoint_file import kind_of, write_checkpoint_file
from .format.maplocation import MapLocation
from .format.pickled import skip_pickled
from .io.access import atomic_write
from .io.backend_args import apply_backend_args
from .loaders.calling import accepts_keyword, loader_keywords
from .loaders.registry import CheckpointLoader
from .state.keys import revise_keys as _revise_keys
from .state.keys import select_prefix, strip_compile_prefix, top_level_prefixes
from .state.modules import LoggerLike, get_state_dict, is_module_wrapper, load_state_dict, unwrap_model, weights_to_cpu
from .version import __version__

logger = logging.getLogger(__name__)

__all__ = ["save_checkpoint", "load_checkpoint", "load_checkpoint_with_prefix", "extract_state_dict"]

OptimizerArg = Union[None, torch.optim.Optimizer, Mapping[str, torch.optim.Optimizer]]
_BOTH_FORMS = ("save_checkpoint takes a module (mmcv form: save_checkpoint(model, filename, optimizer=None, "
               "meta=None)) or a checkpoint dict (mmengine form: save_checkpoint(checkpoint, filename))")


def _optimizer_state(optimizer: OptimizerArg) -> Any:
    if optimizer is None:
        return None
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer.state_dict()
    if isinstance(optimizer, Mapping) and all(isinstance(o, torch.optim.Optimizer) for o in optimizer.values()):
        return {str(name): opt.state_dict() for name, opt in optimizer.items()}
    raise SaveArgumentError(f"optimizer must be an Optimizer or a dict of name -> Optimizer, "
                            f"got {type(optimizer).__name__}", "pass optimizer=opt or optimizer={'name': opt}")


def _module_checkpoint(model: Any, optimizer: OptimizerArg, meta: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The mmcv 1.x layout: meta (with version, time, CLASSES), the bare model's weights, the optimizer."""
    if meta is None:
        meta = {}
    elif not isinstance(meta, dict):
        raise SaveArgumentError(f"meta must be a dict or None, but got {type(meta).__name__}", "pass meta={...}")
    meta = dict(meta, ckptmgr_version=__version__, time=time.asctime())
    classes = getattr(unwrap_model(model), "CLASSES", None)
    if classes is not None:
        meta.setdefault("CLASSES", classes)
    checkpoint: Dict[str, Any] = {"meta": meta, "state_dict": weights_to_cpu(get_state_dict(model))}
    opt_state = _optimizer_state(optimizer)
    if opt_state is not None:
        checkpoint["optimizer"] = opt_state
    return checkpoint


def _weights_key(checkpoint: Mapping[str, Any]) -> Optional[str]:
    """Where a checkpoint dict keeps the model weights: 'state_dict', '' (it is one), 'model', or None."""
    if isinstance(checkpoint.get("state_dict"), Mapping):
        return "state_dict"
    if checkpoint and _looks_like_state_dict(checkpoint):
        return ""
    inner = checkpoint.get("model")
    if isinstance(inner, Mapping) and inner and _looks_like_state_dict(inner):
        return "model"
    return None


def save_checkpoint(model: Any, filename: str, optimizer: OptimizerArg = None,
                    meta: Optional[Dict[str, Any]] = None, file_client_args: Optional[Mapping[str, Any]] = None,
                    backend_args: Optional[Mapping[str, Any]] = None, *,
                    storage_options: Optional[Dict[str, Any]] = None) -> None:
    """Save a model (mmcv 1.x form) or a checkpoint dict (mmengine form) to one file, atomically.

    The first argument's type decides the form:

    * a module (wrapped or not): ``save_checkpoint(model, filename, optimizer=None,
      meta=None)`` writes ``{'meta', 'state_dict', 'optimizer'}``; meta gains
      ``ckptmgr_version``, ``time`` and the model's ``CLASSES`` (when it has them);
      ``state_dict`` has the bare model's keys on the CPU;
    * a dict: ``save_checkpoint(checkpoint, filename)`` writes it as given (a bare
      state dict keeps its module versions), as mmengine's Runner does.

    A name ending in ``.safetensors`` writes safetensors (no pickle at all: the
    weights under their bare keys, readable by any safetensors tool, the rest in
    the header); anything else a ``torch.save`` file that loads with
    ``torch.load(weights_only=True)`` when it holds only tensors and plain values.

    Args:
        model: A module (mmcv form) or a checkpoint dict (mmengine form).
        filename: A local path (parents are created) or an fsspec URL.
        optimizer: (module form) An Optimizer, or a dict of name -> Optimizer.
        meta: (module form) Extra metadata (a dict).
        file_client_args: OpenMMLab storage arguments (mmcv 1.x, mmengine); see
            :mod:`ckptmgr.io.backend_args` for what they map to.
        backend_args: mmengine storage arguments, as ``file_client_args``.
        storage_options: fsspec options for URLs.

    Raises:
        SaveArgumentError: (a ``TypeError``) the first argument is neither a module nor a
            dict, a dict comes with ``optimizer``/``meta``, or ``meta``/``optimizer`` have the wrong type.
        BackendArgumentError: (a ``ValueError``) both storage arguments, or an unknown backend.
        UnserializableStateError: (safetensors) a value cannot be stored without pickle.
        StorageError: the destination cannot be written; any previous file is intact.
    """
    checkpoint: Mapping[str, Any]
    weights: Optional[str]
    if isinstance(model, nn.Module) or is_module_wrapper(model):
        checkpoint, weights = _module_checkpoint(model, optimizer, meta), "state_dict"
    elif isinstance(model, Mapping):
        if optimizer is not None or meta is not None:
            raise SaveArgumentError("save_checkpoint got a checkpoint dict together with optimizer/meta",
                                    "put the optimizer state and meta into the dict (mmengine form), or pass the "
                                    "model itself (mmcv form)")
        checkpoint, weights = model, _weights_key(model)
    else:
        raise SaveArgumentError(f"{_BOTH_FORMS}; got a {type(model).__name__} as the first argument",
                                "pass the model, or a dict such as {'state_dict': model.state_dict()}")
    filename, storage_options = apply_backend_args(str(filename), file_client_args, backend_args, storage_options)
    with atomic_write(filename, storage_options) as fh:
        write_checkpoint_file(fh, kind_of(filename), checkpoint, weights)


def extract_state_dict(checkpoint: Any, source: str = "checkpoint") -> "OrderedDict[str, Any]":
    """Find the model state dict inside a loaded checkpoint.

    Accepts ``{'state_dict': ...}``, ``{'model': ...}`` or a bare state dict;
    like OpenMMLab, a ``'state_dict'`` entry counts even when it is empty. A
    whole pickled ``nn.Module`` (``torch.save(model)``, loaded with
    ``trust_pickle=True``), alone or under those keys, gives its ``state_dict()``.

    Raises:
        NoStateDictError: nothing that looks like a state dict is there (a
            ``CheckpointFormatError``, and a ``RuntimeError`` as OpenMMLab raises).
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
        inner = checkpoint.get("state_dict")
        if isinstance(inner, Mapping):  # empty, or no tensors: a model without parameters
            return inner  # type: ignore[return-value]
        keys = ", ".join(map(str, list(checkpoint)[:10])) or "(empty)"
        raise NoStateDictError(f"No state_dict found in {source}; its top-level keys are: {keys}")
    raise NoStateDictError(f"No state_dict found in checkpoint file {source}: it holds a {type(checkpoint).__name__}")


def _looks_like_state_dict(mapping: Mapping[str, Any]) -> bool:
    return all(isinstance(k, str) for k in mapping) and any(isinstance(v, torch.Tensor) for v in mapping.values())


def _load_for_weights(filename: str, map_location: MapLocation, logger: LoggerLike, trust_pickle: bool,
                      storage_options: Optional[Dict[str, Any]], loader_kwargs: Dict[str, Any], caller: str) -> Any:
    """Load a checkpoint when only its weights are needed: parts that need pickle are skipped, with a warning."""
    loader_keywords(CheckpointLoader.get_loader(filename), loader_kwargs, caller)  # unknown keywords: TypeError
    with skip_pickled():
        return CheckpointLoader.load_checkpoint(filename, map_location, logger, trust_pickle=trust_pickle,
                                                storage_options=storage_options, **loader_kwargs)


def load_checkpoint(model: nn.Module, filename: str, map_location: MapLocation = None, strict: bool = False,
                    logger: LoggerLike = None,
                    revise_keys: Iterable[Tuple[str, str]] = ((r"^module\.", ""),), *,
                    trust_pickle: bool = False, storage_options: Optional[Dict[str, Any]] = None,
                    model_name: Optional[str] = None, **loader_kwargs: Any) -> Any:
    """Load a checkpoint from a path or URL into ``model``.

    Only the weights need to load safely: in a ``torch.save`` file whose other
    parts need pickle (an mmengine Runner's ``message_hub``, numpy values in
    ``meta``), those parts are left out of the returned checkpoint and named in
    one warning; no pickle code runs. ``trust_pickle=True`` loads everything.

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
        model_name: For a manager checkpoint saved with ``model={name: module, ...}``:
            which model to load (may be omitted when it holds one). For a file
            holding ``{name: state_dict, ...}``: the top-level key to load.
        **loader_kwargs: Options the scheme's loader declares (e.g. ``check_hash=False``
            for http and zoo URLs).

    Returns:
        The loaded checkpoint (usually a dict).

    Raises:
        NoStateDictError: the file holds no state dict.
        CheckpointFormatError: no model ``model_name`` (the message lists the names there are).
        KeyMismatchError: ``strict`` and the keys do not match; or, even without
            ``strict``, no key matches at all (a load that loads nothing is a mistake).
        UnsafeCheckpointError: the weights need pickle and ``trust_pickle`` is False.
        UnexpectedKeywordError: (a ``TypeError``) a keyword neither this function nor the loader takes.
    """
    if model_name is not None and accepts_keyword(CheckpointLoader.get_loader(filename), "model_name"):
        loader_kwargs["model_name"] = model_name  # a manager directory's loader picks the model's file
    checkpoint = _load_for_weights(filename, map_location, logger, trust_pickle, storage_options, loader_kwargs,
                                   "load_checkpoint")
    state_dict = _revise_keys(strip_compile_prefix(extract_state_dict(
        _select_model(checkpoint, model_name, str(filename)), str(filename))), revise_keys)
    report = load_state_dict(model, state_dict, strict=strict, logger=logger)
    if report.loaded == 0 and report.expected and state_dict:
        theirs = ", ".join(top_level_prefixes(state_dict)[:5])
        ours = ", ".join(top_level_prefixes(get_state_dict(model))[:5])
        raise KeyMismatchError(f"none of the {len(state_dict)} entries of {filename} matches the model, so nothing "
                               f"was loaded; the checkpoint's keys start with {theirs}, the model's with {ours}",
                               "rename the checkpoint's keys with revise_keys=[(r'^prefix\\.', '')], or take a "
                               "part with load_checkpoint_with_prefix('prefix', ...)")
    return checkpoint


def _select_model(checkpoint: Any, model_name: Optional[str], source: str) -> Any:
    """The part of ``checkpoint`` holding model ``model_name`` (a manager's loader chose it already).

    Raises:
        CheckpointFormatError: the checkpoint has no such top-level key.
    """
    if model_name is None or not isinstance(checkpoint, Mapping) or checkpoint.get("model_name") == model_name:
        return checkpoint
    inner = checkpoint.get(model_name)
    if isinstance(inner, Mapping):
        return inner
    keys = sorted(str(k) for k in checkpoint)
    raise CheckpointFormatError(f"{source} has no model named {model_name!r}; its top-level keys are {keys}",
                                "pass model_name= one of them, or none for a single-model checkpoint")


def load_checkpoint_with_prefix(prefix: str, filename: str, map_location: MapLocation = None, *,
                                trust_pickle: bool = False, storage_options: Optional[Dict[str, Any]] = None,
                                **loader_kwargs: Any) -> "OrderedDict[str, Any]":
    """Return the part of a checkpoint's state dict under ``prefix`` (the prefix removed).

    Parts of the file other than the weights that need pickle are skipped, as in
    :func:`load_checkpoint`.

    Args:
        prefix: A key prefix such as ``'backbone'`` (the trailing dot is optional).
        filename: As for :func:`load_checkpoint`.
        map_location: As for ``torch.load``.
        trust_pickle: Allow arbitrary pickle code (only for trusted files).
        storage_options: fsspec options for URLs.
        **loader_kwargs: Options the scheme's loader declares.

    Returns:
        The entries under ``prefix``, with their module versions.

    Raises:
        PrefixNotFoundError: no key has the prefix (also an ``AssertionError``, as OpenMMLab
            raises); the message lists the top-level prefixes.
        UnexpectedKeywordError: (a ``TypeError``) a keyword neither this function nor the loader takes.
    """
    checkpoint = _load_for_weights(filename, map_location, None, trust_pickle, storage_options, loader_kwargs,
                                   "load_checkpoint_with_prefix")
    return select_prefix(strip_compile_prefix(extract_state_dict(checkpoint, str(filename))), prefix)
