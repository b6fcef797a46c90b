"""What a checkpoint holds, in plain data: for ``ckptmgr inspect``, ``convert`` and anyone scripting.

Any checkpoint a loader can reach (a ``.pth`` or ``.safetensors`` file, a
manager or step directory, a zoo name, a registered scheme) is described as
JSON-ready data: meta, the state dict's keys with shapes and dtypes,
optimizer and scheduler state. Nothing is unpickled unless the caller passes
``trust_pickle=True``.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Tuple

from .checkpoint import extract_state_dict
from .errors import CheckpointFormatError
from .inventory import is_manager_path, is_step_dir
from .io.access import open_store
from .loaders.directory import load_manager_checkpoint
from .loaders.registry import CheckpointLoader
from .step.files import read_component, read_manifest
from .step.names import step_name

__all__ = ["load_weights_and_meta", "describe_checkpoint", "jsonable"]


def _load_any(uri: str, trust_pickle: bool) -> Any:

    return CheckpointLoader.load_checkpoint(uri, map_location="cpu", logger="silent", trust_pickle=trust_pickle)


def load_weights_and_meta(uri: str, trust_pickle: bool = False) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(state_dict, meta)`` of any checkpoint: a file, a manager or step directory, any registered scheme.

    Raises:
        CheckpointFormatError: the checkpoint holds no model state dict.
        UnsafeCheckpointError: it needs pickle and ``trust_pickle`` is False.
    """
    if is_manager_path(uri):
        loaded = load_manager_checkpoint(uri, map_location="cpu")
        return loaded["state_dict"], dict(loaded["meta"], step=loaded["step"])
    ckpt = _load_any(uri, trust_pickle)
    meta: Mapping[str, Any] = {}
    if isinstance(ckpt, Mapping) and isinstance(ckpt.get("meta"), Mapping):
        meta = ckpt["meta"]
    return extract_state_dict(ckpt, uri), dict(meta)


def jsonable(value: Any) -> Any:
    """Plain JSON for reports: tensors become their value (one element) or shape and dtype, objects their repr."""
    import torch
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else {"tensor": list(value.shape), "dtype": str(value.dtype)}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _tensor_table(state_dict: Mapping[str, Any], limit: Optional[int]) -> Dict[str, Any]:
    import torch
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    dtypes: Dict[str, int] = {}
    for t in tensors.values():
        name = str(t.dtype).replace("torch.", "")
        dtypes[name] = dtypes.get(name, 0) + 1
    return {"tensors": len(tensors), "elements": sum(t.numel() for t in tensors.values()),
            "bytes": sum(t.numel() * t.element_size() for t in tensors.values()), "dtypes": dtypes,
            "other_entries": [str(k) for k in state_dict if k not in tensors],
            "keys": [{"key": k, "shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                     for k, v in list(tensors.items())[:limit]]}


def _optimizers(state: Any) -> Optional[Dict[str, Any]]:
    """Param groups (hyper-parameters, parameter counts) and per-parameter state keys of optimizer state dicts."""
    if state is None:
        return None
    if isinstance(state, Mapping) and "states" in state and "single" in state:    # as a manager stores it
        state = state["states"]
    if isinstance(state, Mapping) and "param_groups" in state:
        state = {"optimizer": state}
    if not isinstance(state, Mapping):
        return {"optimizer": jsonable(state)}
    out: Dict[str, Any] = {}
    for name, sd in state.items():
        if not (isinstance(sd, Mapping) and isinstance(sd.get("param_groups"), list)):
            out[str(name)] = {"keys": [str(k) for k in sd]} if isinstance(sd, Mapping) else jsonable(sd)
            continue
        per_param = sd.get("state") or {}
        out[str(name)] = {
            "param_groups": [dict(jsonable({k: v for k, v in g.items() if k != "params"}),
                                  params=len(g.get("params", []))) for g in sd["param_groups"]],
            "params_with_state": len(per_param),
            "state_keys": sorted({str(k) for s in per_param.values() if isinstance(s, Mapping) for k in s})}
    return out


def _describe_step(uri: str, limit: Optional[int]) -> Dict[str, Any]:
    loaded = load_manager_checkpoint(uri, map_location="cpu", every_model=True)  # verifies weights and meta
    store = open_store(uri.rstrip("/"))
    root = store if is_step_dir(uri) else store.sub(step_name(loaded["step"]))
    manifest = read_manifest(root)

    def component(name: str) -> Any:
        file = manifest.file_for(name)
        return None if file is None else read_component(root, manifest, file, True, "cpu")
    schedulers, extra = component("scheduler"), component("extra")
    return {"source": root.root, "kind": "manager checkpoint", "step": loaded["step"], "time": manifest.time,
            "world_size": manifest.world_size, "metrics": manifest.metrics, "checksum": manifest.checksum,
            "files": {n: e.size for n, e in sorted(manifest.files.items())}, "meta": jsonable(loaded["meta"]),
            "state_dict": None if loaded["state_dict"] is None else _tensor_table(loaded["state_dict"], limit),
            "models": None if loaded["state_dict"] is not None else {
                name: _tensor_table(weights, limit) for name, weights in loaded["state_dicts"].items()},
            "optimizer": _optimizers(component("optimizer")),
            "scheduler": None if schedulers is None else {
                n: jsonable({k: v for k, v in s.items() if k in ("last_epoch", "_last_lr")})
                for n, s in schedulers["states"].items()},
            "extra_keys": sorted(extra) if isinstance(extra, Mapping) else None}


def _describe_file(uri: str, limit: Optional[int], trust_pickle: bool) -> Dict[str, Any]:
    ckpt = _load_any(uri, trust_pickle)
    try:
        size: Optional[int] = open_store(uri).size()
    except Exception:  # zoo names and custom schemes have no size to ask for
        size = None
    try:
        weights: Optional[Mapping[str, Any]] = extract_state_dict(ckpt, uri)
    except CheckpointFormatError:
        weights = None
    mapping = isinstance(ckpt, Mapping)
    module = type(ckpt).__name__ if not mapping and weights is not None else None
    kind = f"a whole pickled {module} module; its state_dict() is shown" if module else "file"
    return {"source": uri, "kind": kind, "size": size,
            "meta": jsonable(ckpt["meta"]) if mapping and isinstance(ckpt.get("meta"), Mapping) else None,
            "state_dict": None if weights is None else _tensor_table(weights, limit),
            "optimizer": _optimizers(ckpt.get("optimizer")) if mapping else None,
            "other_keys": [str(k) for k in ckpt if k not in ("meta", "state_dict", "optimizer", "model")]
            if mapping and weights is not ckpt else []}


def describe_checkpoint(uri: str, limit: Optional[int] = None, trust_pickle: bool = False) -> Dict[str, Any]:
    """What a checkpoint holds, as JSON-ready data.

    Args:
        uri: A ``.pth``/``.safetensors`` file, a manager directory (its newest
            good step) or step directory, or any URI a registered loader handles.
        limit: List at most this many state-dict keys (all when None).
        trust_pickle: Allow pickle code (only for files you trust).

    Returns:
        ``{'source', 'kind', 'meta', 'state_dict': {'tensors', 'elements', 'bytes',
        'dtypes', 'keys': [{'key', 'shape', 'dtype'}], ...}, 'optimizer', ...}``;
        manager checkpoints add step, time, world size, metrics, files, scheduler and extra keys,
        and, for a step saved with a dict of models, ``models``: name -> such a table
        (``state_dict`` is then None).

    Raises:
        CheckpointNotFoundError, CorruptCheckpointError, UnsafeCheckpointError: as for loading.
    """
    if is_manager_path(uri):
        return _describe_step(uri, limit)
    return _describe_file(uri, limit, trust_pickle)
