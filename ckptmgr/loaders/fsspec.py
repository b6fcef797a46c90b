"""Loader for any URL fsspec can open (``s3://``, ``gs://``, ``memory://``, ...).

Credentials come from ``storage_options`` and, for S3, from the standard
``AWS_*`` environment variables that botocore reads (including ``AWS_ENDPOINT_URL``).
OpenMMLab names S3 objects ``cluster:s3://bucket/key`` (petrel picks the
cluster from the name); the cluster part is dropped, since fsspec's endpoint
comes from the environment or ``storage_options``.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Optional

from ..format.maplocation import MapLocation
from ..io.access import isdir
from ..io.store import Options
from ..io.uri import has_scheme
from .local import load_directory, load_file

logger = logging.getLogger(__name__)

__all__ = ["load_from_fsspec"]

_CLUSTER = re.compile(r"^\S+?:(?=s3://)", re.IGNORECASE)


def _drop_cluster(filename: str) -> str:
    if has_scheme(filename):
        return filename
    match = _CLUSTER.match(filename)
    if match is None:
        return filename
    logger.debug("%s: the cluster name %r is dropped; the S3 endpoint comes from AWS_ENDPOINT_URL or "
                 "storage_options", filename, match.group(0)[:-1])
    return filename[match.end():]


def load_from_fsspec(filename: str, map_location: MapLocation = None, trust_pickle: bool = False,
                     storage_options: Options = None, model_name: Optional[str] = None) -> Any:
    """Load a checkpoint file or manager directory from an fsspec URL (or OpenMMLab's ``cluster:s3://...``).

    ``model_name`` picks one model of a manager step saved with a dict of models.

    Raises:
        MissingDependencyError: the protocol's backend (e.g. gcsfs) is not installed.
        CheckpointNotFoundError: nothing exists at the URL.
    """
    filename = _drop_cluster(filename)
    if isdir(filename, storage_options):
        return load_directory(filename, map_location=map_location, storage_options=storage_options,
                              model_name=model_name)
    return load_file(filename, map_location=map_location, trust_pickle=trust_pickle,
                     storage_options=storage_options)
