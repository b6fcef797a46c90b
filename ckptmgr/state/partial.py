"""Part of a model in a checkpoint: frozen parameters left out of a save, keys and components left out of a restore.

Fine-tuning changes how much of a checkpoint matters. A LoRA or adapter run
trains a few parameters on top of a frozen base that never changes, so its
saves need not hold the base (``CheckpointManager(save_frozen=False)``): the
step's manifest then records the names and shapes of the parameters left out
(:data:`FROZEN`), and a restore checks the live model's parameters against
that record instead of calling them missing. A run with a new head or a new
optimizer restores everything but those (``restore(exclude=...)``,
:class:`Exclusion`). This module holds both rules; it does no I/O.
"""
from __future__ import annotations

import logging
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, Iterable, List, Mapping, Optional, Pattern, Tuple

from torch import nn

from ..errors import CheckpointFormatError, CorruptCheckpointError, FrozenParametersError, KeyMismatchError
from .modules import LoadReport, get_state_dict, load_state_dict

logger = logging.getLogger(__name__)

__all__ = ["FROZEN", "COMPONENT_NAMES", "PATTERN_PREFIX", "trainable_state", "frozen_record", "check_frozen",
           "Exclusion", "NOTHING", "apply_model_state"]

#: Manifest component recording the parameters a save left out: ``{"params": {key: shape}}``.
FROZEN = "frozen"
#: What ``restore(exclude=...)`` may name (besides ``re:`` model-key patterns).
COMPONENT_NAMES = ("model", "optimizer", "scheduler", "scaler", "extra", "rng", "rank_state")
#: Prefix of a model-key pattern in ``exclude``.
PATTERN_PREFIX = "re:"

Shapes = Dict[str, List[int]]

# --------------------------------------------------------------------------- frozen parameters


def trainable_state(model: nn.Module) -> Tuple["OrderedDict[str, Any]", Dict[str, Any], Shapes]:
    """The model's state without its frozen parameters: trainable parameters, buffers and extra state.

    Args:
        model: The model, wrapped or not.

    Returns:
        ``(state dict, module metadata, {key: shape} of the parameters left out)``;
        keys are the bare model's.
    """
    full = get_state_dict(model, keep_vars=True)
    state: "OrderedDict[str, Any]" = OrderedDict()
    frozen: Shapes = {}
    for key, value in full.items():
        if isinstance(value, nn.Parameter) and not value.requires_grad:
            frozen[key] = list(value.shape)
        else:
            state[key] = value.detach() if hasattr(value, "detach") else value
    meta = {k: dict(v) for k, v in getattr(full, "_metadata", {}).items() if isinstance(v, Mapping)}
    return state, meta, frozen


def frozen_record(components: Mapping[str, Any], model: Optional[str] = None) -> Optional[Shapes]:
    """The parameters a step's save left out, from its manifest's components (None: it holds every parameter).

    A single model's record is ``{"params": {key: shape}}``; a dict of models
    records each by name, ``{"models": {name: {key: shape}}}``.

    Args:
        components: The manifest's components.
        model: The model's name in a dict of models (None for a single model).

    Raises:
        CorruptCheckpointError: the record is malformed.
    """
    record = components.get(FROZEN)
    if record is None:
        return None
    if not isinstance(record, Mapping):
        raise CorruptCheckpointError(f"the manifest's record of frozen parameters is malformed: {record!r}")
    if model is not None and "models" in record:
        by_model = record["models"]
        params = by_model.get(model) if isinstance(by_model, Mapping) else None
        if params is None and isinstance(by_model, Mapping):
            return None  # that model was saved whole
    else:
        params = record.get("params")
    if not isinstance(params, Mapping) or not all(
            isinstance(k, str) and isinstance(s, list) and all(isinstance(d, int) for d in s)
            for k, s in params.items()):
        raise CorruptCheckpointError(f"the manifest's record of frozen parameters is malformed: {record!r}")
    return {k: list(s) for k, s in params.items()}


def check_frozen(model_shapes: Mapping[str, List[int]], record: Shapes, strict: bool) -> None:
    """The model must have every parameter the save left out, with the recorded shape.

    Args:
        model_shapes: The live model's keys and shapes.
        record: What :func:`frozen_record` returned.
        strict: Raise on a difference (otherwise a warning).

    Raises:
        FrozenParametersError: ``strict`` and a recorded parameter is absent or has another shape.
    """
    problems = []
    for key, shape in record.items():
        have = model_shapes.get(key)
        if have is None:
            problems.append(f"{key}: absent from the model (saved shape {tuple(shape)})")
        elif list(have) != list(shape):
            problems.append(f"{key}: model shape {tuple(have)}, the checkpoint's base had {tuple(shape)}")
    if not problems:
        return
    message = (f"this checkpoint was saved without its {len(record)} frozen parameters, and the model's "
               f"differ from the ones it was trained on ({len(problems)} problems):\n" + "\n".join(problems[:20]))
    if strict:
        raise FrozenParametersError(message)
    logger.warning("%s", message)


# --------------------------------------------------------------------------- exclusion


@dataclass(frozen=True)
class Exclusion:
    """What a restore leaves untouched: whole components and model keys matching patterns.

    Attributes:
        components: Names from :data:`COMPONENT_NAMES`.
        patterns: Compiled ``re:`` patterns, matched with ``re.search`` against bare model keys.
    """

    components: FrozenSet[str] = frozenset()
    patterns: Tuple[Pattern[str], ...] = ()

    @classmethod
    def parse(cls, exclude: Any) -> "Exclusion":
        """Read ``restore(exclude=...)``: a name, or an iterable of names and ``'re:PATTERN'`` strings.

        Raises:
            CheckpointFormatError: an entry is not a known component name or a valid ``re:`` pattern.
        """
        if not exclude:
            return cls()
        entries: Iterable[Any] = [exclude] if isinstance(exclude, str) else exclude
        names, patterns = set(), []
        for entry in entries:
            if isinstance(entry, str) and entry.startswith(PATTERN_PREFIX):
                try:
                    patterns.append(re.compile(entry[len(PATTERN_PREFIX):]))
                except re.error as exc:
                    raise CheckpointFormatError(f"exclude: {entry!r} is not a valid regular expression ({exc})",
                                                "write model-key patterns as 're:^head\\\\.'") from None
            elif entry in COMPONENT_NAMES:
                names.add(entry)
            else:
                raise CheckpointFormatError(f"exclude: unknown entry {entry!r}",
                                            f"name components ({', '.join(COMPONENT_NAMES)}) or model keys as "
                                            "'re:PATTERN'")
        return cls(frozenset(names), tuple(patterns))

    def __bool__(self) -> bool:
        return bool(self.components or self.patterns)

    def drops(self, component: str) -> bool:
        """True when the whole ``component`` is left untouched."""
        return component in self.components

    def drops_key(self, key: str) -> bool:
        """True when the model key ``key`` is left untouched."""
        return any(p.search(key) for p in self.patterns)

    def filter_model(self, state: Mapping[str, Any]) -> Tuple["OrderedDict[str, Any]", List[str]]:
        """``(state without the excluded keys (module metadata kept), the excluded keys)``."""
        kept: "OrderedDict[str, Any]" = OrderedDict()
        dropped = []
        for key, value in state.items():
            if self.drops_key(key):
                dropped.append(key)
            else:
                kept[key] = value
        if hasattr(state, "_metadata"):
            kept._metadata = state._metadata  # type: ignore[attr-defined]
        return kept, dropped

    def log_components(self, what: str) -> None:
        """Log, at INFO, the components ``what`` (a restore of a step) leaves untouched."""
        if self.components:
            logger.info("%s: left untouched (exclude): %s", what, ", ".join(sorted(self.components)))

    def log_keys(self, what: str, keys: Iterable[str]) -> None:
        """Log, at INFO, the model keys ``what`` leaves untouched because a pattern matched them."""
        if not self.patterns:
            return
        keys = sorted(keys)
        listed = ", ".join(keys[:50]) + (f" and {len(keys) - 50} more" if len(keys) > 50 else "")
        patterns = ", ".join(PATTERN_PREFIX + p.pattern for p in self.patterns)
        logger.info("%s: model keys left untouched (exclude %s): %s", what, patterns, listed or "(none matched)")


NOTHING = Exclusion()


# --------------------------------------------------------------------------- applying part of a model


def apply_model_state(model: nn.Module, state: Mapping[str, Any], module_meta: Optional[Mapping[str, Any]],
                      strict: bool, *, frozen: Optional[Shapes] = None, exclusion: Exclusion = NOTHING,
                      what: str = "restore") -> LoadReport:
    """Load the part of ``state`` that is not excluded; the frozen and excluded keys are not missing.

    Args:
        model: The model, wrapped or not.
        state: Bare keys -> tensors (what the step holds).
        module_meta: Module versions (``state_dict._metadata``).
        strict: Raise on missing (other than frozen or excluded), unexpected or mis-shaped keys.
        frozen: The step's record of parameters its save left out (see :func:`frozen_record`).
        exclusion: Model keys to leave untouched.
        what: Names the operation in the log.

    Returns:
        The :class:`LoadReport` (frozen and excluded keys removed from ``missing_keys``).

    Raises:
        FrozenParametersError: ``strict`` and the model's parameters differ from ``frozen``.
        KeyMismatchError: ``strict`` and the rest does not match.
    """
    shapes = {k: list(v.shape) for k, v in get_state_dict(model).items() if hasattr(v, "shape")}
    if frozen:
        check_frozen(shapes, frozen, strict)
    kept, dropped = exclusion.filter_model(state)
    exclusion.log_keys(what, dropped)
    if module_meta:
        kept._metadata = OrderedDict(module_meta)  # type: ignore[attr-defined]
    allowed = set(frozen or ()) | {k for k in shapes if exclusion.drops_key(k)}
    report = load_state_dict(model, kept, strict=False, logger="silent")
    report.missing_keys = [k for k in report.missing_keys if k not in allowed]
    if strict and not report.ok:
        raise KeyMismatchError("state_dict does not match the model:\n" + report.summary())
    return report
