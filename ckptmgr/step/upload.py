"""One tiered save's second half: a locally committed step is copied to the persistent tier, manifest last.

Each node's local copy holds its manifest (the files on that node). The upload
is a collective with the persistent directory's own commit protocol
(:mod:`ckptmgr.step.commit`; manifest-last on object stores), so a crash at
any instant leaves the persistent tier with the step committed or invisible:

1. plan: every node's leader sends its local manifest; rank 0 claims the
   persistent directory, removes interrupted uploads, and prepares the step
   there (a committed copy with another commit time is replaced, atomically);
2. upload: every file goes up once, from one rank whose node holds it: the
   rank that wrote it (its RNG file, its shards) when that rank's node still
   holds it, else the lowest rank of a node that does (global rank 0 for the
   replicated files). Each file is hashed as it is read and checked against
   the local manifest before its upload completes, so a damaged local file is
   never committed;
3. commit: rank 0 writes the step's manifest (the union of the nodes'
   manifests) last.

Any rank's node can hold any file: a restarted job with other ranks on other
nodes, or with a wiped node, uploads from wherever the files are.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Dict, List, Optional

from ..distributed import agree
from ..distributed.nodes import NodeLayout
from ..errors import CorruptCheckpointError
from ..faults import fault_point
from ..format.checksum import CHUNK, FileEntry, HashingReader
from ..format.manifest import Manifest, compare
from ..io.store import Store
from ..sharded.layout import is_data_file
from .commit import CommitProtocol
from .files import probe, read_manifest, run_concurrently
from .names import step_name
from .records import WritePlan

logger = logging.getLogger(__name__)

__all__ = ["upload_step", "union", "assign", "with_prefix"]


def union(manifests: Dict[int, Manifest], source: str) -> Manifest:
    """The manifest of the whole step from the nodes' manifests (every file once).

    Raises:
        CorruptCheckpointError: two nodes record one file with different bytes.
    """
    first = manifests[min(manifests)]
    files: Dict[str, FileEntry] = {}
    for lead in sorted(manifests):
        for name, entry in manifests[lead].files.items():
            if files.setdefault(name, entry) != entry:
                raise CorruptCheckpointError(f"{source}: the nodes' copies of {name} differ")
    if len({m.checksum for m in manifests.values()}) > 1:
        raise CorruptCheckpointError(f"{source}: the nodes' copies record different checksums")
    return Manifest(step=first.step, files=files, components=first.components, metrics=first.metrics,
                    world_size=first.world_size, time=first.time, checksum=first.checksum)


def _writer(manifest: Manifest, name: str) -> Optional[int]:
    """The rank that wrote a per-rank file (its RNG file, its DCP shard), or None for replicated files."""
    for rank, rng in (manifest.components.get("rng") or {}).items():
        if rng == name:
            return int(rank)
    if is_data_file(name):
        base = name.rsplit("/", 1)[-1]
        return int(base[2:].split("_", 1)[0])
    return None


def assign(manifests: Dict[int, Manifest], whole: Manifest, layout: NodeLayout) -> Dict[int, List[str]]:
    """Rank -> the files it uploads (every rank computes the same answer from the same manifests)."""
    out: Dict[int, List[str]] = {r: [] for r in range(layout.world)}
    for name in sorted(whole.files):
        holders = [lead for lead in sorted(manifests) if name in manifests[lead].files]
        writer = _writer(whole, name)
        if writer is not None and writer < layout.world and layout.leader_of[writer] in holders:
            out[writer].append(name)
        else:
            out[holders[0]].append(name)
    return out


def with_prefix(manifest: Manifest, prefix: str) -> Manifest:
    """The manifest with every file name (and every component's reference to one) under ``prefix``."""
    if not prefix:
        return manifest
    names = set(manifest.files)

    def rename(value: Any) -> Any:
        if isinstance(value, str):
            return prefix + value if value in names else value
        if isinstance(value, dict):
            return {k: rename(v) for k, v in value.items()}
        if isinstance(value, list):
            return [rename(v) for v in value]
        return value
    return Manifest(step=manifest.step, files={prefix + n: e for n, e in manifest.files.items()},
                    components=rename(manifest.components), metrics=manifest.metrics,
                    world_size=manifest.world_size, time=manifest.time, checksum=manifest.checksum)


def copy_verified(src: Store, name: str, dst: Store, dst_name: str, want: FileEntry, checksum: str) -> None:
    """Copy one file, hashing it as it is read; a copy that differs from ``want`` is never completed.

    Raises:
        ChecksumError: the local bytes differ from the manifest (the upload is discarded).
        StorageError: reading or uploading failed.
    """
    with src.open_read(name) as fh, dst.atomic_write(dst_name) as out:
        reader = HashingReader(fh, checksum)
        while True:
            chunk = reader.read(CHUNK)
            if not chunk:
                break
            out.write(chunk)
        compare(name, reader.finish(), want, src.root, checksum)  # raising here discards the upload
    fault_point("upload.after_file")


def upload_step(layout: NodeLayout, local: Store, persistent: Store, protocol: CommitProtocol, step: int,
                time: str, *, group: Any = None, before_prepare: Callable[[], None] = lambda: None,
                before_commit: Callable[[], None] = lambda: None) -> Optional[Manifest]:
    """Copy the local copies of ``step`` (commit ``time``) to the persistent tier and commit it there (a collective).

    Args:
        layout: Which ranks share a node.
        local: This node's local tier.
        persistent: The persistent tier.
        protocol: The persistent tier's commit protocol.
        step: The step to upload.
        time: Commit time of the copy to upload (copies with another time are not used).
        group: Process group for the agreement.
        before_prepare: Rank 0, before the plan (claim the directory, clean interrupted uploads).
        before_commit: Rank 0, right before the manifest is written (the ownership check).

    Returns:
        The persistent manifest on rank 0 (also when it was there already), None elsewhere.

    Raises:
        ChecksumError: a local file is damaged (nothing is committed).
        CorruptCheckpointError: no node holds a complete copy, or the nodes' copies disagree.
        StorageError, DistributedError: on every rank; nothing is committed.
    """
    rank, name = layout.rank, step_name(step)
    what = f"uploading step {step} to {persistent.root}"
    state: Dict[str, Any] = {"plan": None, "committed": False, "manifest": None}

    def plan() -> Any:
        reply: Dict[str, Any] = {"manifest": None}
        if layout.is_leader:
            try:
                mine = read_manifest(local.sub(name))
                if mine.time == time:
                    reply["manifest"] = mine.to_bytes().decode("utf-8")
            except (CorruptCheckpointError, FileNotFoundError) as exc:
                logger.warning("%s: this node's copy is unusable: %s", what, exc)
        if rank == 0:
            before_prepare()
            status = probe(persistent.sub(name))
            if status == "committed" and read_manifest(persistent.sub(name)).time == time:
                reply["done"] = True
                return reply
            state["plan"] = protocol.prepare(step, force=status == "committed")
            reply["plan"] = state["plan"].to_json()
        return reply

    try:
        replies = agree(f"{what} (plan)", plan, group)
        if replies[0].get("done"):
            return read_manifest(persistent.sub(name)) if rank == 0 else None
        manifests = {lead: Manifest.from_bytes(replies[lead]["manifest"].encode("utf-8"), source=f"node {lead}")
                     for lead in layout.leaders if replies[lead]["manifest"] is not None}
        if not manifests:
            raise CorruptCheckpointError(f"{what}: no node holds a copy committed at {time}")
        whole = union(manifests, what)
        target = WritePlan(**replies[0]["plan"])
        mine = assign(manifests, whole, layout)[rank]

        def upload() -> None:
            fault_point("upload.start")
            src, dst = local.sub(name), persistent.sub(target.root)
            jobs = {n: functools.partial(copy_verified, src, n, dst, target.prefix + n, whole.files[n],
                                          whole.checksum) for n in mine}
            run_concurrently(jobs, "ckptmgr-upload")
        agree(f"{what} (upload)", upload, group)

        def commit() -> None:
            if rank != 0:
                return
            manifest = with_prefix(whole, target.prefix)
            fault_point("upload.before_manifest")
            before_commit()
            protocol.commit(target, manifest)
            state["committed"], state["manifest"] = True, manifest
            fault_point("upload.after_manifest")
        agree(f"{what} (commit)", commit, group)
    except BaseException:
        if state["plan"] is not None and not state["committed"]:
            protocol.abort(state["plan"])
        raise
    return state["manifest"]
