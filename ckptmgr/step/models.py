"""The model weights of a plain step: one safetensors file per model, named in the manifest.

A model passed as one module is ``model.safetensors`` (``components['model']``),
exactly as ckptmgr 0.1 wrote it. A dict name -> module writes
``model-<name>.safetensors`` per model, each keyed like that bare model, and
lists them under ``components['models']`` (name -> file). Restores pair the
saved models with the live ones by name; ``load_checkpoint(..., model_name=)``
picks one of them.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch

from ..errors import CheckpointFormatError, CorruptCheckpointError
from ..format.checksum import DEFAULT_CHECKSUM
from ..format.manifest import Manifest
from ..format.maplocation import MapLocation
from ..io.store import Store
from ..state import objects
from ..state.models import SINGLE_NAME, as_models
from ..state.modules import get_state_dict
from ..state.partial import NOTHING, Exclusion, Shapes, apply_model_state, frozen_record, trainable_state
from .files import read_model, write_model
from .records import ModelStates

__all__ = ["collect", "frozen_component", "write_jobs", "manifest_entries", "saved_models", "read_jobs", "gather",
           "apply", "inplace_targets", "choose", "JOB_PREFIX"]

#: Jobs (of a step's concurrent writes and reads) that are model files start with this.
JOB_PREFIX = "model:"


def _base(name: str, single: bool) -> str:
    return "model" if single else f"model-{name}"


def collect(model: Any, save_frozen: bool = True) -> Tuple[ModelStates, Optional[Dict[str, Shapes]]]:
    """The bare state dict and module metadata of every model (rank 0 of a plain save).

    With ``save_frozen=False`` each model's frozen parameters are left out.

    Returns:
        ``(the states, {model name: {key: shape} of the parameters left out} or None)``.
    """
    single, models = as_models(model)
    if save_frozen:
        return ModelStates(single, {name: objects.model_state(m) for name, m in models.items()}), None
    states: Dict[str, Tuple[Mapping[str, Any], Dict[str, Any]]] = {}
    frozen: Dict[str, Shapes] = {}
    for name, module in models.items():
        state, meta, left_out = trainable_state(module)
        states[name] = (state, meta)
        if left_out:
            frozen[name] = left_out
    return ModelStates(single, states), frozen or None


def frozen_component(models: ModelStates, frozen: Mapping[str, Shapes]) -> Dict[str, Any]:
    """The manifest's record of the parameters a save left out (see :func:`ckptmgr.state.partial.frozen_record`)."""
    if models.single:
        return {"params": frozen[SINGLE_NAME]}
    return {"models": dict(frozen)}


def write_jobs(store: Store, prefix: str, models: ModelStates,
               checksum: str = DEFAULT_CHECKSUM) -> Dict[str, Callable[[], Any]]:
    """One write job per model file, keyed ``model:<name>``, each hashed with ``checksum`` while written."""
    return {JOB_PREFIX + name: functools.partial(write_model, store, state, meta, prefix=prefix,
                                                 base=_base(name, models.single), checksum=checksum)
            for name, (state, meta) in models.states.items()}


def manifest_entries(models: ModelStates, written: Mapping[str, str]) -> Dict[str, Any]:
    """The manifest's components for the model files (``written``: model name -> file name)."""
    if models.single:
        return {"model": written[SINGLE_NAME]}
    return {"models": dict(written)}


def saved_models(manifest: Manifest) -> Optional[Tuple[bool, Dict[str, str]]]:
    """``(single, {name: file})`` of a plain step's model files, or None when it has none.

    Raises:
        CorruptCheckpointError: the manifest's table of models is malformed.
    """
    table = manifest.components.get("models")
    if table is not None:
        if not isinstance(table, dict) or not table or not all(isinstance(v, str) for v in table.values()):
            raise CorruptCheckpointError("the manifest's table of models is malformed")
        return False, dict(table)
    name = manifest.file_for("model")
    return None if name is None else (True, {SINGLE_NAME: name})


def read_jobs(store: Store, manifest: Manifest, verify: bool, map_location: MapLocation,
              into: Mapping[str, Any]) -> Dict[str, Callable[[], Any]]:
    """One read job per model file of the step, keyed ``model:<name>`` (``into``: the same keys -> tensors)."""
    saved = saved_models(manifest)
    if saved is None:
        return {}
    return {JOB_PREFIX + name: functools.partial(read_model, store, manifest, verify, map_location,
                                                 into.get(JOB_PREFIX + name), name=file)
            for name, file in saved[1].items()}


def gather(manifest: Manifest, done: Dict[str, Any]) -> Optional[ModelStates]:
    """Take the model jobs' results out of ``done`` (all read jobs' results) as :class:`ModelStates`."""
    saved = saved_models(manifest)
    if saved is None:
        return None
    return ModelStates(saved[0], {name: done.pop(JOB_PREFIX + name) for name in saved[1]})


def apply(model: Any, loaded: ModelStates, strict: bool, components: Optional[Mapping[str, Any]] = None,
          exclusion: Exclusion = NOTHING, what: str = "restore") -> None:
    """Load the saved weights into the live model(s), pairing dicts by name.

    Keys ``exclusion`` names stay untouched, and parameters the save left out
    (recorded in the manifest's ``components``) are checked, not called missing.

    Raises:
        CheckpointFormatError: one module restored from a dict save or the
            reverse, or a requested name was not saved.
        KeyMismatchError: ``strict`` and a model's keys or shapes differ.
    """
    single, models = as_models(model)
    if single != loaded.single:
        have = "one module" if loaded.single else f"a dict of models {sorted(loaded.states)}"
        raise CheckpointFormatError(f"the model was saved as {have} but is restored into "
                                    f"{'one module' if single else 'a dict'}",
                                    "pass model the same way it was passed to save()")
    missing = sorted(set(models) - set(loaded.states))
    if missing:
        raise CheckpointFormatError(f"the checkpoint has no model named {missing}; it has {sorted(loaded.states)}",
                                    "use the names passed to save() for model")
    for name, module in models.items():
        state, meta = loaded.states[name]
        frozen = frozen_record(components or {}, None if single else name)
        if exclusion or frozen:  # part of the model: frozen keys left out by the save, or keys excluded
            apply_model_state(module, state, meta, strict, frozen=frozen, exclusion=exclusion, what=what)
        else:
            objects.apply_model(module, state, meta, strict)


def inplace_targets(model: Any, exclusion: Exclusion = NOTHING) -> Dict[str, Dict[str, torch.Tensor]]:
    """The models' CPU tensors by bare key, under the read jobs' keys (``model:<name>``); excluded keys never."""
    if exclusion.drops("model"):
        return {}
    _, models = as_models(model)
    return {JOB_PREFIX + name: {k: v.detach() for k, v in get_state_dict(m).items()
                                if isinstance(v, torch.Tensor) and v.device.type == "cpu"
                                and not exclusion.drops_key(k)}
            for name, m in models.items()}


def choose(names: Mapping[str, Any], model_name: Optional[str], source: str) -> str:
    """The saved model ``model_name`` names (any when only one was saved).

    Raises:
        CheckpointFormatError: ``model_name`` was not saved, or it is None and several were.
    """
    if model_name is not None:
        if model_name in names:
            return model_name
        raise CheckpointFormatError(f"{source} has no model named {model_name!r}; it has {sorted(names)}",
                                    f"pass model_name= one of {sorted(names)}")
    if len(names) == 1:
        return next(iter(names))
    raise CheckpointFormatError(f"{source} holds several models: {sorted(names)}",
                                f"pass model_name= one of {sorted(names)}")
