"""Loader for any URL fsspec can open (``s3://``, ``gs://``, ``memory://``, ...).

Credentials come from ``storage_options`` and, for S3, from the standard
``AWS_*`` environment variables that botocore reads (including ``AWS_ENDPOINT_URL``).
"""
from __future__ import annotations

from typing import Any, Optional

from ..format.maplocation import MapLocation
from ..io.access import isdir
from ..io.store import Options
from .local import load_directory, load_file

__all__ = ["load_from_fsspec"]


def load_from_fsspec(filename: str, map_location: MapLocation = None, trust_pickle: bool = False,
                     storage_options: Options = None, model_name: Optional[str] = None) -> Any:
    """Load a checkpoint file or manager directory from an fsspec URL.

    ``model_name`` picks one model of a manager step saved with a dict of models.

    Raises:
        MissingDependencyError: the protocol's backend (e.g. gcsfs) is not installed.
        CheckpointNotFoundError: nothing exists at the URL.
    """
    if isdir(filename, storage_options):
        return load_directory(filename, map_location=map_location, storage_options=storage_options,
                              model_name=model_name)
    return load_file(filename, map_location=map_location, trust_pickle=trust_pickle,
                     storage_options=storage_options)
