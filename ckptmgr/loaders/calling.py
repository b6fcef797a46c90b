"""How a loader is called: ``loader(filename, map_location, **what it declares)``.

OpenMMLab calls every loader as ``loader(filename, map_location)``, by
position, so loaders written for it name their parameters as they like
(``def load(path, loc)``). ckptmgr's own options reach a loader only when it
declares them: ``trust_pickle`` and ``storage_options`` are framework keywords,
accepted always and dropped for loaders that do not take them; any other
keyword the chosen loader does not declare is a mistake (``map_locaton='cpu'``)
and raises, as Python raises for a function with a fixed signature.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Optional

from ..errors import UnexpectedKeywordError

__all__ = ["FRAMEWORK_KEYWORDS", "accepts_keyword", "loader_keywords"]

#: Keywords every loading function takes; passed on only to loaders that declare them.
FRAMEWORK_KEYWORDS = frozenset({"trust_pickle", "storage_options"})


def _keyword_names(loader: Callable[..., Any]) -> Optional[frozenset]:
    """Names ``loader`` takes by keyword, or None when it takes ``**kwargs`` (everything)."""
    try:
        params = list(inspect.signature(loader).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: it gets filename, map_location only
        return frozenset()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    # The first two parameters receive filename and map_location by position.
    positional = [p for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                  inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    taken = {p.name for p in positional[:2]}
    return frozenset(p.name for p in params
                     if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
                     and p.name not in taken)


def accepts_keyword(loader: Callable[..., Any], name: str) -> bool:
    """Whether ``loader`` can be given ``name=...`` (it declares it, or takes ``**kwargs``)."""
    names = _keyword_names(loader)
    return names is None or name in names


def loader_keywords(loader: Callable[..., Any], kwargs: Dict[str, Any], caller: str) -> Dict[str, Any]:
    """The keyword arguments to pass to ``loader``, after checking that none is unknown.

    Args:
        loader: The loader the registry chose.
        kwargs: The extra keywords the caller got.
        caller: The public function's name, for the error message.

    Returns:
        The subset of ``kwargs`` the loader declares (all of them for ``**kwargs`` loaders).

    Raises:
        UnexpectedKeywordError: (a ``TypeError``) a keyword neither ``caller`` nor the loader takes.
    """
    names = _keyword_names(loader)
    if names is None:
        return dict(kwargs)
    for key in kwargs:
        if key not in names and key not in FRAMEWORK_KEYWORDS:
            loader_name = getattr(loader, "__name__", repr(loader))
            raise UnexpectedKeywordError(
                f"{caller}() got an unexpected keyword argument {key!r} (the loader for this path, "
                f"{loader_name}, does not take it either)",
                "check the spelling; loader options such as check_hash only apply to the schemes whose "
                "loader declares them")
    return {k: v for k, v in kwargs.items() if k in names}
