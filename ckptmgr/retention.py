"""Which checkpoints to keep: small pure policies, combined any-of.

Retention decides over a list of committed checkpoints (step and metrics) and
never touches storage, so every rule can be tested on synthetic step lists and
the manager's deletion code stays a dumb loop. A checkpoint survives when any
policy keeps it or when the caller protects it (the one just saved, the one
this run restored from while it is the newest).
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

from .faults import fault_point
from .step.index import CheckpointInfo

logger = logging.getLogger(__name__)

__all__ = ["CheckpointInfo", "Policy", "uncommit_dropped", "KeepLast", "KeepEvery", "KeepBest", "KeepAll", "AnyOf",
           "build_policy", "steps_to_delete", "best_of", "label", "kept_summary", "DEFAULT_MAX_TO_KEEP",
           "RetentionSettings", "resolve_settings"]


class Policy:
    """A retention rule: :meth:`keep` returns the steps it wants to keep."""

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> Set[int]:  # pragma: no cover - interface
        """Steps to keep among ``checkpoints``."""
        raise NotImplementedError


@dataclass(frozen=True)
class KeepAll(Policy):
    """Keep everything (``max_to_keep=None``)."""

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> Set[int]:
        """Every step."""
        return {c.step for c in checkpoints}


@dataclass(frozen=True)
class KeepLast(Policy):
    """Keep the ``n`` highest steps."""

    n: int

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> Set[int]:
        """The ``n`` newest steps."""
        return set(sorted({c.step for c in checkpoints}, reverse=True)[: self.n])


@dataclass(frozen=True)
class KeepEvery(Policy):
    """Keep every step divisible by ``n`` (milestones such as every 10000 steps)."""

    n: int

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> Set[int]:
        """Steps that are multiples of ``n``."""
        return {c.step for c in checkpoints if c.step % self.n == 0}


def _metric(info: CheckpointInfo, name: str) -> Optional[float]:
    value = info.metrics.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def best_of(checkpoints: Iterable[CheckpointInfo], metric: str, mode: str = "min") -> List[int]:
    """Steps ranked best first by ``metric``; checkpoints without a finite value are left out.

    Ties go to the newer step.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    scored: List[Tuple[float, int]] = []
    for info in checkpoints:
        value = _metric(info, metric)
        if value is not None:
            scored.append((value if mode == "min" else -value, -info.step))
    return [-neg_step for _, neg_step in sorted(scored)]


@dataclass(frozen=True)
class KeepBest(Policy):
    """Keep the ``k`` best checkpoints by ``metric`` (``mode`` 'min' or 'max')."""

    metric: str
    k: int
    mode: str = "min"

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> Set[int]:
        """The ``k`` best steps that have the metric."""
        return set(best_of(checkpoints, self.metric, self.mode)[: self.k])


@dataclass(frozen=True)
class AnyOf(Policy):
    """Keep a step when any of ``policies`` keeps it."""

    policies: Tuple[Policy, ...]

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> Set[int]:
        """Union of what every policy keeps."""
        kept: Set[int] = set()
        for policy in self.policies:
            kept |= policy.keep(checkpoints)
        return kept


def build_policy(max_to_keep: Optional[int] = 5, keep_every_n_steps: Optional[int] = None,
                 best_metric: Optional[str] = None, best_mode: str = "min", keep_best: int = 0) -> Policy:
    """The policy of a CheckpointManager's arguments.

    Args:
        max_to_keep: Keep this many newest checkpoints (None: keep all).
        keep_every_n_steps: Also keep every step divisible by this.
        best_metric: Metric name for ``keep_best``.
        best_mode: ``'min'`` (lower is better) or ``'max'``.
        keep_best: Also keep this many best checkpoints by ``best_metric``.

    Returns:
        An :class:`AnyOf` of the requested rules.

    Raises:
        ValueError: a count is out of range, ``best_mode`` is unknown, or
            ``keep_best`` is set without ``best_metric``.
    """
    for name, value in (("max_to_keep", max_to_keep), ("keep_every_n_steps", keep_every_n_steps)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    if best_mode not in ("min", "max"):
        raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
    if isinstance(keep_best, bool) or not isinstance(keep_best, int) or keep_best < 0:
        raise ValueError(f"keep_best must be an int >= 0, got {keep_best!r}")
    if keep_best and not best_metric:
        raise ValueError("keep_best needs best_metric (the metric name to rank checkpoints by)")
    policies: List[Policy] = [KeepAll() if max_to_keep is None else KeepLast(max_to_keep)]
    if keep_every_n_steps:
        policies.append(KeepEvery(keep_every_n_steps))
    if keep_best and best_metric:
        policies.append(KeepBest(best_metric, keep_best, best_mode))
    return AnyOf(tuple(policies))


def label(rule: Policy) -> str:
    """A rule in words, as listings show it: ``'last 3'``, ``'every 1000'``, ``'best 2 by loss'``, ``'all'``."""
    if isinstance(rule, KeepAll):
        return "all"
    if isinstance(rule, KeepLast):
        return f"last {rule.n}"
    if isinstance(rule, KeepEvery):
        return f"every {rule.n}"
    if isinstance(rule, KeepBest):
        return f"best {rule.k} by {rule.metric}"
    return type(rule).__name__


def kept_summary(policy: Policy, checkpoints: Sequence[CheckpointInfo]) -> str:
    """What each rule of ``policy`` keeps among ``checkpoints``: ``'last 2: steps 5, 6; best 1 by loss: step 2'``."""
    parts = []
    for rule in policy.policies if isinstance(policy, AnyOf) else (policy,):
        kept = sorted(rule.keep(checkpoints))
        what = (f"step{'s' * (len(kept) != 1)} {', '.join(map(str, kept))}" if kept
                else "nothing (no checkpoint has that metric)" if isinstance(rule, KeepBest) else "nothing")
        parts.append(f"{label(rule)}: {what}")
    return "; ".join(parts)


class _DefaultCount(int):
    """``max_to_keep``'s default (5), told apart from an explicit 5 by identity."""

    def __repr__(self) -> str:
        return "5"


#: The default of ``CheckpointManager(max_to_keep=...)``. A manager given no retention
#: argument at all adopts the policy recorded in its directory instead (see :func:`resolve_settings`).
DEFAULT_MAX_TO_KEEP: int = _DefaultCount(5)


@dataclass(frozen=True)
class RetentionSettings:
    """A manager's retention arguments, as recorded in each manifest it commits (``manifest.retention``)."""

    max_to_keep: Optional[int] = 5
    keep_every_n_steps: Optional[int] = None
    best_metric: Optional[str] = None
    best_mode: str = "min"
    keep_best: int = 0

    def policy(self) -> Policy:
        """The rules these settings keep by (see :func:`build_policy`)."""
        return build_policy(self.max_to_keep, self.keep_every_n_steps, self.best_metric, self.best_mode,
                            self.keep_best)

    def to_json(self) -> Dict[str, Any]:
        """The settings as the manifest records them (plain ints, even for the default)."""
        data = asdict(self)
        data["max_to_keep"] = None if self.max_to_keep is None else int(self.max_to_keep)
        return data

    @classmethod
    def from_json(cls, data: Optional[Mapping[str, Any]]) -> Optional["RetentionSettings"]:
        """Settings read back from a manifest; None when there are none or they do not make a valid policy."""
        if not isinstance(data, Mapping):
            return None
        try:
            settings = cls(**{k: data[k] for k in ("max_to_keep", "keep_every_n_steps", "best_metric", "best_mode",
                                                   "keep_best") if k in data})
            settings.policy()
        except (TypeError, ValueError):
            return None
        return settings

    def describe(self) -> str:
        """The rules in words: ``'last 3, every 1000, best 1 by loss (min)'``."""
        policy = self.policy()
        rules = policy.policies if isinstance(policy, AnyOf) else (policy,)
        text = ", ".join(label(rule) for rule in rules)
        return f"{text} ({self.best_mode})" if self.keep_best else text


def resolve_settings(requested: Optional[RetentionSettings], recorded: Optional[Mapping[str, Any]],
                     where: str) -> RetentionSettings:
    """The settings a manager keeps checkpoints by: the caller's, else the ones recorded with the run.

    A manager given no retention argument (``requested`` None) adopts the
    policy the directory's newest manifest records, so a bare
    ``CheckpointManager(dir)`` opened to restore and save never imposes its
    default ``max_to_keep=5`` on a run that kept more; with nothing recorded
    (a new directory, or one written by ckptmgr 0.1) the defaults apply.
    Explicit arguments always win; a change from the recorded policy is logged.
    """
    previous = RetentionSettings.from_json(recorded)
    if requested is None:
        if previous is None:
            return RetentionSettings()
        logger.info("%s: keeping checkpoints by the retention policy recorded with the run: %s", where,
                    previous.describe())
        return previous
    if previous is not None and previous != requested:
        logger.info("%s: retention policy changes from %s (recorded with the run) to %s", where,
                    previous.describe(), requested.describe())
    return requested


def steps_to_delete(checkpoints: Sequence[CheckpointInfo], policy: Policy,
                    protected: Iterable[int] = ()) -> List[int]:
    """Steps the policy drops, oldest first; ``protected`` steps are never dropped."""
    keep = policy.keep(checkpoints) | set(protected)
    return sorted(c.step for c in checkpoints if c.step not in keep)


def uncommit_dropped(index: Any, lock: Any, policy: Policy, saved: int, restored: Optional[int],
                     protocol: Any) -> List[Any]:
    """Uncommit every step of ``index`` the policy drops; return what frees their space.

    The step just saved is never dropped, nor the step this run restored from
    while it is the newest. Failures are logged, not raised: the new
    checkpoint is committed, and the next save tries the deletes again.

    Args:
        index: The directory's :class:`~ckptmgr.step.index.StepIndex` (read and updated under ``lock``).
        lock: The lock guarding ``index``.
        policy: The retention policy.
        saved: The step just committed.
        restored: The step this run restored from, if any.
        protocol: The directory's :class:`~ckptmgr.step.commit.CommitProtocol`.
    """
    with lock:
        known = index.known()
    keep = {saved} | ({restored} if restored is not None and known and restored == max(known) else set())
    reclaims = []
    for step in steps_to_delete(list(known.values()), policy, keep):
        try:
            reclaims.append(protocol.uncommit(step))
        except Exception as exc:  # the new checkpoint is committed; deleting can wait
            logger.warning("retention could not delete step %d: %s", step, exc)
            continue
        with lock:
            index.discard(step)
        logger.info("retention deleted checkpoint step %d", step)
        fault_point("retention.between_deletes")
    return reclaims
