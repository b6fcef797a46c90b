"""The files of one checkpoint step, and the protocol that commits and deletes them.

CheckpointManager decides what to save; this module decides how the bytes land
so that a crash at any instant leaves each step either committed and complete
or invisible:

* local disk: files go into a temporary directory ``.tmp-step_N-<uuid>`` beside
  the final one, each fsynced; the manifest is written last; the directory is
  renamed into place and the parent fsynced. Replacing a committed step swaps
  the two directories atomically (``renameat2(RENAME_EXCHANGE)``); where the
  kernel lacks it, two renames leave the old copy under ``.old-step_N-<uuid>``
  for an instant, and the next save renames it back if the process died there.
* object stores: data objects are uploaded (each atomically) into the step
  prefix, then the manifest object, whose single PUT is the commit. Replacing
  a committed step writes the new data under ``step_N/rev-<id>/`` so the old
  manifest stays valid until the new one overwrites it in one PUT.

What goes into the files is :mod:`ckptmgr.components`' business.
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional

from . import storage
from .components import probe
from .errors import CheckpointExistsError, StorageError
from .faults import fault_point
from .manifest import MANIFEST_NAME, Manifest, is_temp_name, old_name, parse_old_name, step_name, temp_name

logger = logging.getLogger(__name__)

__all__ = ["WritePlan", "prepare", "commit", "abort", "delete_step", "clean_leftovers", "reclaim_all"]

Options = Optional[Dict[str, Any]]

# --------------------------------------------------------------------------- commit protocol


@dataclass
class WritePlan:
    """Where one save writes (JSON-able: rank 0 sends it to the other ranks).

    Attributes:
        final: URI of the step directory once committed.
        write_dir: Directory the data files are written into.
        prefix: Prefix of file names relative to ``final`` (``'rev-<id>/'`` when
            replacing a committed step on an object store).
        mode: ``'local'`` (temp dir + rename) or ``'remote'`` (manifest last).
        replace: A directory of that name exists already and is replaced.
    """

    final: str
    write_dir: str
    prefix: str
    mode: str
    replace: bool

    @property
    def root(self) -> str:
        """The directory that file names (``prefix`` included) are relative to while writing."""
        return self.write_dir if self.mode == "local" else self.final

    def to_json(self) -> Dict[str, Any]:
        """The plan as a dict."""
        return asdict(self)


def prepare(directory: str, step: int, force: bool, storage_options: Options = None) -> WritePlan:
    """Check the step and make room for it (rank 0, before anything is written).

    Raises:
        CheckpointExistsError: ``step`` is committed and ``force`` is False.
        StorageError: a file (not a directory) has the step's name.
    """
    final = storage.join(directory, step_name(step))
    if storage.exists(final, storage_options) and not storage.isdir(final, storage_options):
        raise StorageError(f"{final} exists and is not a checkpoint directory",
                           "move that file out of the way; ckptmgr never deletes what it did not write")
    status = probe(final, storage_options)
    if status == "committed" and not force:
        raise CheckpointExistsError(f"step {step} is already committed in {directory}")
    if status == "damaged":
        logger.warning("replacing %s: its manifest is damaged", final)
    elif status == "absent" and storage.exists(final, storage_options):
        logger.warning("replacing %s: it holds no manifest (an uncommitted or foreign copy)", final)
    if storage.is_local(directory):
        storage.makedirs(directory)
        tmp = storage.join(directory, temp_name(step))
        storage.make_dir(tmp)
        return WritePlan(final, tmp, "", "local", storage.exists(final))
    if status == "committed":
        prefix = f"rev-{uuid.uuid4().hex[:12]}/"
        return WritePlan(final, storage.join(final, prefix), prefix, "remote", True)
    storage.remove(final, recursive=True, storage_options=storage_options)  # uncommitted leftovers
    return WritePlan(final, final, "", "remote", False)


def commit(plan: WritePlan, manifest: Manifest, storage_options: Options = None) -> None:
    """Check every file is there, write the manifest last and make the step visible; then tidy.

    Raises:
        StorageError: a file another rank wrote is not visible here (for a local
            directory: it is not on a filesystem shared by every rank).
    """
    present = storage.list_files(plan.root, storage_options)
    unseen = sorted(n for n, e in manifest.files.items() if present.get(n) != e.size)
    if unseen:
        raise StorageError(f"{', '.join(unseen)} written for step {manifest.step} are not visible in {plan.root}",
                           "every rank must see the same directory: use a filesystem shared by all nodes "
                           "or an object store URL")
    fault_point("save.before_manifest")
    if plan.mode == "remote":
        with storage.atomic_write(storage.join(plan.final, MANIFEST_NAME), storage_options) as fh:
            fh.write(manifest.to_bytes())
        fault_point("save.after_manifest")  # on an object store the manifest PUT is the commit
        if plan.replace:  # the old revision's objects are unreferenced now
            keep = set(manifest.files) | {MANIFEST_NAME}
            for name in storage.list_files(plan.final, storage_options):
                if name not in keep:
                    _quietly(storage.remove, storage.join(plan.final, name), storage_options=storage_options)
        return
    with storage.atomic_write(storage.join(plan.write_dir, MANIFEST_NAME)) as fh:
        fh.write(manifest.to_bytes())
    fault_point("save.after_manifest")  # durable manifest, still under the temporary name
    if not plan.replace:
        storage.rename_dir(plan.write_dir, plan.final)
        return
    if storage.exchange_dirs(plan.write_dir, plan.final):
        _quietly(storage.remove, plan.write_dir, recursive=True)  # now holds the replaced checkpoint
        return
    # No atomic swap here: the one window where neither copy has the final name.
    # clean_leftovers() renames the old copy back if the process dies in it.
    parent = plan.final.rsplit("/", 1)[0]
    old = storage.join(parent, old_name(manifest.step))
    storage.rename_dir(plan.final, old)
    try:
        storage.rename_dir(plan.write_dir, plan.final)
    except BaseException:
        storage.rename_dir(old, plan.final)  # put the old checkpoint back before reporting
        raise
    _quietly(storage.remove, old, recursive=True)


def abort(plan: WritePlan, storage_options: Options = None) -> None:
    """Remove what a failed save wrote (best effort; leftovers are cleaned at the next save)."""
    target = plan.write_dir if (plan.mode == "local" or plan.prefix) else plan.final
    _quietly(storage.remove, target, recursive=True, storage_options=storage_options)


def delete_step(directory: str, step: int, storage_options: Options = None,
                defer: Optional[Callable[[Callable[[], None]], None]] = None) -> None:
    """Uncommit a step, then delete its files, so a crash midway never leaves a committed partial step.

    Locally the directory is first renamed to a temporary name (one atomic
    uncommit that takes the manifest with it; a crash leaves only a temp
    directory the next save removes); on object stores the manifest object is
    deleted first, then the rest.

    Args:
        directory: The manager directory.
        step: The step to delete.
        storage_options: fsspec options.
        defer: Called with the function that removes the uncommitted files,
            instead of running it here (freeing gigabytes of file blocks takes
            a while; the step is already gone from every listing).
    """
    final = storage.join(directory, step_name(step))
    if storage.is_local(directory):
        trash = storage.join(directory, temp_name(step))
        storage.rename_dir(final, trash)
        fault_point("retention.after_uncommit")

        def reclaim() -> None:
            storage.remove(storage.join(trash, MANIFEST_NAME))
            storage.remove(trash, recursive=True)
    else:
        storage.remove(storage.join(final, MANIFEST_NAME), storage_options=storage_options)
        fault_point("retention.after_uncommit")

        def reclaim() -> None:
            storage.remove(final, recursive=True, storage_options=storage_options)
    if defer is None:
        reclaim()
    else:
        defer(reclaim)


def clean_leftovers(directory: str, names: Iterable[str], uncommitted: Iterable[int] = (),
                    storage_options: Options = None) -> List[str]:
    """Remove what crashed saves left behind, and nothing else.

    Args:
        directory: The manager directory.
        names: Its entries (one listing).
        uncommitted: Steps whose directory exists without a manifest; removed on
            object stores only (there they are interrupted uploads; locally a save
            never writes into a final step directory).
        storage_options: fsspec options.

    Returns:
        The names removed (or renamed back).
    """
    names = set(names)
    done = []
    if storage.is_local(directory):
        for name in sorted(names):
            if is_temp_name(name):
                _quietly(storage.remove, storage.join(directory, name), recursive=True)
                done.append(name)
            elif parse_old_name(name):
                target = parse_old_name(name)
                if target in names:
                    _quietly(storage.remove, storage.join(directory, name), recursive=True)
                else:  # the process died between the two renames of a forced save: roll back
                    logger.warning("restoring %s from %s (a forced save was interrupted)", target, name)
                    storage.rename_dir(storage.join(directory, name), storage.join(directory, target))
                    names.add(target)
                done.append(name)
        return done
    for step in uncommitted:
        _quietly(storage.remove, storage.join(directory, step_name(step)), recursive=True,
                 storage_options=storage_options)
        done.append(step_name(step))
    return done


def _quietly(func: Any, *args: Any, **kwargs: Any) -> None:
    try:
        func(*args, **kwargs)
    except Exception as exc:  # tidying is best effort; the next save tries again
        logger.warning("could not remove %s: %s", args[0] if args else "?", exc)


def reclaim_all(reclaims: Iterable[Callable[[], None]]) -> None:
    """Run the removals :func:`delete_step` deferred; a failure is only logged (the next save cleans up)."""
    for reclaim in reclaims:
        try:
            reclaim()
        except Exception as exc:
            logger.warning("could not free the space of a deleted checkpoint: %s", exc)
