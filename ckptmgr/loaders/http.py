"""Loader for ``http://`` and ``https://`` URLs: download once into the cache, then load the file."""
from __future__ import annotations

from typing import Any, Optional

from ..errors import CorruptCheckpointError
from ..format.maplocation import MapLocation
from ..hub.cache import cached_path
from .local import load_file

__all__ = ["load_from_http"]


def load_from_http(filename: str, map_location: MapLocation = None, trust_pickle: bool = False,
                   check_hash: bool = True, timeout: Optional[float] = None,
                   progress: Optional[bool] = None) -> Any:
    """Load a checkpoint from an HTTP(S) URL through the download cache.

    Args:
        filename: The URL (rewritten by ``CKPTMGR_URL_MIRRORS`` before download).
        map_location: As for ``torch.load``.
        trust_pickle: Allow arbitrary pickle (only for files from a trusted source).
        check_hash: Verify a torch.hub-style hash in the file name (see :func:`ckptmgr.cached_path`).
        timeout: Seconds each network operation may block.
        progress: Force the progress bar on or off.

    Returns:
        What ``torch.load(weights_only=True)`` (or the safetensors reader) returns.

    Raises:
        CheckpointNotFoundError, DownloadError, ChecksumError: see :func:`ckptmgr.cached_path`.
        CorruptCheckpointError: the downloaded file cannot be read (the hint says how to fetch it again).
    """
    path = cached_path(filename, check_hash=check_hash, timeout=timeout, progress=progress)
    try:
        return load_file(path, map_location=map_location, trust_pickle=trust_pickle)
    except CorruptCheckpointError as exc:  # here, and only here, downloading again is the fix
        raise type(exc)(exc.message, f"delete the cached copy {path} and load the URL again to download it "
                                     "afresh; if it fails the same way, the server's file is damaged") from exc
