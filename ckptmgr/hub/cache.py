"""The download cache: remote checkpoint files fetched once per node, verified, then reused.

Every remote file a loader needs (``http(s)://`` weights, model-zoo entries,
and any fsspec URL passed to :func:`cached_path`) lands in
``$CKPTMGR_HOME/hub/checkpoints/``. A file appears there only complete and
verified: bytes go to a temp file in the same directory, the size is checked
against ``Content-Length``, the sha256 against a torch.hub-style hash in the
file name (``resnet50-0676ba61.pth``), then the file is fsynced and renamed
into place. Concurrent callers on one node are serialised by a file lock, and
in a torch.distributed job each node's local rank 0 downloads first while the
other ranks wait, so one node fetches each file exactly once.

``CKPTMGR_URL_MIRRORS`` rewrites URL prefixes before the download (for
air-gapped clusters); the cache key is always the original URL.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import urllib.parse
from typing import Any, Dict, List, Optional, Tuple

from .. import distributed as dist
from ..errors import CheckpointNotFoundError, ChecksumError, DownloadError, UnknownSchemeError
from ..io import atomic_write, has_scheme, is_local, local_path, open_read, split_protocol
from ..io.remote import fsspec_knows

logger = logging.getLogger(__name__)

__all__ = [
    "ckptmgr_home", "cache_dir", "hash_prefix", "url_mirrors", "apply_mirrors",
    "cache_filename", "cached_path",
]

# torch.hub's convention: "name-<hex>.ext" carries the start of the file's sha256.
# We require at least 8 hex digits so short version tags ("-v2.", "-1.") never count.
HASH_REGEX = re.compile(r"-([a-f0-9]{8,64})\.")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def ckptmgr_home() -> str:
    """The ckptmgr home: ``$CKPTMGR_HOME``, else ``$XDG_CACHE_HOME/ckptmgr``, else ``~/.cache/ckptmgr``."""
    home = os.environ.get("CKPTMGR_HOME")
    if home:
        return os.path.expanduser(home)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = os.path.expanduser(xdg) if xdg else os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ckptmgr")


def cache_dir() -> str:
    """Directory holding downloaded checkpoint files (``<home>/hub/checkpoints``)."""
    return os.path.join(ckptmgr_home(), "hub", "checkpoints")


def hash_prefix(filename: str) -> Optional[str]:
    """The sha256 prefix a torch.hub-style file name promises (``'0676ba61'``), or None."""
    match = HASH_REGEX.search(os.path.basename(filename))
    return match.group(1) if match else None


def url_mirrors() -> List[Tuple[str, str]]:
    """Parse ``CKPTMGR_URL_MIRRORS`` (``'PREFIX=REPLACEMENT,...'``) into pairs, longest prefix first.

    Raises:
        DownloadError: an entry has no ``=``.
    """
    raw = os.environ.get("CKPTMGR_URL_MIRRORS", "").strip()
    pairs = []
    for entry in filter(None, (e.strip() for e in raw.split(","))):
        prefix, sep, replacement = entry.partition("=")
        if not sep or not prefix:
            raise DownloadError(f"CKPTMGR_URL_MIRRORS entry {entry!r} is not PREFIX=REPLACEMENT",
                                "write entries like https://download.pytorch.org/=http://mirror.local/pt/")
        pairs.append((prefix.strip(), replacement.strip()))
    return sorted(pairs, key=lambda p: len(p[0]), reverse=True)


def apply_mirrors(url: str) -> str:
    """Rewrite ``url`` with the longest matching ``CKPTMGR_URL_MIRRORS`` prefix (unchanged if none)."""
    for prefix, replacement in url_mirrors():
        if url.startswith(prefix):
            return replacement + url[len(prefix):]
    return url


def cache_filename(uri: str, check_hash: bool = True) -> str:
    """The file name ``uri`` is cached under.

    A name carrying a torch.hub hash is kept as it is when the hash is checked:
    the name then pins the content, so two URLs sharing it share verified bytes.
    Any other name gets a short hash of the full URL before its extension
    (``model.3f2a9c1b0d.pth``), so different URLs never collide while the hub
    hash, if any, stays readable in the name.

    Args:
        uri: The original URL (before ``CKPTMGR_URL_MIRRORS``).
        check_hash: Whether the download will be checked against a hub hash.

    Returns:
        A file name safe to use in the cache directory.
    """
    path = urllib.parse.urlsplit(uri).path if has_scheme(uri) else uri
    base = _UNSAFE_CHARS.sub("_", path.rstrip("/").rsplit("/", 1)[-1]).lstrip(".")[:150] or "download"
    if check_hash and hash_prefix(base):
        return base
    stem, ext = os.path.splitext(base)
    if len(ext) > 16:
        stem, ext = base, ""
    return f"{stem}.{hashlib.sha256(uri.encode('utf-8')).hexdigest()[:10]}{ext}"


def cached_path(uri: str, *, check_hash: bool = True, timeout: Optional[float] = None,
                retries: Optional[int] = None, progress: Optional[bool] = None,
                storage_options: Optional[Dict[str, Any]] = None, sync_ranks: bool = True) -> str:
    """Return a local path holding the file at ``uri``, downloading it once per node.

    A local path (or ``file://``) is returned as is. ``http(s)://`` URLs go
    through ckptmgr's HTTP client (retries, Range resume, mirrors); any other
    fsspec URL (``s3://``, ``memory://``) is streamed through fsspec.

    In a torch.distributed job this is a collective: every rank must call it.
    Local rank 0 of each node downloads, the other ranks then read the cache;
    if rank 0 fails, they raise :class:`~ckptmgr.errors.DistributedError`.

    Args:
        uri: Path or URL of the file.
        check_hash: Verify the sha256 prefix a torch.hub-style name carries
            (``name-<8+ hex>.ext``). Pass False only for a source whose names
            do not follow that convention (e.g. a mirror serving other bytes).
        timeout: Seconds each connect/read may block (``CKPTMGR_DOWNLOAD_TIMEOUT``, default 60).
        retries: Failed attempts tolerated (``CKPTMGR_DOWNLOAD_RETRIES``, default 5).
        progress: Show a progress bar; default: on global rank 0 when stderr is a terminal.
        storage_options: fsspec options for non-HTTP URLs.
        sync_ranks: Coordinate ranks as described above; False makes the call
            independent of other ranks (each node's processes still share one download).

    Returns:
        The local file path.

    Raises:
        CheckpointNotFoundError: the file does not exist (404, missing object, missing path).
        ChecksumError: the bytes do not match the hash in the file name; nothing is cached.
        DownloadError: network, access or server failure after retries.
        UnknownSchemeError: the URL's scheme is neither HTTP nor an fsspec protocol.
        DistributedError: on ranks other than local rank 0, when it failed.
    """
    uri = str(uri)
    if is_local(uri):
        path = local_path(uri)
        if not os.path.isfile(path):
            raise CheckpointNotFoundError(f"no such file: {path}")
        return path
    protocol = split_protocol(uri)[0] or ""
    if protocol not in ("http", "https"):
        if not fsspec_knows(protocol):
            raise UnknownSchemeError(f"cached_path cannot fetch '{protocol}://' URLs ({uri})",
                                     "pass an http(s):// or fsspec URL, or load zoo names with load_checkpoint")
    target = os.path.join(cache_dir(), cache_filename(uri, check_hash))
    options = dict(check_hash=check_hash, timeout=timeout, retries=retries, progress=progress,
                   storage_options=storage_options)
    if not sync_ranks:
        return _ensure(uri, target, **options)
    with dist.rank_zero_first(local=True):
        return _ensure(uri, target, **options)


def _ensure(uri: str, target: str, **options: Any) -> str:
    """Return ``target``, downloading ``uri`` into it under the node-wide lock if it is missing."""
    if os.path.isfile(target):
        logger.debug("cache hit for %s: %s", uri, target)
        return target
    import filelock
    lock_dir = os.path.join(ckptmgr_home(), "hub", ".locks")
    try:
        os.makedirs(lock_dir, exist_ok=True)
        os.makedirs(os.path.dirname(target), exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot create the download cache in {os.path.dirname(target)}: {exc}",
                            "set CKPTMGR_HOME to a writable directory") from exc
    lock = filelock.FileLock(os.path.join(lock_dir, os.path.basename(target) + ".lock"),
                             timeout=dist.default_timeout())
    try:
        with lock:
            if os.path.isfile(target):  # another process finished it while we waited
                return target
            _download(uri, target, **options)
    except filelock.Timeout as exc:
        raise DownloadError(f"waited {dist.default_timeout():.0f}s for another process downloading {uri}",
                            "that process may be stuck; raise CKPTMGR_DIST_TIMEOUT for huge files") from exc
    return target


def _download(uri: str, target: str, *, check_hash: bool, timeout: Optional[float],
              retries: Optional[int], progress: Optional[bool],
              storage_options: Optional[Dict[str, Any]]) -> None:
    """Fetch ``uri`` into a temp file beside ``target``, verify it, then promote it atomically."""
    name = os.path.basename(target)
    if progress is None:
        progress = dist.get_rank() == 0 and sys.stderr.isatty()
    # atomic_write: temp file beside the target, fsync, rename, fsync of the directory;
    # a failed download or check leaves nothing under the final name.
    with atomic_write(target) as fh:
        if split_protocol(uri)[0] in ("http", "https"):
            source = apply_mirrors(uri)
            logger.info("downloading %s%s to %s", uri, f" from mirror {source}" if source != uri else "", target)
            from .http import RetryPolicy, download
            size, digest = download(source, fh, RetryPolicy.from_env(retries, timeout), progress, name)
        else:
            logger.info("copying %s to %s", uri, target)
            size, digest = _copy_fsspec(uri, fh, storage_options)
        _verify(uri, name, digest, check_hash)
    logger.debug("cached %s (%d bytes, sha256 %s) as %s", uri, size, digest, target)


def _copy_fsspec(uri: str, fh: Any, storage_options: Optional[Dict[str, Any]]) -> Tuple[int, str]:
    """Stream an fsspec object into ``fh``; returns ``(size, sha256)``. fsspec backends retry on their own."""
    sha = hashlib.sha256()
    done = 0
    with open_read(uri, storage_options) as src:
        expected = getattr(src, "size", None)
        while True:
            try:
                chunk = src.read(1 << 20)
            except OSError as exc:  # network or permission trouble on the remote side, not our disk
                raise DownloadError(f"reading {uri} failed after {done} bytes: {exc}") from exc
            if not chunk:
                break
            fh.write(chunk)
            sha.update(chunk)
            done += len(chunk)
    if expected is not None and done != expected:
        raise DownloadError(f"{uri}: read {done} bytes but the object has {expected}", "try again")
    return done, sha.hexdigest()


def _verify(uri: str, name: str, digest: str, check_hash: bool) -> None:
    prefix = hash_prefix(urllib.parse.urlsplit(uri).path or name)
    if prefix is None:
        return
    if not check_hash:
        logger.info("not checking %s against the hash in its name (check_hash=False)", uri)
        return
    if not digest.startswith(prefix):
        raise ChecksumError(
            f"{uri}: sha256 {digest[:16]}... does not start with {prefix}, the hash in its file name",
            "the download is corrupt or the server (or mirror) serves another file; nothing was cached. "
            "If the name's hash is known not to match (an unofficial mirror), pass check_hash=False")
