"""OpenMMLab's storage settings (``file_client_args``, ``backend_args``) read as ckptmgr storage options.

mmcv 1.x (``file_client_args``, from 1.3.16) and mmengine (``backend_args``,
and ``file_client_args`` deprecated) pick a storage client by name. ckptmgr
picks storage from the URL and takes fsspec ``storage_options``; this module
maps the one onto the other so calls written for OpenMMLab keep working:

* ``None``, ``{}``, ``{'backend': 'disk'}`` (mmcv), ``{'backend': 'local'}``
  (mmengine): the path as it is, silently;
* ``{'backend': 'petrel' | 's3' | 'ceph'}`` (or ``{'prefix': 's3'}``): the ``s3://``
  URL through fsspec; ``path_mapping`` rewrites the name as petrel does, and
  ``endpoint_url`` (a ckptmgr extension: petrel reads its endpoint from its
  config file) becomes ``storage_options['endpoint_url']``;
* options with no ckptmgr meaning (``enable_mc``, ``conf_path``, the
  ``memcached``/``lmdb``/``http`` backends' settings): ignored with a
  ``DeprecationWarning`` that names ``storage_options``;
* both arguments at once, or an unknown backend: :class:`BackendArgumentError`
  (a ``ValueError``, as OpenMMLab raises).
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, Mapping, Optional, Tuple

from ..errors import BackendArgumentError

__all__ = ["apply_backend_args"]

_LOCAL = frozenset({"disk", "local"})
_S3 = frozenset({"petrel", "s3", "ceph"})
_OTHER = frozenset({"http", "https", "memcached", "lmdb"})


def _pick(file_client_args: Optional[Mapping[str, Any]],
          backend_args: Optional[Mapping[str, Any]]) -> Optional[Dict[str, Any]]:
    if file_client_args is not None and backend_args is not None:
        raise BackendArgumentError('"file_client_args" and "backend_args" cannot be set at the same time',
                                   "pass only backend_args (or, better, storage_options)")
    args = file_client_args if file_client_args is not None else backend_args
    if args is None:
        return None
    if not isinstance(args, Mapping):
        raise BackendArgumentError(f"file_client_args / backend_args must be a dict, got {type(args).__name__}")
    return dict(args)


def _map_path(filename: str, path_mapping: Any) -> str:
    if not isinstance(path_mapping, Mapping):
        raise BackendArgumentError(f"path_mapping must be a dict of prefix -> replacement, got {path_mapping!r}")
    for old, new in path_mapping.items():
        filename = filename.replace(str(old), str(new), 1)
    return filename


def apply_backend_args(filename: str, file_client_args: Optional[Mapping[str, Any]] = None,
                       backend_args: Optional[Mapping[str, Any]] = None,
                       storage_options: Optional[Dict[str, Any]] = None) -> Tuple[str, Optional[Dict[str, Any]]]:
    """The destination and storage options that OpenMMLab storage settings mean (see the module docstring).

    Args:
        filename: The path or URL as given.
        file_client_args: mmcv 1.x / mmengine ``FileClient`` arguments.
        backend_args: mmengine backend arguments.
        storage_options: ckptmgr's own fsspec options; they win over mapped ones.

    Returns:
        ``(filename, storage_options)`` to write with.

    Raises:
        BackendArgumentError: both arguments, a non-dict, or an unknown backend name.
    """
    args = _pick(file_client_args, backend_args)
    if not args:
        return filename, storage_options
    name = args.pop("backend", None) or args.pop("prefix", None)
    if name is not None and name not in _LOCAL | _S3 | _OTHER:
        raise BackendArgumentError(f"Backend {name} is not supported; ckptmgr understands "
                                   "'disk', 'local', 'petrel', 's3', 'ceph', 'http', 'memcached', 'lmdb'")
    options: Dict[str, Any] = {}
    if name in _S3:
        if "path_mapping" in args:
            mapping = args.pop("path_mapping")
            filename = _map_path(filename, mapping) if mapping is not None else filename
        if "endpoint_url" in args:
            options["endpoint_url"] = args.pop("endpoint_url")
    if args:
        warnings.warn(f"{sorted(args)} in file_client_args/backend_args (backend {name!r}) have no meaning in "
                      "ckptmgr and are ignored; pass storage_options= (fsspec options) instead",
                      DeprecationWarning, stacklevel=3)
    if options:
        options.update(storage_options or {})
        return filename, options
    return filename, storage_options
