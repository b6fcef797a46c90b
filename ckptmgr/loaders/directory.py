"""Loading the weights of a CheckpointManager directory, for ``load_checkpoint`` and the CLI.

``load_checkpoint(model, "runs/exp1")`` and ``load_checkpoint(model,
"runs/exp1/step_00000100")`` should work like loading a file: this module
finds the step (the newest good one for a manager directory), checks the
weights and meta files against its manifest, and returns them as a
checkpoint dict. It needs only the listing index, not a CheckpointManager.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional

from .. import components, storage
from ..errors import CheckpointNotFoundError, CorruptCheckpointError
from ..index import StepIndex
from ..manifest import parse_step_name, step_name
from ..serialization import MapLocation

logger = logging.getLogger(__name__)

__all__ = ["load_manager_checkpoint"]


def load_manager_checkpoint(uri: str, map_location: MapLocation = None,
                            storage_options: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Load the model weights of a manager checkpoint (what ``load_checkpoint`` calls for directories).

    Args:
        uri: A step directory (``.../step_00000100``) or a manager directory
            (its newest good checkpoint).
        map_location: As for ``torch.load``.
        storage_options: fsspec options for URLs.

    Returns:
        ``{'state_dict', 'meta', 'step', 'metrics'}``, after checking the
        weights and meta files against the manifest (sizes and sha256).

    Raises:
        CheckpointNotFoundError: no committed checkpoint there.
        CorruptCheckpointError: the step (or, for a manager directory, every step) is damaged.
    """
    uri = str(uri)
    trimmed = uri.rstrip("/") or uri
    step = parse_step_name(trimmed.rsplit("/", 1)[-1])
    if step is not None:
        return components.load_weights(trimmed, step, map_location, storage_options)
    steps = list(StepIndex(trimmed, storage_options).refresh())
    if not steps:
        raise CheckpointNotFoundError(f"{uri} is a directory with no committed checkpoint",
                                      "pass a checkpoint file, a step_XXXXXXXX directory, or a manager directory")
    failures = []
    for candidate in reversed(steps):
        try:
            return components.load_weights(storage.join(trimmed, step_name(candidate)), candidate,
                                           map_location, storage_options)
        except CorruptCheckpointError as exc:
            logger.warning("checkpoint step %d is damaged, trying an older one: %s", candidate, exc)
            failures.append(str(exc))
    raise CorruptCheckpointError(f"every checkpoint in {uri} is damaged:\n" + "\n".join(failures))
