"""One model or several: the ``model=`` argument of a save or restore, normalised.

A GAN has a generator and a discriminator, distillation a teacher and a
student, many runs an EMA copy: ``model=`` takes one module or a dict name ->
module. Each name becomes part of a file name (``model-<name>.safetensors``)
and, for a sharded save, a key of the ``nn.ModuleDict`` DCP sees, so names are
restricted to letters, digits, ``_`` and ``-``.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Tuple, Union

from torch import nn

__all__ = ["SINGLE_NAME", "ModelArg", "as_models", "check_model", "modules_of", "dcp_module"]

#: What ``model=`` accepts.
ModelArg = Union[nn.Module, Mapping[str, nn.Module]]

#: The name a model passed as one module goes by (its file is ``model.safetensors``).
SINGLE_NAME = "model"

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,99}$")


def as_models(model: Any) -> Tuple[bool, Dict[str, nn.Module]]:
    """``(single, {name: module})`` for one module or a dict name -> module.

    Raises:
        TypeError: ``model`` is neither a module nor a non-empty dict of str -> module.
        ValueError: a name cannot be used in a file name.
    """
    if isinstance(model, nn.Module):
        return True, {SINGLE_NAME: model}
    if isinstance(model, Mapping) and model and all(isinstance(k, str) and isinstance(v, nn.Module)
                                                    for k, v in model.items()):
        bad = [k for k in model if not _NAME.match(k)]
        if bad:
            raise ValueError(f"model names {bad} cannot be used in file names: use letters, digits, '_' and '-' "
                             "(at most 100)")
        return False, dict(model)
    raise TypeError(f"model must be an nn.Module or a non-empty dict of str -> nn.Module, got "
                    f"{type(model).__name__}")


def check_model(model: Any) -> Any:
    """Validate ``model`` (see :func:`as_models`) and return it unchanged."""
    as_models(model)
    return model


def modules_of(model: Any) -> List[nn.Module]:
    """The modules of one module or a dict of them."""
    return list(as_models(model)[1].values())


def dcp_module(model: Any) -> nn.Module:
    """The one module DCP reads and writes: the model itself, or an ``nn.ModuleDict`` of the named models.

    In a ``ModuleDict`` every model's keys start with its name
    (``generator.net.0.weight``), and DCP finds each optimizer's parameters
    in whichever model holds them.
    """
    single, models = as_models(model)
    return models[SINGLE_NAME] if single else nn.ModuleDict(models)
