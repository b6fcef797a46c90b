"""Training objects <-> plain state trees, both ways, without I/O.

A checkpoint must hold everything a run needs to continue bit for bit: weights,
optimizers, schedulers, the grad scaler, RNG streams and the user's own state.
This module turns those objects into trees that :mod:`ckptmgr.format` can
store without pickle (dicts, lists, numbers, strings, tensors) and puts such
trees back into live objects. The step layer decides where the trees go.
"""
from __future__ import annotations

import logging
import math
import operator
import random
import sys
import time
from collections import OrderedDict
from datetime import datetime, timezone
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch

from ..errors import UnserializableStateError
from ..format.skeleton import to_skeleton
from ..version import __version__
from .fit import check_saved, class_name
from .modules import get_state_dict, load_state_dict

logger = logging.getLogger(__name__)

__all__ = [
    "as_named", "stateful", "named_state", "check_named", "apply_named", "model_state", "apply_model",
    "extra_state", "apply_extra", "plain", "rng_state", "apply_rng", "clean_metrics", "build_meta", "check_index",
]

# --------------------------------------------------------------------------- named groups


def stateful(obj: Any) -> bool:
    """True when ``obj`` has callable ``state_dict`` and ``load_state_dict``."""
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def as_named(arg: Any, what: str) -> Optional[Tuple[bool, Dict[str, Any]]]:
    """Normalise "one object or a dict name -> object" to ``(single, {name: object})``.

    Raises:
        TypeError: ``arg`` is neither a stateful object nor a dict of them.
    """
    if arg is None:
        return None
    if stateful(arg):
        return True, {what: arg}
    if isinstance(arg, Mapping) and arg and all(isinstance(k, str) and stateful(v) for k, v in arg.items()):
        return False, dict(arg)
    raise TypeError(f"{what} must be an object with state_dict()/load_state_dict() or a non-empty dict of "
                    f"str -> such objects, got {type(arg).__name__}")


def named_state(arg: Any, what: str, prune: bool = False) -> Optional[Dict[str, Any]]:
    """State of one object or a dict of them, as ``{'single': bool, 'states': {name: state_dict}, 'classes': ...}``.

    ``classes`` maps each name to the object's class name, so a restore can
    refuse another class before it changes anything (:mod:`ckptmgr.state.fit`).

    Args:
        arg: An optimizer/scheduler/scaler, or a dict name -> object.
        what: Component name, used as the name of a single object and in messages.
        prune: Drop values that cannot be stored without pickle (with a warning)
            instead of failing; used for schedulers, whose state can hold user functions.
    """
    named = as_named(arg, what)
    if named is None:
        return None
    single, objs = named
    states = {}
    for name, obj in objs.items():
        state = obj.state_dict()
        states[name] = _prune(state, f"{what}[{name}]") if prune else state
    return {"single": single, "states": states, "classes": {name: class_name(obj) for name, obj in objs.items()}}


def _storable(value: Any) -> bool:
    try:
        to_skeleton(value)
    except UnserializableStateError:
        return False
    return True


def _prune(node: Any, path: str) -> Any:
    """Drop dict entries (and null list items) that cannot be stored without pickle.

    A LambdaLR's state holds None for plain functions and the ``__dict__`` of
    callable objects, which may hold anything; its ``load_state_dict`` copes
    with missing keys and None items, and the lambdas themselves are code the
    caller recreates anyway.
    """
    if isinstance(node, Mapping):
        out = OrderedDict()
        for key, value in node.items():
            if isinstance(value, (Mapping, list)) or _storable(value):
                out[key] = _prune(value, f"{path}.{key}")
            else:
                logger.warning("not saving %s.%s (a %s cannot be stored without pickle)",
                               path, key, type(value).__name__)
        return out
    if isinstance(node, list):
        return [_prune(v, f"{path}.{i}") if isinstance(v, (Mapping, list)) or _storable(v) else None
                for i, v in enumerate(node)]
    return node


def _load(obj: Any, state: Any) -> None:
    obj.load_state_dict(state)


def check_named(arg: Any, saved: Optional[Mapping[str, Any]], what: str, strict: bool) -> bool:
    """Check, without changing anything, that saved states fit one object or a dict of them.

    Returns:
        True when there is something to load (``arg`` given and state saved).

    Raises:
        CheckpointFormatError: see :func:`ckptmgr.state.fit.check_saved`.
    """
    named = as_named(arg, what)
    if named is None:
        return False
    return check_saved(named[0], named[1], saved, what, strict)


def apply_named(arg: Any, saved: Optional[Mapping[str, Any]], what: str, strict: bool,
                load: Callable[[Any, Any], None] = _load) -> None:
    """Load saved states into one object or a dict of them, per name (after :func:`check_named`).

    ``load(obj, state)`` loads each (a ZeRO optimizer needs a copy).

    Raises:
        CheckpointFormatError: nothing was saved for ``what`` (with ``strict``), a
            requested name is missing, single/dict shapes differ, or the state is
            of another class.
    """
    if not check_named(arg, saved, what, strict):
        if arg is not None and saved is None:
            logger.warning("the checkpoint holds no %s state; %s left as it is", what, what)
        return
    _, objs = as_named(arg, what)  # type: ignore[misc]
    states = saved["states"]  # type: ignore[index]
    for name, obj in objs.items():
        load(obj, states[name])


# --------------------------------------------------------------------------- model


def model_state(model: torch.nn.Module) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The bare model's state dict and its module metadata (versions), for JSON."""
    state = get_state_dict(model)
    meta = {k: dict(v) for k, v in getattr(state, "_metadata", {}).items() if isinstance(v, Mapping)}
    return state, meta


def apply_model(model: torch.nn.Module, state: Mapping[str, Any], module_meta: Optional[Mapping[str, Any]],
                strict: bool) -> Any:
    """Load weights into ``model`` (wrapped or not); returns the LoadReport.

    Raises:
        KeyMismatchError: ``strict`` and keys or shapes differ.
    """
    state = OrderedDict(state)
    if module_meta:
        state._metadata = OrderedDict(module_meta)  # type: ignore[attr-defined]
    return load_state_dict(model, state, strict=strict, logger="silent" if not strict else None)


# --------------------------------------------------------------------------- extra


def extra_state(extra: Optional[Mapping[str, Any]]) -> Optional[Dict[str, Any]]:
    """User state: JSON-like values as they are, stateful objects as their state_dict().

    Raises:
        TypeError: ``extra`` is not a dict with string keys.
        UnserializableStateError: a value cannot be stored without pickle.
    """
    if extra is None:
        return None
    if not isinstance(extra, Mapping) or not all(isinstance(k, str) for k in extra):
        raise TypeError(f"extra must be a dict with str keys, got {type(extra).__name__}")
    out: Dict[str, Any] = {}
    for key, value in extra.items():
        if stateful(value):
            out[key] = {"kind": "stateful", "value": value.state_dict()}
        else:
            to_skeleton(value, path=f"extra.{key}")  # fail now, with the key in the message
            out[key] = {"kind": "value", "value": value}
    return out


def apply_extra(extra: Optional[Mapping[str, Any]], saved: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """Restore user state; returns the restored values.

    Objects in ``extra`` with ``load_state_dict`` get their saved state loaded
    (and are returned as themselves); plain values are returned as saved.
    """
    out: Dict[str, Any] = {}
    for key, entry in (saved or {}).items():
        target = (extra or {}).get(key)
        if entry.get("kind") == "stateful" and target is not None and stateful(target):
            target.load_state_dict(entry["value"])
            out[key] = target
        else:
            out[key] = plain(entry.get("value"))
    return out


def plain(value: Any) -> Any:
    """Nested OrderedDicts (what skeletons decode to) as plain dicts, for values handed back to users."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


# --------------------------------------------------------------------------- RNG


def rng_state(distributed: bool) -> Dict[str, Any]:
    """RNG state of Python ``random``, NumPy's global generator, torch CPU and CUDA.

    CUDA state is saved only when CUDA is already initialised (never initialise
    it just to save): every device for a single process (DataParallel), only
    the current device for a distributed rank.
    """
    state: Dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        state["numpy"] = numpy.random.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        if distributed:
            device = torch.cuda.current_device()
            state["cuda"] = {"devices": [device], "states": [torch.cuda.get_rng_state(device)]}
        else:
            states = torch.cuda.get_rng_state_all()
            state["cuda"] = {"devices": list(range(len(states))), "states": states}
    return state


def apply_rng(state: Mapping[str, Any]) -> None:
    """Put saved RNG streams back (CUDA only for devices this process has)."""
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        import numpy
        numpy.random.set_state(tuple(state["numpy"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        count = torch.cuda.device_count()
        for device, rng in zip(cuda["devices"], cuda["states"]):
            if device < count:
                torch.cuda.set_rng_state(rng.cpu(), device)
            else:
                logger.warning("no CUDA device %d here; its saved RNG state is not restored", device)


# --------------------------------------------------------------------------- metrics and meta


def clean_metrics(metrics: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """Metrics as strict JSON: tensors and numpy scalars become numbers, NaN/inf become None.

    Raises:
        TypeError: not a dict with str keys.
        UnserializableStateError: a value is not a scalar (the message names the metric).
    """
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping) or not all(isinstance(k, str) for k in metrics):
        raise TypeError(f"metrics must be a dict with str keys, got {type(metrics).__name__}")
    out: Dict[str, Any] = {}
    for key, value in metrics.items():
        size = getattr(value, "size", None) if not isinstance(value, torch.Tensor) else value.numel()
        if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
            if isinstance(size, int) and size != 1:
                raise UnserializableStateError(f"metric {key!r} must be one number, got a "
                                               f"{type(value).__name__} of {size} elements",
                                               "pass a scalar, e.g. value.mean().item()")
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            logger.warning("metric %s is %r; stored as null (it never counts as best)", key, value)
            value = None
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise UnserializableStateError(f"metric {key!r} must be a number or string, got {type(value).__name__}",
                                           "pass a number (e.g. loss.item()) or a string")
        out[key] = value
    return out


def build_meta(user_meta: Optional[Mapping[str, Any]], step: int, world_size: int) -> Dict[str, Any]:
    """What meta.json holds: versions, time, world size, and the user's meta under ``'user'``.

    Raises:
        TypeError: ``user_meta`` is not a dict.
        UnserializableStateError: it holds something that needs pickle.
    """
    if user_meta is not None and not isinstance(user_meta, Mapping):
        raise TypeError(f"meta must be a dict or None, got {type(user_meta).__name__}")
    user = dict(user_meta or {})
    to_skeleton(user, path="meta")
    return {
        "step": step, "ckptmgr_version": __version__, "torch_version": torch.__version__,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "unix_time": time.time(),
        "world_size": world_size, "user": user,
    }


# --------------------------------------------------------------------------- validation and collection


def check_index(name: str, value: Any) -> int:
    """``value`` as an int >= 0 (steps, epochs).

    Raises:
        TypeError: not an integer (bools included).
        ValueError: negative.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got a bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value
