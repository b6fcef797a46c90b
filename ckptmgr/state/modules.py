"""Module wrappers, clean state dicts, and loading that reports instead of crashing.

Training code wraps models in DistributedDataParallel, DataParallel,
``torch.compile`` or accelerate's ``prepare``; each wrapper adds a prefix such
as ``module.`` or ``_orig_mod.`` to every key. Checkpoints should not depend on
how a model happened to be wrapped, so :func:`get_state_dict` produces the keys
of the bare model (wrappers nested anywhere in the tree are collapsed), and
:func:`load_state_dict` maps clean keys back onto whatever wrappers are present.
"""
from __future__ import annotations

import logging
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .. import distributed as dist
from ..errors import KeyMismatchError
from .openmmlab import upstream_wrapper_classes

logger = logging.getLogger(__name__)

__all__ = [
    "register_module_wrapper", "is_module_wrapper", "unwrap_model",
    "get_state_dict", "load_state_dict", "check_state_dict", "weights_to_cpu", "LoadReport",
]

# wrapper class -> name of the attribute holding the wrapped module
_WRAPPERS: Dict[type, str] = {}


def register_module_wrapper(cls: Optional[type] = None, attr: str = "module", *,
                            force: bool = False) -> Any:
    """Register a module wrapper class whose real model lives in ``getattr(wrapper, attr)``.

    Usable as a call (``register_module_wrapper(MyWrapper)``) or as a decorator
    (``@register_module_wrapper`` or ``@register_module_wrapper(attr='inner')``).
    Any class counts, ``nn.Module`` or not, as in OpenMMLab's wrapper
    registries. Classes registered in mmengine's ``MODEL_WRAPPERS`` or mmcv's
    ``MODULE_WRAPPERS`` are recognised without this call (when that package is
    already imported).

    Args:
        cls: The wrapper class.
        attr: Attribute under which the wrapper keeps the wrapped module.
        force: Replace an existing registration with a different ``attr``.

    Returns:
        ``cls`` (so it works as a decorator), or a decorator when ``cls`` is None.

    Raises:
        TypeError: ``cls`` is not a class.
        KeyError: ``cls`` is already registered with another attribute and not ``force``.
    """
    if cls is None:
        return lambda c: register_module_wrapper(c, attr, force=force)
    if not isinstance(cls, type):
        raise TypeError(f"register_module_wrapper takes a class, got {cls!r}")
    if _WRAPPERS.get(cls, attr) != attr and not force:
        raise KeyError(f"{cls.__name__} is already registered as a wrapper of '{_WRAPPERS[cls]}'; pass force=True")
    _WRAPPERS[cls] = attr
    return cls


register_module_wrapper(nn.DataParallel, "module")
register_module_wrapper(nn.parallel.DistributedDataParallel, "module")


def _register_compile_wrapper() -> None:
    # torch.compile's OptimizedModule lives in torch._dynamo, which costs ~1.5 s to
    # import. A compiled model can only exist once dynamo is imported, so we look
    # for the module in sys.modules instead of importing it ourselves.
    module = sys.modules.get("torch._dynamo.eval_frame")
    cls = getattr(module, "OptimizedModule", None)
    if cls is not None and cls not in _WRAPPERS:
        _WRAPPERS[cls] = "_orig_mod"


def _wrapper_attr(obj: Any) -> Optional[str]:
    _register_compile_wrapper()
    for cls in type(obj).__mro__:
        if cls in _WRAPPERS:
            return _WRAPPERS[cls]
    upstream = upstream_wrapper_classes()
    if upstream and isinstance(obj, upstream) and hasattr(obj, "module"):
        return "module"
    return None


def is_module_wrapper(obj: Any) -> bool:
    """Return True when ``obj`` is an instance of a registered module wrapper (subclasses included).

    Registered means :func:`register_module_wrapper`, or mmengine's
    ``MODEL_WRAPPERS`` / mmcv's ``MODULE_WRAPPERS`` (child registries included)
    when that package is imported already.
    """
    return _wrapper_attr(obj) is not None


def unwrap_model(model: Any) -> Any:
    """Peel every registered wrapper off ``model``, in any order and depth.

    accelerate's ``prepare`` wraps with DDP / DataParallel / ``torch.compile``
    (all registered here); models wrapped by engines such as DeepSpeed are
    unwrapped through ``accelerate.utils.extract_model_from_parallel`` when
    accelerate is imported already (we never import it just for this).

    Args:
        model: A module, possibly wrapped several times.

    Returns:
        The innermost module.
    """
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        attr = _wrapper_attr(model)
        if attr is not None:
            model = getattr(model, attr)
            continue
        model = _unwrap_with_accelerate(model)
    return model


def _unwrap_with_accelerate(model: Any) -> Any:
    import sys
    if "accelerate" not in sys.modules or not isinstance(model, nn.Module):
        return model
    try:
        from accelerate.utils import extract_model_from_parallel
    except ImportError:  # pragma: no cover
        return model
    try:
        return extract_model_from_parallel(model, keep_fp32_wrapper=True)
    except Exception:  # an engine accelerate cannot unwrap: keep what we have
        return model


def _wrapper_prefixes(module: nn.Module) -> List[Tuple[str, str]]:
    """(wrapped prefix, clean prefix) pairs for every wrapper inside ``module``, deepest first."""
    pairs = []
    for name, sub in module.named_modules(remove_duplicate=False):
        attr = _wrapper_attr(sub)
        if attr is not None and name:
            pairs.append((f"{name}.{attr}.", f"{name}."))
    pairs.sort(key=lambda p: p[0].count("."), reverse=True)
    return pairs


def _clean_key(key: str, pairs: List[Tuple[str, str]]) -> str:
    # Compare with a trailing dot so metadata keys (prefixes without the dot) are rewritten too.
    probe = key + "."
    for wrapped, clean in pairs:
        if probe.startswith(wrapped):
            probe = clean + probe[len(wrapped):]
    return probe[:-1]


def get_state_dict(module: nn.Module, destination: Optional[Dict[str, Any]] = None,
                   prefix: str = "", keep_vars: bool = False) -> Dict[str, Any]:
    """Return the state dict of the bare model, whatever wrappers it is in.

    Keys and values equal ``unwrap_model(module).state_dict()`` with wrappers
    nested inside the model collapsed as well; non-persistent buffers are
    excluded, state-dict hooks run, and ``_metadata`` (module versions) is kept
    so version upgrades in ``_load_from_state_dict`` work on load.

    Args:
        module: A module or wrapped module.
        destination: A dict to add the entries to (a new OrderedDict when None).
        prefix: Prefix for every key (e.g. ``'backbone.'``).
        keep_vars: Keep Parameters instead of detached tensors.

    Returns:
        ``destination`` holding the clean entries and ``_metadata``.
    """
    inner = unwrap_model(module)
    raw = inner.state_dict(keep_vars=keep_vars)
    pairs = _wrapper_prefixes(inner)
    if destination is None:
        destination = OrderedDict()
    meta = getattr(destination, "_metadata", None)
    if meta is None:
        meta = OrderedDict()
        try:
            destination._metadata = meta  # type: ignore[attr-defined]
        except AttributeError:  # a plain dict subclass without attributes
            pass
    for key, value in raw.items():
        destination[prefix + _clean_key(key, pairs)] = value
    wrapped_names = {w[:-1] for w, _ in pairs}
    for key, value in getattr(raw, "_metadata", {}).items():
        if key in {c[:-1] for _, c in pairs} and key not in wrapped_names:
            continue  # the wrapper's own entry; the wrapped module's entry replaces it
        clean = _clean_key(key, pairs) if key else ""
        meta[(prefix + clean) if clean else prefix[:-1]] = value
    return destination


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        items = [(k, _to_cpu(v)) for k, v in value.items()]
        return OrderedDict(items) if isinstance(value, OrderedDict) else dict(items)
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    if isinstance(value, tuple):
        moved = [_to_cpu(v) for v in value]
        return type(value)(*moved) if hasattr(value, "_fields") else tuple(moved)
    return value


def weights_to_cpu(state_dict: Mapping[str, Any]) -> "OrderedDict[str, Any]":
    """Return a copy of ``state_dict`` with every tensor moved to the CPU (metadata kept).

    Tensors nested in dicts, lists and tuples move too, as mmengine's ``weights_to_cpu`` does.
    """
    out = OrderedDict((k, _to_cpu(v)) for k, v in state_dict.items())
    if hasattr(state_dict, "_metadata"):
        out._metadata = state_dict._metadata  # type: ignore[attr-defined]
    return out


@dataclass
class LoadReport:
    """What a :func:`load_state_dict` call did not load.

    Attributes:
        missing_keys: Keys the model has and the state dict lacks.
        unexpected_keys: Keys the state dict has and the model lacks.
        mismatched: ``(key, checkpoint_shape, model_shape)`` for skipped tensors.
        errors: Other messages raised by modules' ``_load_from_state_dict``.
        loaded: Entries of the state dict that were loaded.
        expected: Entries the model has (what a complete load fills).
    """

    missing_keys: List[str] = field(default_factory=list)
    unexpected_keys: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)
    loaded: int = 0
    expected: int = 0

    def counts(self) -> str:
        """``'loaded 3 of the model's 10 entries (7 missing, 2 unexpected, 0 with another shape)'``."""
        return (f"loaded {self.loaded} of the model's {self.expected} entries ({len(self.missing_keys)} missing, "
                f"{len(self.unexpected_keys)} unexpected, {len(self.mismatched)} with another shape)")

    @property
    def ok(self) -> bool:
        """True when everything matched."""
        return not (self.missing_keys or self.unexpected_keys or self.mismatched or self.errors)

    def __bool__(self) -> bool:
        return self.ok

    def summary(self) -> str:
        """Human-readable list of every problem, one kind per line."""
        lines = []
        if self.unexpected_keys:
            lines.append("unexpected key in source state_dict: " + ", ".join(self.unexpected_keys))
        if self.missing_keys:
            lines.append("missing keys in source state_dict: " + ", ".join(self.missing_keys))
        for key, src, dst in self.mismatched:
            lines.append(f"size mismatch for {key}: checkpoint shape {tuple(src)}, model shape {tuple(dst)}")
        lines.extend(self.errors)
        return "\n".join(lines)


LoggerLike = Union[logging.Logger, str, None]


def _log(logger_arg: LoggerLike, message: str) -> None:
    if logger_arg == "silent":
        return
    target = logger_arg if isinstance(logger_arg, logging.Logger) else logger
    target.warning(message)


def _shape_differs(value: Any, current: Any) -> bool:
    return (isinstance(value, torch.Tensor) and isinstance(current, torch.Tensor)
            and not isinstance(current, (nn.parameter.UninitializedParameter, nn.parameter.UninitializedBuffer))
            and value.shape != current.shape)


def check_state_dict(module: nn.Module, state_dict: Mapping[str, Any]) -> LoadReport:
    """What :func:`load_state_dict` would report, from keys and shapes alone: nothing is loaded.

    The values may be data-less stand-ins (``device='meta'``), so a restore can
    check a file's header against the model before reading any weights.

    Args:
        module: Target module; wrappers anywhere in it are handled.
        state_dict: Clean keys (or ``module.``-prefixed keys of a wrapped model).

    Returns:
        A :class:`LoadReport` (``errors`` stays empty: custom load code does not run).
    """
    inner = unwrap_model(module)
    pairs = _wrapper_prefixes(inner)
    own = inner.state_dict(keep_vars=True)
    to_wrapped = {_clean_key(k, pairs): k for k in own}
    report, seen = LoadReport(), set()
    for key, value in state_dict.items():
        target = to_wrapped.get(key, key)
        if target not in own:
            report.unexpected_keys.append(key)
            continue
        seen.add(target)
        if _shape_differs(value, own[target]):
            report.mismatched.append((key, tuple(value.shape), tuple(own[target].shape)))
    report.missing_keys = [c for c in (_clean_key(k, pairs) for k in own if k not in seen)
                           if not c.endswith("num_batches_tracked")]
    return report


def load_state_dict(module: nn.Module, state_dict: Mapping[str, Any], strict: bool = False,
                    logger: LoggerLike = None) -> LoadReport:
    """Load ``state_dict`` into ``module`` (wrapped or not) and report what did not fit.

    Tensors whose shape differs from the model's are skipped and reported, never
    a crash. A missing ``num_batches_tracked`` is not reported (old BatchNorm
    checkpoints lack it). Module versions in ``state_dict._metadata`` are
    passed to ``_load_from_state_dict`` so version upgrades run.

    Args:
        module: Target module; wrappers anywhere in it are handled.
        state_dict: Clean keys (as from :func:`get_state_dict`); ``module.``-prefixed
            keys of a wrapped model are accepted as well.
        strict: Raise when anything is missing, unexpected or mis-shaped.
        logger: Logger for the non-strict warning (rank 0 only), ``'silent'`` for none.

    Returns:
        A :class:`LoadReport`.

    Raises:
        KeyMismatchError: ``strict`` and the report is not empty.
    """
    inner = unwrap_model(module)
    pairs = _wrapper_prefixes(inner)
    own = inner.state_dict(keep_vars=True)
    to_wrapped = {_clean_key(k, pairs): k for k in own}
    meta_src = getattr(state_dict, "_metadata", None)
    renamed: "OrderedDict[str, Any]" = OrderedDict()
    report = LoadReport()
    for key, value in state_dict.items():
        target = to_wrapped.get(key, key)
        current = own.get(target)
        if _shape_differs(value, current):
            report.mismatched.append((key, tuple(value.shape), tuple(current.shape)))
            continue
        renamed[target] = value
    if meta_src is not None:
        wrapped_meta = {_clean_key(k, pairs): k for k in getattr(inner.state_dict(), "_metadata", {})}
        renamed._metadata = OrderedDict(  # type: ignore[attr-defined]
            (wrapped_meta.get(k, k), v) for k, v in meta_src.items())
    try:
        result = inner.load_state_dict(renamed, strict=False)
        missing, unexpected = result.missing_keys, result.unexpected_keys
    except RuntimeError as exc:  # messages from custom _load_from_state_dict implementations
        report.errors.append(str(exc))
        missing, unexpected = [], []
    skipped = {k for k, _, _ in report.mismatched}
    report.missing_keys = [c for c in (_clean_key(k, pairs) for k in missing)
                           if c not in skipped and not c.endswith("num_batches_tracked")]
    report.unexpected_keys = [_clean_key(k, pairs) for k in unexpected]
    report.loaded, report.expected = len(renamed) - len(unexpected), len(own)
    if report.ok:
        return report
    if strict:
        raise KeyMismatchError("state_dict does not match the model:\n" + report.summary())
    if dist.is_rank_zero():
        most = "MOST OF THE MODEL WAS NOT LOADED: " if report.loaded * 2 < report.expected else ""
        _log(logger, f"The model and loaded state dict do not match exactly: {most}{report.counts()}\n"
             + report.summary())
    return report
