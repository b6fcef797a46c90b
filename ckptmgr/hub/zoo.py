"""Model-zoo names: short names that resolve to a download URL (or a local file), and nothing more.

* ``torchvision://NAME`` (and the deprecated ``modelzoo://NAME``) ask the
  installed torchvision's weights API, so new torchvision releases bring new
  names without a table to maintain here;
* ``open-mmlab://NAME`` / ``openmmlab://NAME`` and ``mmcls://NAME`` look NAME up
  in JSON tables shipped in ``ckptmgr/hub/data/``, extended and overridden by
  the user's ``$CKPTMGR_HOME/open_mmlab.json`` and ``$CKPTMGR_HOME/mmcls.json``.

Loading the resolved URL is the loader registry's job (:mod:`ckptmgr.loaders.zoo`).
"""
from __future__ import annotations

import difflib
import functools
import json
import logging
import os
import warnings
from typing import Dict, Iterable, List

from ..errors import CheckpointFormatError, CheckpointNotFoundError
from ..io.uri import has_scheme
from .cache import ckptmgr_home

logger = logging.getLogger(__name__)

__all__ = ["resolve_torchvision", "zoo_table", "resolve_zoo_name", "resolve"]

_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

# Names from torchvision's old ``model_urls`` dicts that differ from today's model names.
_TORCHVISION_ALIASES = {
    "inception_v3_google": "inception_v3",
    "shufflenetv2_x0.5": "shufflenet_v2_x0_5",
    "shufflenetv2_x1.0": "shufflenet_v2_x1_0",
    "shufflenetv2_x1.5": "shufflenet_v2_x1_5",
    "shufflenetv2_x2.0": "shufflenet_v2_x2_0",
}


def _unknown(scheme: str, name: str, candidates: Iterable[str]) -> CheckpointNotFoundError:
    close = difflib.get_close_matches(name, sorted(set(candidates)), n=5, cutoff=0.5)
    suggestion = f"close matches: {', '.join(close)}" if close else "no similar name is known"
    return CheckpointNotFoundError(f"unknown {scheme}:// name {name!r} ({suggestion})",
                                   f"use one of the known names, or add it to {_user_table_hint(scheme)}")


def _user_table_hint(scheme: str) -> str:
    if scheme == "torchvision":
        return "a newer torchvision (this name comes from torchvision's weights API)"
    return os.path.join(ckptmgr_home(), _TABLES[scheme][0])


# --------------------------------------------------------------------------- torchvision


@functools.lru_cache(maxsize=1)
def _torchvision_weight_names() -> List[str]:
    import torchvision.models as tvm
    names = []
    for model in tvm.list_models():
        enum = tvm.get_model_weights(model)
        names += [model] + [f"{enum.__name__}.{member}" for member in enum.__members__]
    return names + list(_TORCHVISION_ALIASES)


def resolve_torchvision(name: str) -> str:
    """The download URL of a torchvision weights name.

    Args:
        name: An old-style model name (``'resnet50'``, ``'vgg16'``: the
            ``IMAGENET1K_V1`` weights those names always meant, or the model's
            default weights when it has no such entry) or an explicit enum name
            (``'ResNet50_Weights.IMAGENET1K_V2'``).

    Returns:
        The URL torchvision downloads those weights from.

    Raises:
        CheckpointNotFoundError: torchvision knows no such name; lists close matches.
    """
    import torchvision.models as tvm  # imported here: it takes seconds
    if "." in name and "_Weights." in name:
        try:
            return tvm.get_weight(name).url
        except (ValueError, KeyError, AttributeError):
            raise _unknown("torchvision", name, _torchvision_weight_names()) from None
    model = _TORCHVISION_ALIASES.get(name.lower(), name.lower())
    try:
        enum = tvm.get_model_weights(model)
    except (ValueError, KeyError):
        raise _unknown("torchvision", name, _torchvision_weight_names()) from None
    weights = enum.__members__.get("IMAGENET1K_V1") or enum.DEFAULT
    return weights.url


# scheme -> (table file name, deprecated-names file name or None)
_TABLES = {"open-mmlab": ("open_mmlab.json", "open_mmlab_deprecated.json"), "mmcls": ("mmcls.json", None)}


def _read_table(path: str) -> Dict[str, str]:
    try:
        with open(path, encoding="utf-8") as fh:
            table = json.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointFormatError(f"cannot read the model-zoo table {path}: {exc}",
                                    'it must be a JSON object of "name": "URL or path" pairs') from exc
    if not isinstance(table, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in table.items()):
        raise CheckpointFormatError(f"model-zoo table {path} is not a JSON object of strings",
                                    'write it as {"name": "https://... or a path relative to CKPTMGR_HOME"}')
    return table


@functools.lru_cache(maxsize=None)
def _bundled(filename: str) -> Dict[str, str]:
    return _read_table(os.path.join(_DATA_DIR, filename))


def zoo_table(scheme: str) -> Dict[str, str]:
    """The name table of ``'open-mmlab'`` or ``'mmcls'``: bundled entries updated by the user's file.

    Raises:
        CheckpointFormatError: the user's table is not a JSON object of strings.
    """
    table_file, _ = _TABLES[scheme]
    table = dict(_bundled(table_file))
    table.update(_read_table(os.path.join(ckptmgr_home(), table_file)))
    return table


def resolve_zoo_name(scheme: str, name: str) -> str:
    """Resolve ``NAME`` of ``open-mmlab://NAME`` or ``mmcls://NAME`` to a URL or an absolute local path.

    A deprecated name warns (``DeprecationWarning``) and resolves as its
    replacement. A table value that is not a URL is a path relative to ``CKPTMGR_HOME``.

    Args:
        scheme: ``'open-mmlab'`` or ``'mmcls'``.
        name: The part after ``scheme://``.

    Returns:
        A URL, or an absolute local path.

    Raises:
        CheckpointNotFoundError: the name is in no table; lists close matches.
    """
    table_file, deprecated_file = _TABLES[scheme]
    table = zoo_table(scheme)
    if deprecated_file and name not in table:
        new = _bundled(deprecated_file).get(name)
        if new is not None:
            warnings.warn(f"{scheme}://{name} is deprecated, use {scheme}://{new} instead", DeprecationWarning,
                          stacklevel=4)
            name = new
    if name not in table:
        raise _unknown(scheme, name, table)
    value = table[name]
    if has_scheme(value):
        return value
    return os.path.join(ckptmgr_home(), os.path.expanduser(value))


def resolve(uri: str) -> str:
    """The URL (or path) a zoo URI stands for; any other URI is returned unchanged."""
    scheme, sep, name = uri.partition("://")
    scheme = scheme.lower()
    if not sep:
        return uri
    if scheme in ("torchvision", "modelzoo"):
        return resolve_torchvision(name)
    if scheme in ("open-mmlab", "openmmlab", "mmcls"):
        return resolve_zoo_name("mmcls" if scheme == "mmcls" else "open-mmlab", name)
    return uri
