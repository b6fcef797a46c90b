"""Which checkpoints one manager keeps: the retention settings in force, and the best step.

A run's retention rule belongs to the run, not to whichever process opens its
directory next: every manifest records the settings of the manager that
committed it. A manager given retention arguments keeps by them; one given
none (``CheckpointManager(dir)`` opened to restore, a notebook, a second
process) adopts the settings recorded with the run instead of imposing its
default ``max_to_keep=5`` (see :func:`ckptmgr.retention.resolve_settings`).
The lookup costs one listing, made the first time the settings are needed.
"""
from __future__ import annotations

import threading
from typing import Any, Dict, Optional

from .retention import DEFAULT_MAX_TO_KEEP, Policy, RetentionSettings, best_of, build_policy, resolve_settings
from .step.index import StepIndex

__all__ = ["Keeping"]


class Keeping:
    """The retention settings of one manager and the questions they answer.

    Args:
        index: The manager's step index (its listing and manifests).
        lock: The lock that guards ``index``.
        where: The directory, for messages.
        max_to_keep, keep_every_n_steps, best_metric, best_mode, keep_best: As given to the manager.

    Raises:
        ValueError: an argument is out of range (see :func:`ckptmgr.retention.build_policy`).
    """

    def __init__(self, index: StepIndex, lock: "threading.RLock", where: str, max_to_keep: Optional[int],
                 keep_every_n_steps: Optional[int], best_metric: Optional[str], best_mode: str, keep_best: int) -> None:
        build_policy(max_to_keep, keep_every_n_steps, best_metric, best_mode, keep_best)
        given = (max_to_keep is not DEFAULT_MAX_TO_KEEP or keep_every_n_steps is not None or best_metric is not None
                 or best_mode != "min" or keep_best != 0)
        self.requested = (RetentionSettings(max_to_keep, keep_every_n_steps, best_metric, best_mode, keep_best)
                          if given else None)
        self._index, self._lock, self._where = index, lock, where
        self._settings: Optional[RetentionSettings] = None

    @property
    def settings(self) -> RetentionSettings:
        """The settings in force: the ones given, else the ones recorded with the run, else the defaults."""
        if self._settings is None:
            with self._lock:
                self._index.refresh()
        return self.resolve()

    def resolve(self) -> RetentionSettings:
        """:attr:`settings`, decided from what the index knows now (the caller refreshed it)."""
        if self._settings is None:
            with self._lock:
                self._settings = resolve_settings(self.requested, self._index.recorded_retention(), self._where)
        return self._settings

    @property
    def known(self) -> RetentionSettings:
        """The settings as far as they are known without a lookup (for advice before the first save)."""
        return self._settings or self.requested or RetentionSettings()

    @property
    def policy(self) -> Policy:
        """The rules of :attr:`settings`."""
        return self.settings.policy()

    def record(self) -> Dict[str, Any]:
        """What a manifest records (the settings in force)."""
        return self.settings.to_json()

    def best_step(self) -> Optional[int]:
        """The committed step with the best ``best_metric`` (ties: the newer), or None."""
        settings = self.settings
        if not settings.best_metric:
            return None
        with self._lock:
            infos = list(self._index.refresh().values())
        ranked = best_of(infos, settings.best_metric, settings.best_mode)
        return ranked[0] if ranked else None

    def describe(self) -> str:
        """The settings in words, or where they will come from."""
        settings = self._settings or self.requested
        return settings.describe() if settings else "as recorded with the run"
