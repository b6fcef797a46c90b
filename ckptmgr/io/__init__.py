"""The storage layer: every byte ckptmgr reads or writes goes through here.

A :class:`~ckptmgr.io.store.Store` is storage bound to a root (a local path or
any fsspec URL) and its options; the layers above name files relative to it.
Local stores write a temp file, fsync, ``os.replace`` and fsync the directory;
object stores upload each object completely or not at all. How a whole
directory of files is committed (rename a temp directory, or write the
manifest last) follows from the store's kind, see :mod:`ckptmgr.step.commit`.
"""
from .access import atomic_write, exists, isdir, listdir, makedirs, open_read, open_store, remove, size
from .remote import get_fs
from .store import Store
from .uri import OBJECT_STORES, has_scheme, is_local, join, local_path, split_protocol

__all__ = ["Store", "open_store", "atomic_write", "open_read", "exists", "isdir", "size", "listdir", "makedirs",
           "remove", "get_fs", "split_protocol", "has_scheme", "is_local", "local_path", "join", "OBJECT_STORES"]
