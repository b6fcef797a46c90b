"""The scheme registry: which loader handles which URL prefix.

A loader is any callable ``loader(filename, map_location=None, **kwargs)``
returning what ``torch.load(weights_only=True)`` would (a dict, usually).
Dispatch picks the longest registered prefix that matches; plain paths and
``file://`` go to the local loader; an unregistered ``scheme://`` goes to the
fsspec loader only when fsspec knows the protocol, and otherwise fails loudly:
it is never mistaken for a relative local path.

Built-in schemes are listed as dotted import strings (as fsspec's
``known_implementations`` does) and imported on first use, so this module
imports no loader and no import cycle can form; the zoo loaders resolve a
name to a URL and hand it back to the registry.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import os
import threading
from typing import Any, Callable, Dict, Iterable, Optional, Union

from ..errors import UnknownSchemeError
from ..io.remote import fsspec_knows
from ..io.uri import split_protocol

_LOCK = threading.RLock()

logger = logging.getLogger(__name__)

__all__ = ["CheckpointLoader", "Loader"]

Loader = Callable[..., Any]

#: Built-in prefixes -> "module:function" of their loader, imported when first used.
BUILTIN_SCHEMES: Dict[str, str] = {
    "file://": "ckptmgr.loaders.local:load_from_local",
    "s3://": "ckptmgr.loaders.fsspec:load_from_fsspec",
    "memory://": "ckptmgr.loaders.fsspec:load_from_fsspec",
    "http://": "ckptmgr.loaders.http:load_from_http",
    "https://": "ckptmgr.loaders.http:load_from_http",
    "torchvision://": "ckptmgr.loaders.zoo:load_from_torchvision",
    "modelzoo://": "ckptmgr.loaders.zoo:load_from_torchvision",
    "open-mmlab://": "ckptmgr.loaders.zoo:load_from_openmmlab",
    "openmmlab://": "ckptmgr.loaders.zoo:load_from_openmmlab",
    "mmcls://": "ckptmgr.loaders.zoo:load_from_mmcls",
}
_LOCAL = "ckptmgr.loaders.local:load_from_local"
_FSSPEC = "ckptmgr.loaders.fsspec:load_from_fsspec"


def resolve(target: Union[str, Loader]) -> Loader:
    """The loader a table entry names: a callable as it is, a ``"module:function"`` string imported."""
    if callable(target):
        return target
    module, _, name = target.partition(":")
    loader: Loader = getattr(importlib.import_module(module), name)
    return loader


def _accepted_kwargs(func: Loader, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Keep only the keyword arguments ``func`` accepts (user loaders often take just filename, map_location)."""
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in params}


class CheckpointLoader:
    """Registry of checkpoint loaders keyed by URL prefix (OpenMMLab-compatible API)."""

    _schemes: Dict[str, Union[str, Loader]] = {}
    _builtins_loaded = False

    @classmethod
    def _ensure_builtins(cls) -> None:
        # Built-in schemes join the table on first use; they never replace a prefix a
        # user registered first. Their modules are imported only when a URL needs them.
        if cls._builtins_loaded:
            return
        with _LOCK:
            if not cls._builtins_loaded:
                for prefix, target in BUILTIN_SCHEMES.items():
                    cls._schemes.setdefault(prefix, target)
                cls._builtins_loaded = True

    @classmethod
    def _register(cls, prefixes: Union[str, Iterable[str]], loader: Loader, force: bool) -> None:
        if isinstance(prefixes, str):
            prefixes = [prefixes]
        prefixes = list(prefixes)
        if not prefixes or not all(isinstance(p, str) and p for p in prefixes):
            raise TypeError(f"prefixes must be a non-empty string or a list of them, got {prefixes!r}")
        if not callable(loader):
            raise TypeError(f"loader must be callable, got {loader!r}")
        cls._ensure_builtins()
        with _LOCK:  # all or nothing: check every prefix before registering any
            for prefix in prefixes:
                if prefix in cls._schemes and not force:
                    raise KeyError(f"{prefix} is already registered as a loader backend, "
                                   'add "force=True" if you want to override it')
            for prefix in prefixes:
                cls._schemes[prefix] = loader

    @classmethod
    def register_scheme(cls, prefixes: Union[str, Iterable[str]], loader: Optional[Loader] = None,
                        force: bool = False) -> Loader:
        """Register ``loader`` for one prefix or several.

        Works as a call, ``register_scheme('myfs://', load_fn)``, and as a
        decorator, ``@CheckpointLoader.register_scheme('myfs://')``.

        Args:
            prefixes: A prefix (``'s3://'``, ``'a/b'``) or a list/tuple of them.
            loader: ``loader(filename, map_location=None, **kwargs) -> checkpoint``.
            force: Replace existing registrations instead of raising.

        Returns:
            The loader (decorator form returns a decorator).

        Raises:
            KeyError: a prefix is already registered and ``force`` is False.
        """
        if loader is not None:
            cls._register(prefixes, loader, force)
            return loader

        def decorator(func: Loader) -> Loader:
            cls._register(prefixes, func, force)
            return func
        return decorator

    @classmethod
    def registered_schemes(cls) -> Dict[str, Loader]:
        """A copy of the prefix -> loader table (built-ins imported)."""
        cls._ensure_builtins()
        return {prefix: resolve(target) for prefix, target in cls._schemes.items()}

    @classmethod
    def snapshot(cls) -> Dict[str, Any]:
        """Capture the registry (for tests: restore it with :meth:`restore`)."""
        cls._ensure_builtins()
        return dict(cls._schemes)

    @classmethod
    def restore(cls, snapshot: Dict[str, Any]) -> None:
        """Put back a registry captured by :meth:`snapshot`."""
        with _LOCK:
            cls._schemes.clear()
            cls._schemes.update(snapshot)
            cls._builtins_loaded = True  # a snapshot always includes the built-ins

    @classmethod
    def get_loader(cls, filename: str) -> Loader:
        """Return the loader for ``filename``.

        The longest registered prefix that ``filename`` starts with wins (the
        ``scheme://`` part compares case-insensitively). Without a match, plain
        paths and ``file://`` go to the local loader and protocols fsspec knows
        to the fsspec loader (which raises MissingDependencyError, naming the
        package, when that protocol's backend is not installed).

        Args:
            filename: A path (str or PathLike) or URL.

        Returns:
            The loader callable.

        Raises:
            UnknownSchemeError: ``filename`` has a ``scheme://`` that nothing handles.
        """
        return resolve(cls._target(filename))

    @classmethod
    def _target(cls, filename: Any) -> Union[str, Loader]:
        """The table entry for ``filename``: a loader, or the dotted name of a built-in one (not imported)."""
        cls._ensure_builtins()
        filename = os.fspath(filename) if isinstance(filename, os.PathLike) else str(filename)
        protocol, rest = split_protocol(filename)
        normalized = f"{protocol}://{rest}" if protocol is not None else filename
        with _LOCK:
            table = dict(cls._schemes)
        for prefix in sorted(table, key=len, reverse=True):
            if filename.startswith(prefix) or normalized.startswith(prefix):
                return table[prefix]
        if protocol is None or protocol == "file":
            return _LOCAL
        if fsspec_knows(protocol):
            return _FSSPEC
        known = ", ".join(sorted(table)) or "(none)"
        raise UnknownSchemeError(
            f"no checkpoint loader for '{protocol}://' in {filename!r} (it is not a local path either); "
            f"registered prefixes: {known}")

    @classmethod
    def reads_storage(cls, filename: Any) -> bool:
        """True when ``filename`` goes to the built-in local or fsspec loader (a path on a filesystem).

        Nothing is imported to answer, so tools that only list storage stay light.

        Raises:
            UnknownSchemeError: ``filename`` has a ``scheme://`` that nothing handles.
        """
        target = cls._target(filename)
        if callable(target):
            target = f"{getattr(target, '__module__', '')}:{getattr(target, '__name__', '')}"
        return target in (_LOCAL, _FSSPEC)

    @classmethod
    def load_checkpoint(cls, filename: str, map_location: Any = None, logger: Any = None, **kwargs: Any) -> Any:
        """Load a checkpoint through the loader registered for ``filename``.

        Args:
            filename: A path or URL.
            map_location: Passed to the loader (as for ``torch.load``).
            logger: Logger for the debug line naming the loader (``'silent'`` for none).
            **kwargs: ``trust_pickle``, ``storage_options`` and loader-specific options;
                passed on only when the loader accepts them.

        Returns:
            The checkpoint the loader returned.

        Raises:
            UnknownSchemeError: no loader handles ``filename``.
            CheckpointError: whatever the loader raises (not found, corrupt, unsafe, ...).
        """
        filename = os.fspath(filename) if isinstance(filename, os.PathLike) else str(filename)
        loader = cls.get_loader(filename)
        log = logger if isinstance(logger, logging.Logger) else globals()["logger"]
        if logger != "silent":
            log.debug("load checkpoint from %s with %s", filename, getattr(loader, "__name__", repr(loader)))
        return loader(filename, map_location=map_location, **_accepted_kwargs(loader, kwargs))
