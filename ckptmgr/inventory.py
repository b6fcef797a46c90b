"""Read-only views of manager directories for people and tools, and pruning by hand.

Training code only needs "the latest good step"; operators need more: every
entry of a manager directory with its state (committed, damaged, a crashed
save's leftovers), a byte-for-byte check that reports every bad file instead
of stopping at the first, which retention rule keeps which step, and a way to
prune that follows the same commit protocol as the manager. These functions
answer that for the ``ckptmgr`` command and anyone scripting around it. Only
:func:`prune` writes; nothing here unpickles.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .errors import CheckpointError, CheckpointFormatError, CheckpointNotFoundError, DirectoryInUseError, SignatureError
from .format.checksum import HashingReader
from .format.manifest import MANIFEST_NAME, Manifest, damaged_range
from .format.signing import SigningKey
from .io.access import open_store
from .io.store import Options, Store
from .retention import AnyOf, CheckpointInfo, Policy, RetentionSettings, label, steps_to_delete
from .step.index import read_manifests
from .step.names import is_temp_name, leftover_step, parse_step_name
from .step.ownership import DirectoryOwner

logger = logging.getLogger(__name__)

__all__ = ["DirEntry", "scan_directory", "StepCheck", "check_step", "verify", "kept_by", "recorded_settings",
           "is_manager_path", "is_step_dir", "PruneResult", "prune", "with_local_tier"]

# --------------------------------------------------------------------------- a manager directory


@dataclass
class DirEntry:
    """One entry of a manager directory whose name ckptmgr owns (see :func:`scan_directory`).

    Attributes:
        name: The entry's name in the directory.
        status: ``'committed'``; ``'damaged'`` (its manifest does not check out);
            ``'uncommitted'`` (a step directory without a manifest: an interrupted
            upload, or a copy made by something else); ``'temporary'`` (a save in
            progress, or one that crashed); ``'replaced'`` (the old copy left by an
            interrupted forced save).
        step: The step its name carries.
        manifest: The manifest of a committed entry.
        problem: Why a damaged entry is damaged.
    """

    name: str
    status: str
    step: int
    manifest: Optional[Manifest] = None
    problem: str = ""

    @property
    def size(self) -> Optional[int]:
        """Bytes of a committed checkpoint's data files, from its manifest (None for other entries)."""
        return None if self.manifest is None else sum(e.size for e in self.manifest.files.values())

    @property
    def note(self) -> str:
        """What the status means, in words (for listings)."""
        return self.problem if self.status == "damaged" else _NOTES.get(self.status, "")


_NOTES = {
    "committed": "complete and verified by its manifest",
    "uncommitted": "no manifest.json: an interrupted upload or a copy made by something else",
    "temporary": "a save in progress, or one that crashed (the next save removes it)",
    "replaced": "the old copy of an interrupted forced save (the next save settles it)",
}


def _store(directory: Any, storage_options: Options) -> Store:
    return directory if isinstance(directory, Store) else open_store(str(directory), storage_options)


def scan_directory(directory: Any, storage_options: Options = None) -> List[DirEntry]:
    """Classify what a manager directory holds, from one listing and its manifests.

    Entries whose names ckptmgr does not own are left out.

    Args:
        directory: The manager directory (a path, URL or Store).
        storage_options: fsspec options for URLs.

    Returns:
        The entries, ordered by step, then name.
    """
    store = _store(directory, storage_options)
    entries: List[DirEntry] = []
    steps: Dict[int, str] = {}
    for name in store.listdir():
        step = parse_step_name(name)
        if step is not None:
            steps[step] = name
        elif leftover_step(name) is not None:
            entries.append(DirEntry(name, "temporary" if is_temp_name(name) else "replaced", leftover_step(name) or 0))
    for step, outcome in read_manifests(store, steps).items():
        if isinstance(outcome, FileNotFoundError):
            entries.append(DirEntry(steps[step], "uncommitted", step))
        elif isinstance(outcome, BaseException):  # reported, not raised: a listing shows damage
            entries.append(DirEntry(steps[step], "damaged", step, problem=getattr(outcome, "message", str(outcome))))
        else:
            entries.append(DirEntry(steps[step], "committed", step, outcome))
    return sorted(entries, key=lambda e: (e.step, e.name))


def with_local_tier(entries: List[DirEntry], local_dir: Any) -> Tuple[List[DirEntry], Dict[int, str]]:
    """Add a node's local tier to a persistent directory's entries, and say where each committed step is.

    Args:
        entries: :func:`scan_directory` of the persistent directory.
        local_dir: The manager's ``local_dir`` on this node.

    Returns:
        ``(entries plus the steps committed only on this node, step -> where)``, where is
        ``'both'``, ``'persistent'``, ``'local'`` (on this node's disk, not persistent yet) or
        ``'persistent; local copy is another save'``.
    """
    local = {e.step: e for e in scan_directory(local_dir) if e.manifest is not None}
    remote = {e.step: e for e in entries if e.manifest is not None}
    where: Dict[int, str] = {}
    for step in set(local) | set(remote):
        mine, theirs = local.get(step), remote.get(step)
        if mine is None or theirs is None:
            where[step] = "local" if theirs is None else "persistent"
        else:
            same = mine.manifest.time == theirs.manifest.time  # type: ignore[union-attr]
            where[step] = "both" if same else "persistent; local copy is another save"
    merged = entries + [e for step, e in local.items() if step not in remote]
    return sorted(merged, key=lambda e: (e.step, e.name)), where


@dataclass
class StepCheck:
    """What :func:`check_step` found: the manifest (when it could be read) and every problem, each naming its file.

    ``status`` is ``'checked'``, ``'file'`` for a single file checked against
    the hash in its name, or, for an entry :func:`verify` did not check, its
    :class:`DirEntry` status (``'uncommitted'``, ``'temporary'``, ``'replaced'``).
    ``signed_by`` is the key id whose signature was checked and held ('' when no key was given).
    """

    uri: str
    manifest: Optional[Manifest]
    problems: List[str]
    status: str = "checked"
    signed_by: str = ""

    @property
    def ok(self) -> bool:
        """True when everything checked is intact."""
        return not self.problems and (self.manifest is not None or self.status == "file")


def check_step(step_uri: Any, storage_options: Options = None, signing_key: Optional[SigningKey] = None) -> StepCheck:
    """Check a step directory byte for byte against its manifest (and its signature, given a key).

    Unlike a restore, it does not stop at the first bad file: every listed file
    is checked for presence, size and checksum.

    Returns:
        A :class:`StepCheck`.
    """
    store = _store(step_uri, storage_options)
    try:
        manifest = Manifest.from_bytes(store.read_bytes(MANIFEST_NAME), source=store.uri(MANIFEST_NAME))
    except CheckpointNotFoundError:
        return StepCheck(store.root, None, [f"{MANIFEST_NAME}: missing, so this step is not committed"])
    except CheckpointError as exc:
        return StepCheck(store.root, None, [f"{MANIFEST_NAME}: {exc.message}"])
    problems: List[str] = []
    signed_by = ""
    if signing_key is not None:
        try:
            signing_key.check(manifest, MANIFEST_NAME)
            signed_by = signing_key.key_id
        except SignatureError as exc:
            problems.append(exc.message)
    named = parse_step_name(store.root.rstrip("/").rsplit("/", 1)[-1])
    if named is not None and named != manifest.step:
        problems.append(f"{MANIFEST_NAME}: records step {manifest.step}, but the directory is step {named}")
    present = store.list_files()
    for name, want in sorted(manifest.files.items()):
        if name not in present:
            problems.append(f"{name}: missing")
            continue
        try:
            store.check_inside(name)
            with store.open_read(name) as fh:
                got = HashingReader(fh, manifest.checksum).finish()
        except CheckpointError as exc:
            problems.append(f"{name}: cannot be read ({exc.message})")
            continue
        if got.size != want.size:
            problems.append(f"{name}: {got.size} bytes, the manifest recorded {want.size}")
        elif got.digest != want.digest:
            where = damaged_range(store, name, want, manifest.checksum)
            problems.append(f"{name}: {manifest.checksum} {got.digest[:16]}... differs from the manifest's "
                            f"{want.digest[:16]}..." + (f" ({where} changed)" if where else ""))
    return StepCheck(store.root, manifest, problems, signed_by=signed_by)


def verify(uri: str, storage_options: Options = None, signing_key: Optional[SigningKey] = None) -> List[StepCheck]:
    """Check a step directory, every step of a manager directory, or a file named ``NAME-<sha256 prefix>.ext``.

    Entries of a manager directory that are not committed (a crashed save's
    leftovers) are reported with their status, not checked: resume never uses them.
    With ``signing_key`` a step whose manifest is not signed with it is a problem.

    Raises:
        CheckpointNotFoundError: nothing there, or a directory without checkpoints.
        CheckpointFormatError: a single file whose name carries no hash to check against.
    """
    uri = uri.rstrip("/") or uri
    if is_manager_path(uri, storage_options):
        store = open_store(uri, storage_options)
        if is_step_dir(uri):
            return [check_step(store, signing_key=signing_key)]
        entries = scan_directory(store)
        if not entries:
            raise CheckpointNotFoundError(f"{uri} holds no checkpoints", "pass a CheckpointManager directory")
        return [check_step(store.sub(e.name), signing_key=signing_key) if e.status in ("committed", "damaged")
                else StepCheck(store.uri(e.name), None, [], e.status) for e in entries]
    from .hub.cache import hash_prefix
    prefix = hash_prefix(uri)
    store = open_store(uri, storage_options)
    if prefix is None:
        if not store.exists():
            raise CheckpointNotFoundError(f"{uri} does not exist")
        raise CheckpointFormatError(f"{uri} is a single file without a sha256 prefix in its name, so there is "
                                    "nothing to check it against",
                                    "verify takes a manager or step directory, or a NAME-<sha256[:8]>.pth file")
    with store.open_read() as fh:
        digest = HashingReader(fh, "sha256").finish().digest
    problem = [] if digest.startswith(prefix) else [f"sha256 {digest[:16]}... does not start with {prefix}, "
                                                     "the hash in the file name"]
    return [StepCheck(uri, None, problem, "file")]


def kept_by(entries: Sequence[DirEntry], policy: Policy) -> Dict[int, List[str]]:
    """For each committed entry's step, the rules of ``policy`` that keep it (empty: retention drops it).

    Labels read ``'last 3'``, ``'every 1000'``, ``'best 2 by loss'`` or ``'all'``.
    """
    infos = [CheckpointInfo(e.step, e.manifest.metrics) for e in entries if e.manifest is not None]
    out: Dict[int, List[str]] = {info.step: [] for info in infos}
    for rule in policy.policies if isinstance(policy, AnyOf) else (policy,):
        for step in rule.keep(infos):
            out[step].append(label(rule))
    return out


def recorded_settings(entries: Sequence[DirEntry]) -> Optional[RetentionSettings]:
    """The retention settings recorded by the newest committed entry that has them (None: none recorded)."""
    for entry in sorted(entries, key=lambda e: e.step, reverse=True):
        if entry.manifest is not None and entry.manifest.retention is not None:
            return RetentionSettings.from_json(entry.manifest.retention)
    return None


def is_step_dir(uri: str) -> bool:
    """True when the last component of ``uri`` is a step directory name (``step_00000100``)."""
    return parse_step_name(str(uri).rstrip("/").rsplit("/", 1)[-1]) is not None


def is_manager_path(uri: str, storage_options: Options = None) -> bool:
    """True for a manager or step directory (local or fsspec); False for files and other schemes."""
    from .loaders.registry import CheckpointLoader
    try:
        if not CheckpointLoader.reads_storage(uri):
            return False
        return open_store(uri, storage_options).isdir()
    except CheckpointError:
        return False


# --------------------------------------------------------------------------- pruning


@dataclass
class PruneResult:
    """What :func:`prune` did (or, with ``dry_run``, would do)."""

    directory: str
    delete: List[int]
    deleted: List[int] = field(default_factory=list)
    kept: List[int] = field(default_factory=list)
    untouched: List[str] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)


def prune(directory: str, policy: Optional[Policy] = None, dry_run: bool = False,
          storage_options: Options = None) -> PruneResult:
    """Delete the committed steps ``policy`` drops, through the manager's uncommit-then-delete protocol.

    Temporary directories and files ckptmgr does not own are never touched. On
    a local directory the writer lock a saving job holds is taken first, so a
    live job's directory is refused.

    Args:
        directory: The manager directory.
        policy: The rules to keep by; None for the ones recorded with the run (its newest manifest).
        dry_run: Only say what would be deleted.
        storage_options: fsspec options for URLs.

    Raises:
        DirectoryInUseError: a job is saving into the (local) directory.
        CheckpointFormatError: ``policy`` is None and the run recorded none (written by ckptmgr 0.1).
    """
    store = open_store(directory, storage_options)
    entries = scan_directory(store)
    if policy is None:
        recorded = recorded_settings(entries)
        if recorded is None:
            raise CheckpointFormatError(f"{store.root} records no retention policy (its checkpoints predate the "
                                        "record, or there are none)", "say what to keep: --keep N (and the other "
                                        "retention flags), or a policy from ckptmgr.retention.build_policy")
        policy = recorded.policy()
    committed = [e for e in entries if e.manifest is not None]
    doomed = steps_to_delete([CheckpointInfo(e.step, e.manifest.metrics) for e in committed  # type: ignore[union-attr]
                              ], policy)
    result = PruneResult(store.root, doomed, kept=[e.step for e in committed if e.step not in doomed],
                         untouched=[e.name for e in entries if e.status != "committed"])
    if dry_run or not doomed:
        return result
    owner = DirectoryOwner(store) if store.is_local else None  # never prune under a live local job
    if owner is not None:
        try:
            owner.claim(purpose=None)
        except DirectoryInUseError as exc:
            raise DirectoryInUseError(f"not pruning: {exc.message}", "the job's own retention (max_to_keep) "
                                      "prunes it; run prune after the job stops") from None
    from .step.commit import protocol_for, run_reclaims  # torch comes with it: listing and checking need none
    protocol = protocol_for(store)
    try:
        for step in doomed:
            try:
                run_reclaims([protocol.uncommit(step)])  # never a partial committed step
                result.deleted.append(step)
            except (CheckpointError, OSError) as exc:
                result.errors.append(f"step {step}: {exc}")
    finally:
        if owner is not None:
            owner.release()
    return result
