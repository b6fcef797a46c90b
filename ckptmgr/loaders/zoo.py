"""Model-zoo schemes: resolve the name to a URL (:mod:`ckptmgr.hub.zoo`), then load that URL through the registry.

The resolved URL is loaded like any other, so downloads use the cache,
``CKPTMGR_URL_MIRRORS`` and hash checks.
"""
from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from typing import Any, Mapping

from ..errors import CheckpointFormatError
from ..format.maplocation import MapLocation
from ..hub.zoo import resolve_torchvision, resolve_zoo_name
from .calling import accepts_keyword
from .registry import CheckpointLoader

logger = logging.getLogger(__name__)

__all__ = ["load_from_torchvision", "load_from_openmmlab", "load_from_mmcls"]


def load_from_torchvision(filename: str, map_location: MapLocation = None, trust_pickle: bool = False,
                          check_hash: bool = True) -> Any:
    """Load ``torchvision://NAME`` (or the deprecated ``modelzoo://NAME``).

    Args:
        filename: The zoo URI.
        map_location: As for ``torch.load``.
        trust_pickle: Allow arbitrary pickle (torchvision weights never need it).
        check_hash: Verify the hash in the weights file name (False for a mirror serving other bytes).

    Returns:
        The state dict torchvision publishes.

    Raises:
        CheckpointNotFoundError: unknown name, with close matches.
    """
    scheme, name = filename.split("://", 1)
    if scheme == "modelzoo":
        warnings.warn(f"modelzoo:// is deprecated, use torchvision://{name} instead", DeprecationWarning,
                      stacklevel=3)
    url = resolve_torchvision(name)
    logger.debug("%s resolves to %s", filename, url)
    return _load_resolved(url, map_location, trust_pickle, check_hash)


def _load_resolved(target: str, map_location: MapLocation, trust_pickle: bool, check_hash: bool) -> Any:
    # check_hash means something to the http loader only; a zoo entry may name a local file.
    options = {"check_hash": check_hash} if accepts_keyword(CheckpointLoader.get_loader(target), "check_hash") else {}
    return CheckpointLoader.load_checkpoint(target, map_location, logger="silent", trust_pickle=trust_pickle,
                                            **options)


def load_from_openmmlab(filename: str, map_location: MapLocation = None, trust_pickle: bool = False,
                        check_hash: bool = True) -> Any:
    """Load ``open-mmlab://NAME`` (or ``openmmlab://NAME``) through the open-mmlab name table.

    Args:
        filename: The zoo URI.
        map_location: As for ``torch.load``.
        trust_pickle: Allow arbitrary pickle (needed by some old OpenMMLab files).
        check_hash: Verify the hash in the file name (False for a mirror serving other bytes).

    Returns:
        The checkpoint, as stored.

    Raises:
        CheckpointNotFoundError: unknown name, with close matches.
    """
    target = resolve_zoo_name("open-mmlab", filename.split("://", 1)[1])
    logger.debug("%s resolves to %s", filename, target)
    return _load_resolved(target, map_location, trust_pickle, check_hash)


def load_from_mmcls(filename: str, map_location: MapLocation = None, trust_pickle: bool = False,
                    check_hash: bool = True) -> Any:
    """Load the backbone of an ``mmcls://NAME`` classifier.

    Args:
        filename: The zoo URI.
        map_location: As for ``torch.load``.
        trust_pickle: Allow arbitrary pickle (only for files from a trusted source).
        check_hash: Verify the hash in the file name (False for a mirror serving other bytes).

    Returns:
        ``{'state_dict': ...}`` holding only the ``backbone.*`` weights, prefix removed.

    Raises:
        CheckpointNotFoundError: unknown name, with close matches.
        CheckpointFormatError: the checkpoint has no ``backbone.*`` weights.
    """
    target = resolve_zoo_name("mmcls", filename.split("://", 1)[1])
    logger.debug("%s resolves to %s", filename, target)
    checkpoint = _load_resolved(target, map_location, trust_pickle, check_hash)
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state_dict, Mapping):
        raise CheckpointFormatError(f"{filename} ({target}) holds no state dict")
    backbone = OrderedDict((k[len("backbone."):], v) for k, v in state_dict.items()
                           if isinstance(k, str) and k.startswith("backbone."))
    if not backbone:
        prefixes = sorted({str(k).split(".", 1)[0] for k in state_dict})[:10]
        raise CheckpointFormatError(f"{filename} has no 'backbone.*' weights (top-level prefixes: {prefixes})",
                                    "mmcls:// is for classifier checkpoints; load other files by URL or path")
    return {"state_dict": backbone}
