"""Changing the dtype of a state dict's floating-point tensors, for hand-off to inference.

Inference rarely wants the fp32 master weights a run trains with: releases
are bf16 or fp16, half the bytes. Only floating-point tensors change; integer
and boolean entries (BatchNorm's ``num_batches_tracked``, index buffers) keep
their dtype, since casting them would change what they mean.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping, Optional, Union

import torch

__all__ = ["DTYPES", "parse_dtype", "cast_floating"]

#: Names accepted for ``dtype`` (``--dtype``), as torch spells them and the usual short forms.
DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}


def parse_dtype(dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    """A floating-point ``torch.dtype`` from a name (``'bfloat16'``, ``'torch.float16'``, ``'fp16'``) or a dtype.

    Raises:
        ValueError: not a floating-point dtype this module knows.
    """
    if dtype is None or isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not a floating-point dtype; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def cast_floating(state: Mapping[str, Any], dtype: Optional[torch.dtype]) -> "OrderedDict[str, Any]":
    """A copy of ``state`` with every floating-point tensor in ``dtype`` (others, and ``_metadata``, kept).

    Args:
        state: Key -> value (a state dict).
        dtype: The target dtype; None returns the entries unchanged.

    Returns:
        A new OrderedDict (tensors already in ``dtype`` are not copied).
    """
    out: "OrderedDict[str, Any]" = OrderedDict(
        (k, v.to(dtype) if dtype is not None and isinstance(v, torch.Tensor) and v.is_floating_point() else v)
        for k, v in state.items())
    if hasattr(state, "_metadata"):
        out._metadata = state._metadata  # type: ignore[attr-defined]
    return out
