"""Reading committed steps back: one step checked against its manifest, or the newest good one.

A restore must never apply a step that does not check out, and "the latest
checkpoint" means the newest *good* one: a damaged newer step is skipped
with a warning. :func:`newest_good` is that fallback, shared by the manager's
restore and by ``load_checkpoint`` on a manager directory. With a signing
key, a step whose manifest is not signed with it is refused right after its
manifest is read, before any other file, and skipped like a damaged one.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, TypeVar

from ..distributed import agree, get_rank, get_world_size
from ..errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    SignatureError,
    UnsafeCheckpointError,
)
from ..format.manifest import Manifest, check_sizes
from ..format.maplocation import MapLocation
from ..format.signing import SigningKey
from ..io.store import Store
from ..state.objects import plain
from . import rankstate
from .files import MANIFEST_NAME, read_component, read_manifest
from .formats import Formats, StepFormat, format_of
from .index import StepIndex
from .names import step_name
from .preflight import check_fits
from .records import LoadedStep, TrainingObjects

logger = logging.getLogger(__name__)

__all__ = ["open_step", "read_step", "newest_good", "agree_on_step", "load_weights", "load_latest_weights"]

T = TypeVar("T")


def open_step(store: Store, step: int, signing_key: Optional[SigningKey] = None) -> Tuple[Store, Manifest]:
    """The step directory of ``step`` and its manifest, which must record that step (and be signed with the key).

    Raises:
        CheckpointNotFoundError: the step has no manifest (never committed).
        CorruptCheckpointError: the manifest is damaged or records another step.
        SignatureError: a key is given and the manifest is not signed with it.
    """
    step_store = store.sub(step_name(step))
    missing = CheckpointNotFoundError(f"step {step} has no committed checkpoint in {store.root}",
                                      "`ckptmgr ls DIR` lists the committed steps")
    return step_store, _checked_manifest(step_store, step, signing_key, missing)


def _checked_manifest(step_store: Store, step: Optional[int], signing_key: Optional[SigningKey],
                      missing: CheckpointNotFoundError) -> Manifest:
    """``step_store``'s manifest, signed with the key (when one is given) and recording ``step`` (unless None).

    Raises:
        CheckpointNotFoundError: ``missing``, when there is no manifest.
        CorruptCheckpointError: the manifest is damaged or records another step.
        SignatureError: a key is given and the manifest is not signed with it.
    """
    try:
        manifest = read_manifest(step_store)
    except CheckpointNotFoundError:
        raise missing from None
    check_signature(manifest, signing_key, step_store.uri(MANIFEST_NAME))
    if step is not None and manifest.step != step:
        raise CorruptCheckpointError(f"{step_store.root}: the manifest records step {manifest.step}")
    return manifest


def check_signature(manifest: Manifest, signing_key: Optional[SigningKey], source: str) -> None:
    """Nothing without a key; with one, the manifest must be signed with it.

    Raises:
        SignatureError: unsigned, signed with another key, or altered after signing.
    """
    if signing_key is not None:
        signing_key.check(manifest, source)


def read_step(store: Store, step: int, rank: int, formats: Formats, objs: Optional[TrainingObjects] = None, *,
              verify: bool = True, map_location: MapLocation = None, in_place: bool = False,
              check_all: bool = False, on_world_size_change: str = "error",
              signing_key: Optional[SigningKey] = None, strict: Optional[bool] = None) -> Tuple[StepFormat, LoadedStep]:
    """Read (and check) everything ``rank`` needs from a committed step; nothing is applied.

    Sizes of every file are compared with one listing first; with ``strict``
    given, the step is then checked against ``objs`` from the files' headers
    (:func:`ckptmgr.step.preflight.check_fits`) before any tensor is read. Each
    file read is hashed in the same pass (``verify``). With ``check_all`` the
    other ranks' files are verified too, so one reader can vouch for the step.
    With ``in_place`` tensors are read straight into ``objs``' live CPU
    tensors, which then hold the step's bytes even if a later check fails (the
    error says so). A step holding rank state of another world size is refused
    before anything is read, unless ``on_world_size_change`` is ``'skip'``
    (see :mod:`.rankstate`).

    Raises:
        CheckpointNotFoundError: the step has no manifest.
        ChecksumError, CorruptCheckpointError: something differs from the manifest.
        WorldSizeChangedError: the step holds rank state of another world size (``'error'``).
        SignatureError: ``signing_key`` is given and the manifest is not signed with it.
        KeyMismatchError, CheckpointFormatError: the step does not fit ``objs`` (nothing was touched).
    """
    step_store, manifest = open_step(store, step, signing_key)
    check_sizes(manifest, step_store.list_files(), step_store.root)
    usable = rankstate.usable(manifest, get_world_size(), on_world_size_change)
    fmt = formats.for_manifest(manifest)
    if objs is not None and strict is not None:
        check_fits(step_store, manifest, objs, strict, model=fmt.reads_model, optimizer=not fmt.owns_optimizer)
    into = fmt.inplace_targets(objs) if (in_place and objs is not None) else None
    try:
        loaded = fmt.read(step_store, manifest, rank, verify, map_location, into, check_all)
    except CheckpointError as exc:
        if not into:
            raise
        raise _partly_overwritten(exc, into) from exc
    loaded.rank_state_skipped = not usable
    if usable or check_all:
        own = rankstate.read(step_store, manifest, rank, verify, map_location, check_all)
        loaded.rank_state = own if usable else None
    return fmt, loaded


def _partly_overwritten(exc: CheckpointError, into: Dict[str, Any]) -> CheckpointError:
    """The same error, saying that an in-place read may have changed the live tensors already."""
    what = " and ".join(f"the {name}'s" for name in ("model", "optimizer") if into.get(name))
    note = (f"; {what} tensors are partly overwritten by this step (restore(in_place=True) reads into them): "
            "restore another step or rebuild them before training on")
    return type(exc)(exc.message + note, exc.hint)


def newest_good(candidates: Iterable[int], read: Callable[[int], T], where: str) -> Optional[Tuple[int, T]]:
    """``read`` the candidates newest first; return the first that checks out (None when there are none).

    A step that is damaged, refused as unsafe, or not signed with the key
    (:class:`SignatureError`) is skipped with a warning.

    Raises:
        SignatureError: every candidate failed the signature check (each is listed).
        CorruptCheckpointError: every candidate is damaged or refused (each failure is listed).
    """
    failures: List[Tuple[int, Exception]] = []
    for candidate in sorted(candidates, reverse=True):
        try:
            return candidate, read(candidate)
        except (CorruptCheckpointError, CheckpointNotFoundError, UnsafeCheckpointError) as exc:
            what = "not signed with the key" if isinstance(exc, SignatureError) else "damaged"
            logger.warning("checkpoint step %d is %s, trying an older one: %s", candidate, what, exc)
            failures.append((candidate, exc))
    if not failures:
        return None
    listed = "\n".join(f"step {candidate}: {exc}" for candidate, exc in failures)
    if all(isinstance(exc, SignatureError) for _, exc in failures):
        raise SignatureError(f"no checkpoint in {where} is signed with the given key, so nothing is restored:\n"
                             f"{listed}")
    raise CorruptCheckpointError(f"every checkpoint in {where} is damaged:\n{listed}")


def agree_on_step(store: Store, formats: Formats, objs: TrainingObjects, step: Optional[int],
                  candidates: Callable[[], List[int]], *, verify: bool, map_location: MapLocation,
                  in_place: bool, on_world_size_change: str = "error", signing_key: Optional[SigningKey] = None,
                  strict: bool = True) -> Optional[Tuple[int, StepFormat, LoadedStep]]:
    """Every rank's part of the step to restore (a collective): rank 0 chooses and vouches, then every rank reads.

    Rank 0 reads ``step`` (or the newest good one of ``candidates()``) and
    verifies every file of it, other ranks' included; every other rank then
    reads its own part. Nothing is applied; every rank checks that the step
    fits ``objs`` before it reads (:func:`read_step` with ``strict``). With
    ``signing_key`` every rank checks the manifest's signature before reading anything else.

    Returns:
        ``(step, its format, what this rank read)``, or None when nothing is committed.

    Raises:
        CheckpointNotFoundError, ChecksumError, CorruptCheckpointError, WorldSizeChangedError, SignatureError:
            on every rank.
    """
    rank = get_rank()
    got: Dict[str, Tuple[StepFormat, LoadedStep]] = {}

    def read(candidate: int, everything: bool) -> Tuple[StepFormat, LoadedStep]:
        return read_step(store, candidate, rank, formats, objs, verify=verify, map_location=map_location,
                         in_place=in_place, check_all=everything, on_world_size_change=on_world_size_change,
                         signing_key=signing_key, strict=strict)

    def choose() -> Optional[int]:
        if rank != 0:
            return None
        if step is not None:
            got["step"] = read(step, True)
            return step
        found = newest_good(candidates(), lambda s: read(s, True), store.root)
        if found is None:
            return None
        got["step"] = found[1]
        return found[0]
    chosen = agree(f"restoring from {store.root} (choose)", choose)[0]
    if chosen is None:
        return None
    agree(f"restoring step {chosen} from {store.root} (read)",
          lambda: None if rank == 0 else got.update(step=read(chosen, False)))
    fmt, loaded = got["step"]
    return chosen, fmt, loaded


def load_weights(step_store: Store, step: Optional[int] = None, map_location: MapLocation = None,
                 model_name: Optional[str] = None, every_model: bool = False, *,
                 signing_key: Optional[SigningKey] = None) -> Dict[str, Any]:
    """Weights and meta of one committed step, verified: ``{'state_dict', 'meta', 'step', 'metrics', 'models'}``.

    ``models`` lists the names of the step's models (``['model']`` for one
    module); ``model_name`` picks one of several (with a single one it may be
    omitted). With ``every_model``, ``state_dicts`` maps every name to its
    weights and ``state_dict`` is the only model's (None when there are several).

    Raises:
        CheckpointNotFoundError: the step has no manifest (never committed).
        ChecksumError, CorruptCheckpointError: the weights or meta differ from the manifest.
        CheckpointFormatError: ``model_name`` was not saved, or it is None and several models were.
        SignatureError: ``signing_key`` is given and the manifest is not signed with it.
    """
    manifest = _checked_manifest(step_store, step, signing_key, CheckpointNotFoundError(
        f"{step_store.root} has no manifest: that save never committed",
        "load another step; `ckptmgr ls DIR` lists committed ones"))
    fmt, names = format_of(manifest), manifest.model_names()
    name = manifest.file_for("meta")
    meta = read_component(step_store, manifest, name, True) if name else {}
    out = {"meta": plain(meta), "step": manifest.step, "metrics": dict(manifest.metrics), "models": names}
    if every_model:
        out["state_dicts"] = {n: fmt.load_weights(step_store, manifest, map_location, n) for n in names}
        out["state_dict"] = out["state_dicts"][names[0]] if len(names) == 1 else None
    else:
        out["state_dict"] = fmt.load_weights(step_store, manifest, map_location, model_name)
    return out


def load_latest_weights(store: Store, map_location: MapLocation = None, model_name: Optional[str] = None,
                        every_model: bool = False, *, signing_key: Optional[SigningKey] = None) -> Dict[str, Any]:
    """:func:`load_weights` of the newest good step of a manager directory.

    Raises:
        CheckpointNotFoundError: the directory has no committed step.
        CorruptCheckpointError: every step is damaged.
        SignatureError: ``signing_key`` is given and no step is signed with it.
    """
    steps = list(StepIndex(store).refresh())
    found = newest_good(steps, lambda s: load_weights(store.sub(step_name(s)), s, map_location, model_name,
                                                      every_model, signing_key=signing_key), store.root)
    if found is None:
        raise CheckpointNotFoundError(f"{store.root} is a directory with no committed checkpoint",
                                      "pass a checkpoint file, a step_XXXXXXXX directory, or a manager directory")
    return found[1]
