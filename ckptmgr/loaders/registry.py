"""The scheme registry: which loader handles which URL prefix.

A loader is any callable ``loader(filename, map_location=None, **kwargs)``
returning what ``torch.load(weights_only=True)`` would (a dict, usually); it is
called as OpenMMLab calls it, ``loader(filename, map_location)`` by position,
plus the keywords it declares (:mod:`.calling`). Prefixes are plain strings or
regular expressions, as OpenMMLab's are (the rule is in :mod:`.prefixes`);
dispatch tries the longest first. Plain paths and ``file://`` go to the loader
registered under ``''`` (the local loader, as in OpenMMLab); an unregistered
``scheme://`` goes to the fsspec loader only when fsspec knows the protocol,
and otherwise fails loudly (:class:`UnknownSchemeError`, also a
``FileNotFoundError``): it is never mistaken for a relative local path.

Built-in schemes are listed as dotted import strings (as fsspec's
``known_implementations`` does) and imported on first use, so this module
imports no loader and no import cycle can form; the zoo loaders resolve a
name to a URL and hand it back to the registry.
"""
from __future__ import annotations

import importlib
import logging
import os
import re
import threading
from typing import Any, Callable, Dict, Iterable, Optional, Union

from ..errors import UnknownSchemeError
from ..io.remote import fsspec_knows
from ..io.uri import split_protocol
from .calling import loader_keywords
from .prefixes import Prefix, matches, priority, text_of, validate_prefix

_LOCK = threading.RLock()

logger = logging.getLogger(__name__)

__all__ = ["CheckpointLoader", "Loader"]

Loader = Callable[..., Any]

#: Built-in prefixes -> "module:function" of their loader, imported when first used.
BUILTIN_SCHEMES: Dict[str, str] = {
    "": "ckptmgr.loaders.local:load_from_local",  # the fallback for plain paths, as in OpenMMLab
    "file://": "ckptmgr.loaders.local:load_from_local",
    "s3://": "ckptmgr.loaders.fsspec:load_from_fsspec",
    # OpenMMLab's cluster:s3:// names; "=s3://" means "whatever 's3://' is registered to", so replacing
    # the s3:// loader (force=True) is not shadowed by this longer prefix.
    r"(\S+\:)?s3://": "=s3://",
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


def resolve(target: Union[str, Loader], table: Optional[Dict[Any, Union[str, Loader]]] = None) -> Loader:
    """The loader a table entry names: a callable as it is, a ``"module:function"`` string imported,
    ``"=PREFIX"`` the loader of another entry of ``table``."""
    if callable(target):
        return target
    if target.startswith("="):
        return resolve((table or {}).get(target[1:], _FSSPEC))
    module, _, name = target.partition(":")
    loader: Loader = getattr(importlib.import_module(module), name)
    return loader


def _follow(target: Union[str, Loader], table: Dict[Any, Union[str, Loader]]) -> Union[str, Loader]:
    """A table entry with ``"=PREFIX"`` aliases followed to the entry they name (nothing is imported)."""
    seen = 0
    while isinstance(target, str) and target.startswith("=") and seen < len(table) + 1:
        target = table.get(target[1:], _FSSPEC)
        seen += 1
    return target


#: Hints for schemes OpenMMLab knows and ckptmgr deliberately does not.
_UNSUPPORTED_HINTS = {
    "pavi": "pavi:// (OpenMMLab's internal model cloud) is not supported; download the file and load it "
            "by path, or register a loader with CheckpointLoader.register_scheme('pavi://', loader)",
    "petrel": "petrel:// needs SenseTime's petrel client, which ckptmgr does not use; address the same "
              "bucket as s3://bucket/key (AWS_ENDPOINT_URL or storage_options={'endpoint_url': ...})",
}


class CheckpointLoader:
    """Registry of checkpoint loaders keyed by URL prefix (OpenMMLab-compatible API)."""

    _schemes: Dict[Prefix, Union[str, Loader]] = {}
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
    def _register(cls, prefixes: Union[Prefix, Iterable[Prefix]], loader: Loader, force: bool) -> None:
        if isinstance(prefixes, (str, re.Pattern)):
            prefixes = [prefixes]
        elif not isinstance(prefixes, (list, tuple)):
            raise TypeError(f"prefixes must be a string, a compiled regex or a list/tuple of them, got {prefixes!r}")
        prefixes = [validate_prefix(p) for p in prefixes]
        if not prefixes:
            raise TypeError("prefixes must name at least one prefix, got an empty list")
        if not callable(loader):
            raise TypeError(f"loader must be callable, got {loader!r}")
        cls._ensure_builtins()
        with _LOCK:  # all or nothing: check every prefix before registering any
            for prefix in prefixes:
                if prefix in cls._schemes and not force:
                    raise KeyError(f"{text_of(prefix)!r} is already registered as a loader backend, "
                                   'add "force=True" if you want to override it')
            for prefix in prefixes:
                cls._schemes[prefix] = loader

    @classmethod
    def register_scheme(cls, prefixes: Union[Prefix, Iterable[Prefix]], loader: Optional[Loader] = None,
                        force: bool = False) -> Loader:
        """Register ``loader`` for one prefix or several.

        Works as a call, ``register_scheme('myfs://', load_fn)``, and as a
        decorator, ``@CheckpointLoader.register_scheme('myfs://')``. A prefix
        holding one of ``\\ ( ) [ ] { } * ? | ^ $`` (or a compiled ``re.Pattern``)
        is a regular expression tried with ``re.match``, as in OpenMMLab
        (``r'(\\S+\\:)?myfs://'``); any other string is plain. ``''`` is the
        loader for plain paths (the local loader until replaced with ``force=True``).

        Args:
            prefixes: A prefix (``'s3://'``, ``'a/b'``, a regex) or a list/tuple of them.
            loader: ``loader(filename, map_location, **declared_options) -> checkpoint``;
                called with ``filename`` and ``map_location`` by position.
            force: Replace existing registrations instead of raising.

        Returns:
            The loader (decorator form returns a decorator).

        Raises:
            KeyError: a prefix is already registered and ``force`` is False.
            TypeError: a prefix is not a string or regex, or a regex does not compile.
        """
        if loader is not None:
            cls._register(prefixes, loader, force)
            return loader

        def decorator(func: Loader) -> Loader:
            cls._register(prefixes, func, force)
            return func
        return decorator

    @classmethod
    def registered_schemes(cls) -> Dict[Prefix, Loader]:
        """A copy of the prefix -> loader table (built-ins imported)."""
        cls._ensure_builtins()
        table = dict(cls._schemes)
        return {prefix: resolve(target, table) for prefix, target in table.items()}

    @classmethod
    def snapshot(cls) -> Dict[Prefix, Any]:
        """Capture the registry (for tests: restore it with :meth:`restore`)."""
        cls._ensure_builtins()
        return dict(cls._schemes)

    @classmethod
    def restore(cls, snapshot: Dict[Prefix, Any]) -> None:
        """Put back a registry captured by :meth:`snapshot`."""
        with _LOCK:
            cls._schemes.clear()
            cls._schemes.update(snapshot)
            cls._builtins_loaded = True  # a snapshot always includes the built-ins

    @classmethod
    def get_loader(cls, filename: str) -> Loader:
        """Return the loader for ``filename``.

        The longest registered prefix that matches wins (plain prefixes compare
        the ``scheme://`` part case-insensitively; regex prefixes use
        ``re.match``). Without a match, plain paths and ``file://`` go to the
        loader registered under ``''`` (the local loader), and protocols fsspec
        knows to the fsspec loader (which raises MissingDependencyError, naming
        the package, when that protocol's backend is not installed).

        Args:
            filename: A path (str or PathLike) or URL.

        Returns:
            The loader callable.

        Raises:
            UnknownSchemeError: ``filename`` has a ``scheme://`` that nothing handles
                (also a ``FileNotFoundError``, what OpenMMLab raises for it).
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
        for prefix in sorted((p for p in table if p != ""), key=priority, reverse=True):
            if matches(prefix, filename, normalized):
                return _follow(table[prefix], table)
        if protocol is None or protocol == "file":
            return _follow(table.get("", _LOCAL), table)
        if fsspec_knows(protocol):
            return _FSSPEC
        known = ", ".join(sorted(text_of(p) for p in table if p != "")) or "(none)"
        raise UnknownSchemeError(
            f"no checkpoint loader for '{protocol}://' in {filename!r} (it is not a local path either); "
            f"registered prefixes: {known}", _UNSUPPORTED_HINTS.get(protocol))

    #: OpenMMLab's name for :meth:`get_loader`, kept for code written against it.
    _get_checkpoint_loader = get_loader

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

        The loader is called as ``loader(filename, map_location, **options)``,
        ``options`` being the keywords it declares.

        Args:
            filename: A path or URL.
            map_location: Passed to the loader (as for ``torch.load``).
            logger: Logger for the debug line naming the loader (``'silent'`` for none).
            **kwargs: ``trust_pickle`` and ``storage_options`` (passed on to loaders that
                declare them) and options of the chosen loader (e.g. ``check_hash``).

        Returns:
            The checkpoint the loader returned.

        Raises:
            UnknownSchemeError: no loader handles ``filename``.
            UnexpectedKeywordError: (a ``TypeError``) a keyword the chosen loader does not take.
            CheckpointError: whatever the loader raises (not found, corrupt, unsafe, ...).
        """
        filename = os.fspath(filename) if isinstance(filename, os.PathLike) else str(filename)
        loader = cls.get_loader(filename)
        extra = loader_keywords(loader, kwargs, "CheckpointLoader.load_checkpoint")
        log = logger if isinstance(logger, logging.Logger) else globals()["logger"]
        if logger != "silent":
            log.debug("load checkpoint from %s with %s", filename, getattr(loader, "__name__", repr(loader)))
        return loader(filename, map_location, **extra)
