"""Loading the weights of a CheckpointManager directory, for ``load_checkpoint`` and the CLI.

``load_checkpoint(model, "runs/exp1")`` and ``load_checkpoint(model,
"runs/exp1/step_00000100")`` should work like loading a file: the step layer
finds the step (the newest good one for a manager directory) and checks the
weights and meta files against its manifest; this module only tells a step
directory from a manager directory. With ``CKPTMGR_SIGNING_KEY`` set, only
steps signed with that key load.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional

from ..format.maplocation import MapLocation
from ..format.signing import load_key
from ..io.access import open_store
from ..io.store import Options
from ..step.load import load_latest_weights, load_weights
from ..step.names import parse_step_name

logger = logging.getLogger(__name__)

__all__ = ["load_manager_checkpoint"]


def load_manager_checkpoint(uri: str, map_location: MapLocation = None,
                            storage_options: Options = None, model_name: Optional[str] = None,
                            every_model: bool = False) -> Dict[str, Any]:
    """Load the model weights of a manager checkpoint (what ``load_checkpoint`` calls for directories).

    Args:
        uri: A step directory (``.../step_00000100``) or a manager directory
            (its newest good checkpoint).
        map_location: As for ``torch.load``.
        storage_options: fsspec options for URLs.
        model_name: Which model of a step saved with a dict of models (may be
            omitted when the step holds one model).
        every_model: Also return ``state_dicts``: every model's weights by name
            (``state_dict`` is then None when the step holds several).

    Returns:
        ``{'state_dict', 'meta', 'step', 'metrics', 'models'}`` (and ``model_name``
        when given), after checking the weights and meta files against the
        manifest (sizes and checksums); ``models`` lists the step's model names.

    Raises:
        CheckpointNotFoundError: no committed checkpoint there.
        CorruptCheckpointError: the step (or, for a manager directory, every step) is damaged.
        CheckpointFormatError: ``model_name`` names no saved model, or is None and the step holds several.
        SignatureError: ``CKPTMGR_SIGNING_KEY`` is set and the step (every step) is not signed with it.
    """
    uri = str(uri)
    trimmed = uri.rstrip("/") or uri
    store = open_store(trimmed, storage_options)
    step = parse_step_name(trimmed.rsplit("/", 1)[-1])
    key = load_key(None)
    if step is not None:
        loaded = load_weights(store, step, map_location, model_name, every_model, signing_key=key)
    else:
        loaded = load_latest_weights(store, map_location, model_name, every_model, signing_key=key)
    if model_name is not None:
        loaded["model_name"] = model_name  # tells load_checkpoint the choice is made
    return loaded
