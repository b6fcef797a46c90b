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
from dataclasses import dataclass
from typing import Any, Iterable, List, Optional, Sequence, Set, Tuple

from .faults import fault_point
from .step.index import CheckpointInfo

logger = logging.getLogger(__name__)

__all__ = ["CheckpointInfo", "Policy", "uncommit_dropped", "KeepLast", "KeepEvery", "KeepBest", "KeepAll", "AnyOf",
           "build_policy", "steps_to_delete", "best_of"]


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
