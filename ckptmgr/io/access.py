"""Reaching storage by URI: the Store of a local path or URL, and single-file helpers.

``save_checkpoint``, the loaders and the download cache name single files by
a full URI; they use the helpers here, each a Store operation on that URI.
"""
from __future__ import annotations

import contextlib
from typing import IO, Any, List

from .store import Options, Store
from .uri import is_local

__all__ = ["open_store", "open_read", "atomic_write", "exists", "isdir", "size", "listdir", "makedirs", "remove"]


def open_store(root: Any, options: Options = None) -> Store:
    """The Store for a local path or URL (``s3://``, ``memory://``, any fsspec protocol).

    Raises:
        MissingDependencyError: the URL's fsspec backend is not installed (on first use).
    """
    root = str(root)
    if is_local(root):
        from .local import LocalStore
        return LocalStore(root)
    from .remote import FsspecStore
    return FsspecStore.for_uri(root, options)


# --------------------------------------------------------------------------- single files by URI


def open_read(uri: str, options: Options = None) -> "contextlib.AbstractContextManager[IO[bytes]]":
    """Open the file at ``uri`` for reading (see :meth:`Store.open_read`)."""
    return open_store(uri, options).open_read()


def atomic_write(uri: str, options: Options = None) -> "contextlib.AbstractContextManager[IO[bytes]]":
    """Open ``uri`` for an all-or-nothing write (see :meth:`Store.atomic_write`)."""
    return open_store(uri, options).atomic_write()


def exists(uri: str, options: Options = None) -> bool:
    """True when something exists at ``uri``."""
    return open_store(uri, options).exists()


def isdir(uri: str, options: Options = None) -> bool:
    """True when ``uri`` is a directory (or a non-empty object-store prefix)."""
    return open_store(uri, options).isdir()


def size(uri: str, options: Options = None) -> int:
    """Bytes in the file at ``uri``."""
    return open_store(uri, options).size()


def listdir(uri: str, options: Options = None) -> List[str]:
    """Names inside the directory ``uri``."""
    return open_store(uri, options).listdir()


def makedirs(uri: str, options: Options = None) -> None:
    """Create the directory ``uri`` (a no-op on object stores)."""
    open_store(uri, options).makedirs()


def remove(uri: str, recursive: bool = False, options: Options = None) -> None:
    """Delete ``uri`` (a tree with ``recursive``); missing is fine."""
    open_store(uri, options).remove(recursive=recursive)


