"""Pure key remapping for state dicts: regex revisions and prefix selection.

Kept free of I/O and torch imports so the rules can be tested on plain dicts.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any, Callable, Iterable, Mapping, Sequence, Tuple

from ..errors import CheckpointFormatError, PrefixNotFoundError

__all__ = ["revise_keys", "select_prefix", "top_level_prefixes", "strip_compile_prefix"]

Rule = Tuple[str, str]


def _copy_metadata(src: Mapping[str, Any], dst: "OrderedDict[str, Any]", rename: Callable[[str], str]) -> None:
    meta = getattr(src, "_metadata", None)
    if meta is not None:
        dst._metadata = OrderedDict((rename(k), v) for k, v in meta.items())  # type: ignore[attr-defined]


def revise_keys(state_dict: Mapping[str, Any], rules: Iterable[Rule]) -> "OrderedDict[str, Any]":
    """Rename keys by applying each ``(pattern, replacement)`` regex rule in order.

    Module-version metadata (``_metadata``) is renamed the same way, so a
    ``module.`` prefix stripped from the keys is stripped from versions too.

    Args:
        state_dict: Mapping of key -> value.
        rules: ``re.sub`` pattern/replacement pairs, applied one after another.

    Returns:
        A new OrderedDict.

    Raises:
        TypeError: a rule is not a pair of strings.
    """
    compiled = []
    for rule in rules or ():
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and all(isinstance(r, str) for r in rule)):
            raise TypeError(f"revise_keys rules are (pattern, replacement) string pairs, got {rule!r}")
        compiled.append((re.compile(rule[0]), rule[1]))

    def rename(key: str) -> str:
        for pattern, repl in compiled:
            key = pattern.sub(repl, key)
        return key

    def rename_prefix(key: str) -> str:
        # Metadata keys are module prefixes without the trailing dot; rules are written
        # for parameter keys (r'^module\.'), so match them with the dot put back.
        dotted = rename(key + ".")
        if dotted == "" or dotted.endswith("."):
            return dotted[:-1]
        return rename(key)

    out: "OrderedDict[str, Any]" = OrderedDict((rename(k), v) for k, v in state_dict.items())
    _copy_metadata(state_dict, out, rename_prefix)
    return out


_COMPILED = re.compile(r"(^|\.)_orig_mod\.")


def strip_compile_prefix(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """Drop the ``_orig_mod.`` that ``torch.compile``'s wrapper adds, wherever it is in a key.

    ``compiled.state_dict()`` keys read ``_orig_mod.fc.weight`` (``_orig_mod.module.``
    when a DDP model was compiled, ``module._orig_mod.`` the other way round). No
    real submodule is called ``_orig_mod``, so removing it is always safe; a state
    dict without it is returned as it is.
    """
    if not any(isinstance(k, str) and "_orig_mod." in k for k in state_dict):
        return state_dict
    return revise_keys(state_dict, [(_COMPILED.pattern, r"\1")])


def top_level_prefixes(keys: Iterable[str]) -> Sequence[str]:
    """Sorted first components of dotted keys (``backbone.conv.w`` -> ``backbone``)."""
    return sorted({k.split(".", 1)[0] for k in keys if isinstance(k, str)})


def select_prefix(state_dict: Mapping[str, Any], prefix: str) -> "OrderedDict[str, Any]":
    """Return the entries under ``prefix.`` with the prefix removed.

    Args:
        state_dict: Mapping of key -> value.
        prefix: A key prefix; the trailing dot is optional (``'backbone'`` == ``'backbone.'``).

    Returns:
        A new OrderedDict of the matching entries.

    Raises:
        PrefixNotFoundError: no key starts with the prefix (also an ``AssertionError``, as
            OpenMMLab raises); the message lists the top-level prefixes.
        CheckpointFormatError: ``prefix`` is not a non-empty string.
    """
    if not isinstance(prefix, str) or not prefix.strip("."):
        raise CheckpointFormatError(f"prefix must be a non-empty string, got {prefix!r}", "pass e.g. 'backbone'")
    dotted = prefix if prefix.endswith(".") else prefix + "."
    out: "OrderedDict[str, Any]" = OrderedDict(
        (k[len(dotted):], v) for k, v in state_dict.items() if k.startswith(dotted))
    if not out:
        available = ", ".join(top_level_prefixes(state_dict.keys())) or "(no keys)"
        raise PrefixNotFoundError(
            f"{prefix} is not in the pretrained model: no key starts with '{dotted}'; "
            f"top-level prefixes in the checkpoint: {available}")
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:  # keep only the versions of modules under the prefix
        out._metadata = OrderedDict(  # type: ignore[attr-defined]
            (k[len(dotted):] if k.startswith(dotted) else "", v)
            for k, v in meta.items()
            if k.startswith(dotted) or k == dotted[:-1])
    return out
