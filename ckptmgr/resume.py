"""Resume from the latest good checkpoint in one call: the whole restart path of a training script.

A script that was preempted or crashed restarts with the same command; it
needs the step to continue from and its objects back as they were, or a
fresh start (optionally warm-started from other weights) when nothing is
committed yet.
"""
from __future__ import annotations

from typing import Any

from .manager import CheckpointManager
from .state.models import ModelArg
from .warmstart import DEFAULT_REVISE_KEYS

__all__ = ["resume_from_latest"]


def resume_from_latest(directory: Any, *, model: ModelArg, optimizer: Any = None, scheduler: Any = None,
                       scaler: Any = None, init_from: Any = None, **kwargs: Any) -> int:
    """Restore the latest good checkpoint of ``directory`` and return the step to continue from.

    Args:
        directory: A manager directory (local path or URL).
        model, optimizer, scheduler, scaler: Objects to restore (``model``: a module or a dict name -> module).
        init_from: Warm start source for a fresh run (see :class:`CheckpointManager`).
        **kwargs: ``extra``, ``rank_state``, ``on_world_size_change``, ``strict``, ``verify``,
            ``map_location``, ``exclude`` (see :meth:`CheckpointManager.restore`), ``storage_options``,
            ``signing_key``, ``local_dir`` and ``init_revise_keys``.

    Returns:
        Restored step + 1, or 0 when nothing is committed yet (after a warm start from ``init_from``).
    """
    rules = kwargs.pop("init_revise_keys", DEFAULT_REVISE_KEYS)
    with CheckpointManager(directory, max_to_keep=None, storage_options=kwargs.pop("storage_options", None),
                           init_from=init_from, init_revise_keys=rules,
                           signing_key=kwargs.pop("signing_key", None),
                           local_dir=kwargs.pop("local_dir", None)) as manager:
        restored = manager.restore(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, **kwargs)
    return 0 if restored is None else restored.step + 1
