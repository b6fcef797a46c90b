"""Lightning checkpoints written by ckptmgr: atomic, checksummed, pickle-free, on any fsspec URL.

Lightning keeps *when* to save (``ModelCheckpoint``: top-k, ``last``, on
exception) apart from *how bytes land* (a ``CheckpointIO`` plugin). This
module is such a plugin::

    trainer = Trainer(plugins=[CkptmgrCheckpointIO()], callbacks=[ModelCheckpoint(...)])

Every ``*.ckpt`` path Lightning writes becomes a directory holding one
committed ckptmgr step (see :mod:`ckptmgr.integrations._dirckpt`):
``state_dict`` as ``model.safetensors`` (bare keys), the optimizer and
scheduler states, and the rest of Lightning's dict (loops, callbacks,
hyperparameters, ...) as JSON or safetensors. Values that need pickle (a
``Namespace`` in the hyperparameters) are refused unless
``trust_pickle=True``, and then only those values are pickled. Loading
verifies every file first; nothing is unpickled without the opt-in.

Importing this module imports Lightning (``lightning``, else ``pytorch_lightning``);
without either it raises :class:`~ckptmgr.errors.MissingDependencyError`.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import threading
from typing import Any, Dict, Mapping, Optional, Set, Tuple

from ..errors import CheckpointFormatError, CorruptCheckpointError, MissingDependencyError, UnserializableStateError
from ..format.maplocation import MapLocation
from ..format.skeleton import to_skeleton
from ..format.torchfile import load_torch
from ..io.access import open_store
from ..io.store import Options
from ..io.uri import is_local
from ..state.objects import build_meta, check_index, plain
from . import _dirckpt

try:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
except ImportError:  # the standalone package
    try:
        from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO  # type: ignore[assignment]
    except ImportError as _exc:
        raise MissingDependencyError("ckptmgr.integrations.lightning needs Lightning, which is not installed",
                                     "pip install 'ckptmgr[lightning]' (or install lightning or pytorch-lightning)"
                                     ) from _exc

logger = logging.getLogger(__name__)

__all__ = ["CkptmgrCheckpointIO", "load_checkpoint_dict", "resolve_last"]

VERSION_KEY = "pytorch-lightning_version"
_LISTS = (("optimizer_states", "optimizer"), ("lr_schedulers", "scheduler"))  # list entries -> components
_LAST_RE = re.compile(r"^last(-(\d+))?")  # what Lightning's ckpt_path="last" looks for
_ON_EXCEPTION = "on_exception.ckpt"


def _uri(path: Any) -> str:
    text = os.fspath(path)
    return os.path.abspath(text) if is_local(text) else text


# --------------------------------------------------------------------------- dict <-> step


def to_content(checkpoint: Mapping[str, Any], trust_pickle: bool) -> _dirckpt.StepContent:
    """Split Lightning's checkpoint dict into the files of a step.

    Raises:
        UnserializableStateError: an entry needs pickle and ``trust_pickle`` is False.
    """
    storable: Dict[str, Any] = {}
    pickled: Dict[str, Any] = {}
    for key, value in checkpoint.items():
        try:
            if not isinstance(key, str):
                raise UnserializableStateError(f"the key {key!r} is not a string")
            to_skeleton(value, path=key)  # a dry run: refuses what JSON plus tensors cannot hold
        except UnserializableStateError as exc:
            if not trust_pickle:
                raise UnserializableStateError(
                    f"Lightning checkpoint entry {key!r} cannot be stored without pickle ({exc.message})",
                    "keep hyperparameters and on_save_checkpoint values to numbers, strings, lists, dicts and "
                    "tensors, or opt in with CkptmgrCheckpointIO(trust_pickle=True)") from None
            pickled[key] = value
            continue
        storable[key] = value
    model = storable.pop("state_dict") if isinstance(storable.get("state_dict"), Mapping) else None
    components: Dict[str, Any] = {}
    for key, component in _LISTS:
        if isinstance(storable.get(key), list):  # kept as the manager stores named objects
            components[component] = {"single": False, "states": {str(i): s for i, s in enumerate(storable.pop(key))}}
    components["extra"] = {k: {"kind": "value", "value": v} for k, v in storable.items()}
    step = check_index("global_step", checkpoint.get("global_step", 0))
    lightning = {"epoch": checkpoint.get("epoch"), "global_step": step, VERSION_KEY: checkpoint.get(VERSION_KEY)}
    components["meta"] = build_meta({"lightning": lightning, "keys": [str(k) for k in checkpoint],
                                     "pickled_keys": sorted(map(str, pickled))}, step, 1)
    metrics = {k: v for k, v in (("epoch", checkpoint.get("epoch")), ("global_step", step)) if isinstance(v, int)}
    return _dirckpt.StepContent(model=model, components=components, pickled=pickled or None, metrics=metrics)


def from_content(content: _dirckpt.StepContent) -> Dict[str, Any]:
    """Put Lightning's checkpoint dict back together (keys in their saved order).

    Raises:
        CorruptCheckpointError: the components do not have the shape this module writes.
    """
    try:
        return _assemble(content)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise CorruptCheckpointError(f"the checkpoint's parts do not form a Lightning checkpoint: {exc!r}") from exc


def _assemble(content: _dirckpt.StepContent) -> Dict[str, Any]:
    values: Dict[str, Any] = {k: plain(e.get("value")) for k, e in (content.components.get("extra") or {}).items()}
    if content.model is not None:
        values["state_dict"] = content.model
    for key, component in _LISTS:
        saved = content.components.get(component)
        if isinstance(saved, Mapping):
            states = saved.get("states") or {}
            values[key] = [plain(states[name]) for name in sorted(states, key=int)]
    values.update(content.pickled or {})
    meta = plain(content.components.get("meta") or {})
    order = (meta.get("user") or {}).get("keys") or []
    out = {key: values.pop(key) for key in order if key in values}
    out.update(values)
    return out


# --------------------------------------------------------------------------- public functions


def load_checkpoint_dict(path: Any, map_location: MapLocation = None, *, trust_pickle: bool = False,
                         storage_options: Options = None) -> Dict[str, Any]:
    """Lightning's checkpoint dict from a path written by :class:`CkptmgrCheckpointIO`, verified.

    ``LightningModule.load_from_checkpoint`` reads files with ``torch.load``
    and cannot open these directories; use this instead::

        ckpt = load_checkpoint_dict("ckpts/epoch=3-step=400.ckpt")
        model = MyModule(**ckpt["hyper_parameters"])
        model.load_state_dict(ckpt["state_dict"])

    A plain ``.ckpt`` file (written by Lightning's own ``TorchCheckpointIO``)
    loads too, with ``torch.load(weights_only=True)`` unless ``trust_pickle``.

    Args:
        path: The checkpoint path (local or fsspec URL).
        map_location: Where tensors go (as for ``torch.load``; default CPU).
        trust_pickle: Allow values stored with pickle (only for checkpoints you trust).
        storage_options: fsspec options for URLs.

    Returns:
        The dict Lightning saved.

    Raises:
        CheckpointNotFoundError: nothing committed at ``path``.
        ChecksumError, CorruptCheckpointError: a file differs from the manifest.
        UnsafeCheckpointError: pickled values and ``trust_pickle`` is False.
        CheckpointFormatError: a plain file that holds no dict.
    """
    uri = _uri(path)
    store = open_store(uri, storage_options)
    if store.exists() and not store.isdir():
        with store.open_read() as fh:
            loaded = load_torch(fh, map_location, trust_pickle=trust_pickle, source=uri)
        if not isinstance(loaded, Mapping):
            raise CheckpointFormatError(f"{uri} holds a {type(loaded).__name__}, not a Lightning checkpoint dict")
        return dict(loaded)
    step, content = _dirckpt.read(uri, storage_options, map_location, trust_pickle)
    logger.debug("loaded step %d of %s", step, uri)
    return from_content(content)


def resolve_last(dirpath: Any, *, storage_options: Options = None) -> Optional[str]:
    """The newest committed ``last*.ckpt`` (or ``on_exception.ckpt``) in ``dirpath``, for ``ckpt_path``.

    ``Trainer.fit(ckpt_path="last")`` works on local directories as it is. On
    object stores Lightning asks for the modification time of each candidate,
    which S3 does not have for a directory, and fails; pass
    ``ckpt_path=resolve_last(dirpath)`` there instead. Candidates are ordered
    by global step, then commit time.

    Returns:
        The checkpoint's path or URL, or None when there is none (start from scratch).
    """
    store = open_store(_uri(dirpath), storage_options)
    best: Optional[Tuple[Any, ...]] = None
    for name in store.listdir():
        if not name.endswith(".ckpt") or not (_LAST_RE.match(name[:-5]) or name == _ON_EXCEPTION):
            continue
        known = _dirckpt.committed(store.sub(name))
        if known:
            manifest = known[max(known)]
            key = (manifest.step, manifest.time, name)
            best = key if best is None or key > best else best
    return None if best is None else store.uri(best[2])


# --------------------------------------------------------------------------- the plugin


class CkptmgrCheckpointIO(CheckpointIO):
    """A Lightning ``CheckpointIO`` that writes every checkpoint as a committed, checksummed ckptmgr step.

    Works with ``ModelCheckpoint`` (top-k, ``save_last=True``, ``save_on_exception``),
    ``OnExceptionCheckpoint``, ``ckpt_path="last"`` (local directories; see
    :func:`resolve_last` for object stores) and Lightning's asynchronous
    wrapper, ``AsyncCheckpointIO(CkptmgrCheckpointIO())``: a removal that
    overtakes the queued save of the same path is applied right after that
    save commits, so top-k eviction leaves no orphan.

    Args:
        trust_pickle: Store checkpoint entries that need pickle (for example
            hyperparameters holding an ``argparse.Namespace``) in a pickle file,
            and load such checkpoints. Off by default: those entries raise
            :class:`~ckptmgr.errors.UnserializableStateError` on save and
            :class:`~ckptmgr.errors.UnsafeCheckpointError` on load. A load with
            Lightning's ``weights_only=False`` counts as the opt-in for that load.
        storage_options: fsspec options (credentials, endpoint) for URL paths.
    """

    def __init__(self, *, trust_pickle: bool = False, storage_options: Options = None) -> None:
        super().__init__()
        self.trust_pickle = bool(trust_pickle)
        self.storage_options: Options = dict(storage_options) if storage_options else None
        self._lock = threading.Lock()
        self._saving: Set[str] = set()
        self._deferred: Set[str] = set()
        self._async = False  # set once a save runs off the main thread (AsyncCheckpointIO's worker)
        _register_with_standalone_package(type(self))

    def _options(self, extra: Any) -> Options:
        if extra is None:
            return self.storage_options
        if not isinstance(extra, Mapping):
            raise TypeError(f"storage_options must be a dict of fsspec options, got {type(extra).__name__}")
        return {**(self.storage_options or {}), **extra}

    def save_checkpoint(self, checkpoint: Dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        """Commit ``checkpoint`` at ``path`` (replacing what is there once the new one is complete).

        Raises:
            UnserializableStateError: an entry needs pickle and ``trust_pickle`` is False.
            StorageError: writing failed; what ``path`` held before is untouched.
        """
        uri = _uri(path)
        with self._lock:  # called off the main thread: an async wrapper queues our saves
            self._async = self._async or threading.current_thread() is not threading.main_thread()
        content = to_content(checkpoint, self.trust_pickle)
        with self._lock:
            self._saving.add(uri)
        drop = False
        try:
            _dirckpt.save(uri, content.metrics.get("global_step", 0), content, self._options(storage_options))
        finally:
            with self._lock:
                self._saving.discard(uri)
                drop = uri in self._deferred
                self._deferred.discard(uri)
        if drop:
            logger.info("removing %s now that it is saved (its removal was requested while it was queued)", uri)
            _dirckpt.remove(uri, self.storage_options)

    def load_checkpoint(self, path: Any, map_location: Optional[Any] = None,
                        weights_only: Optional[bool] = None) -> Dict[str, Any]:
        """Load and verify the checkpoint at ``path`` (see :func:`load_checkpoint_dict`)."""
        return load_checkpoint_dict(path, map_location, trust_pickle=self.trust_pickle or weights_only is False,
                                    storage_options=self.storage_options)

    def remove_checkpoint(self, path: Any) -> None:
        """Delete the checkpoint at ``path``: uncommit it first, so no partial checkpoint is ever visible.

        Under ``AsyncCheckpointIO`` a removal can arrive before the queued save
        of the same path ran; it is then applied right after that save commits.
        """
        uri = _uri(path)
        with self._lock:
            if uri in self._saving:
                self._deferred.add(uri)
                return
        if _dirckpt.remove(uri, self.storage_options) != "absent" or not self._async:
            return
        with self._lock:  # absent: queued, being written, or committed since we looked
            if uri in self._saving or not open_store(uri, self.storage_options).exists():
                self._deferred.add(uri)
                return
        _dirckpt.remove(uri, self.storage_options)  # its save committed meanwhile

    def teardown(self) -> None:
        """Forget removals that never met their save (Lightning calls this at the end of every stage)."""
        with self._lock:
            self._deferred.clear()

    resolve_last = staticmethod(resolve_last)


def _register_with_standalone_package(cls: type) -> None:
    """Make the plugin pass ``isinstance`` checks of ``pytorch_lightning`` too, when that is in use.

    ``lightning`` and ``pytorch_lightning`` define separate ``CheckpointIO``
    base classes; both are ABCs, so the other one learns of ours by ``register``.
    """
    for module in ("lightning_fabric.plugins.io.checkpoint_io", "lightning.fabric.plugins.io.checkpoint_io"):
        base = getattr(sys.modules.get(module), "CheckpointIO", None)
        if base is not None and not issubclass(cls, base):
            base.register(cls)

