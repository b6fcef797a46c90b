"""The scheme registry: which loader handles which URL prefix.

A loader is any callable ``loader(filename, map_location=None, **kwargs)``
returning what ``torch.load(weights_only=True)`` would (a dict, usually).
Dispatch picks the longest registered prefix that matches; plain paths and
``file://`` go to the local loader; an unregistered ``scheme://`` goes to the
fsspec loader only when fsspec knows the protocol, and otherwise fails loudly:
it is never mistaken for a relative local path.
"""
from __future__ import annotations

import inspect
import logging
import os
import threading
from typing import Any, Callable, Dict, Iterable, Optional, Union

from ..errors import UnknownSchemeError
from ..storage import split_protocol

_LOCK = threading.RLock()

logger = logging.getLogger(__name__)

__all__ = ["CheckpointLoader", "Loader"]

Loader = Callable[..., Any]


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

    _schemes: Dict[str, Loader] = {}
    _builtins_loaded = False

    @classmethod
    def _ensure_builtins(cls) -> None:
        # Built-in schemes are registered on first use so importing ckptmgr stays cheap;
        # they never replace a prefix a user registered first.
        if cls._builtins_loaded:
            return
        with _LOCK:
            if not cls._builtins_loaded:
                from . import builtin
                for prefix, loader in builtin.BUILTIN_SCHEMES.items():
                    cls._schemes.setdefault(prefix, loader)
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
        """A copy of the prefix -> loader table."""
        cls._ensure_builtins()
        return dict(cls._schemes)

    @classmethod
    def snapshot(cls) -> Dict[str, Loader]:
        """Capture the registry (for tests: restore it with :meth:`restore`)."""
        cls._ensure_builtins()
        return dict(cls._schemes)

    @classmethod
    def restore(cls, snapshot: Dict[str, Loader]) -> None:
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
        cls._ensure_builtins()
        from . import builtin
        filename = os.fspath(filename) if isinstance(filename, os.PathLike) else str(filename)
        protocol, rest = split_protocol(filename)
        normalized = f"{protocol}://{rest}" if protocol is not None else filename
        with _LOCK:
            table = dict(cls._schemes)
        for prefix in sorted(table, key=len, reverse=True):
            if filename.startswith(prefix) or normalized.startswith(prefix):
                return table[prefix]
        if protocol is None or protocol == "file":
            return builtin.load_from_local
        if builtin.fsspec_knows(protocol):
            return builtin.load_from_fsspec
        known = ", ".join(sorted(table)) or "(none)"
        raise UnknownSchemeError(
            f"no checkpoint loader for '{protocol}://' in {filename!r} (it is not a local path either); "
            f"registered prefixes: {known}")

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
