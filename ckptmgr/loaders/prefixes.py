"""Scheme prefixes: the one rule that tells a plain prefix from a regular expression, and their order.

OpenMMLab matches every registered prefix with ``re.match``, so code written
for it registers regular expressions such as ``r'(\\S+\\:)?s3://'``; most
prefixes, though, are plain strings (``'myfs://'``, ``'a/b'``), and some plain
strings hold characters a regex reads differently (``'weird+fs://bucket.v1/'``).
The rule:

* a compiled ``re.Pattern`` is a regular expression, matched with ``Pattern.match``;
* a string holding any of ``\\ ( ) [ ] { } * ? | ^ $`` is a regular expression,
  matched with ``re.match`` against the name as given;
* any other string is plain: the name must start with it, the ``scheme://``
  part compared case-insensitively. ``+``, ``.``, ``-``, ``:`` and ``/`` (all
  legal in a ``scheme://`` and in paths) never make a prefix a regex.

Priority: the longest prefix (its pattern text) is tried first, ties broken by
reverse alphabetical order, so ``'a/b/c'`` beats ``'a/b'`` and a long regex
beats a short literal. OpenMMLab sorts by reverse alphabetical order alone; the
two agree whenever one prefix extends another.
"""
from __future__ import annotations

import re
from typing import Pattern, Tuple, Union

__all__ = ["Prefix", "REGEX_CHARS", "is_regex", "text_of", "validate_prefix", "priority", "matches"]

Prefix = Union[str, Pattern[str]]

#: Characters that make a string prefix a regular expression.
REGEX_CHARS = frozenset("\\()[]{}*?|^$")


def is_regex(prefix: Prefix) -> bool:
    """True when ``prefix`` is matched as a regular expression (see the module docstring)."""
    return isinstance(prefix, re.Pattern) or any(ch in REGEX_CHARS for ch in prefix)


def text_of(prefix: Prefix) -> str:
    """The prefix as text (a pattern's source for a compiled regex)."""
    return prefix.pattern if isinstance(prefix, re.Pattern) else prefix


def validate_prefix(prefix: object) -> Prefix:
    """Check one prefix for registration.

    Returns:
        The prefix unchanged.

    Raises:
        TypeError: not a string or compiled pattern, or a regex that does not compile.
    """
    if isinstance(prefix, re.Pattern):
        if not isinstance(prefix.pattern, str):
            raise TypeError(f"regex prefixes must be str patterns, got {prefix!r}")
        return prefix
    if not isinstance(prefix, str):
        raise TypeError(f"prefixes must be strings or compiled regular expressions, got {prefix!r}")
    if is_regex(prefix):
        try:
            re.compile(prefix)
        except re.error as exc:
            raise TypeError(f"prefix {prefix!r} holds regex characters but is not a valid regular expression "
                            f"({exc}); pass re.escape(prefix) to match it literally") from exc
    return prefix


def priority(prefix: Prefix) -> Tuple[int, str]:
    """Sort key: sort with ``reverse=True`` to try the longest prefix first."""
    text = text_of(prefix)
    return len(text), text


def matches(prefix: Prefix, name: str, normalized: str) -> bool:
    """Whether ``name`` falls under ``prefix``.

    Args:
        prefix: A registered prefix.
        name: The path or URL as given.
        normalized: ``name`` with its ``scheme://`` lower-cased (for plain prefixes).
    """
    if isinstance(prefix, re.Pattern):
        return prefix.match(name) is not None
    if is_regex(prefix):
        return re.match(prefix, name) is not None
    return name.startswith(prefix) or normalized.startswith(prefix)
