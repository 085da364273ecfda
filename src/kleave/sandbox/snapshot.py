"""State snapshots of a sandbox: take them atomically, keep two, restore only verified ones.

A snapshot is one ``snap-<generation>.tar`` file (format in ``snapshot_archive``) holding the
workspace, the runtime's other state trees (loaded skills), the audit log and the session
metadata. Writing goes to a temporary file in the snapshot directory, is fsynced, renamed into
place and the directory fsynced, so a crash leaves either the old set of snapshots or the new
one, never a half-written file under a snapshot name. The newest ``keep`` generations are
kept, so a snapshot corrupted at rest still leaves the one before it.

Restore verifies the whole archive before touching anything, then extracts into a staging
directory inside each target (same filesystem, so the swap is a rename even when the workspace
is a volume mount), re-hashing as it goes, and only then replaces the target's contents.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kleave.sandbox.audit import AuditHead, AuditLog, AuditLogCorrupt, verify
from kleave.sandbox.snapshot_archive import (
    AUDIT,
    CHUNK,
    STAGING_PREFIX,
    ArchiveWriter,
    SnapshotCorrupt,
    SnapshotError,
    VerifiedArchive,
    iter_tree,
    verify_archive,
)

__all__ = [
    "RestoreResult",
    "SnapshotCorrupt",
    "SnapshotError",
    "SnapshotInfo",
    "list_snapshots",
    "restore_snapshot",
    "write_snapshot",
]

_NAME = re.compile(r"^snap-(\d{8})\.tar$")


@dataclass(frozen=True)
class SnapshotInfo:
    """What a written snapshot holds and where it is."""

    generation: int
    path: Path
    sha256: str
    size_bytes: int
    files: int
    data_bytes: int
    audit_head: AuditHead
    created: str
    skipped: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The snapshot as ``POST /v1/snapshot`` returns it."""
        return {
            "generation": self.generation,
            "path": str(self.path),
            "sha256": self.sha256,
            "sizeBytes": self.size_bytes,
            "files": self.files,
            "dataBytes": self.data_bytes,
            "auditHead": self.audit_head.to_dict(),
            "created": self.created,
            "skipped": list(self.skipped),
        }


@dataclass(frozen=True)
class RestoreResult:
    """Which snapshot was restored, what it held, and what happened to the audit log."""

    generation: int
    path: Path
    files: int
    data_bytes: int
    audit: str
    """"kept": the live log already continues the snapshot's; "restored": there was no live
    log; "replaced": the live log was a different chain, moved aside to ``replaced_audit``."""
    session: dict[str, Any]
    replaced_audit: str | None = None
    skipped_corrupt: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """The restore as ``POST /v1/restore`` returns it."""
        return {
            "generation": self.generation,
            "path": str(self.path),
            "files": self.files,
            "dataBytes": self.data_bytes,
            "audit": self.audit,
            "replacedAudit": self.replaced_audit,
            "session": self.session,
            "skippedCorrupt": list(self.skipped_corrupt),
        }


def list_snapshots(snapshot_dir: Path) -> list[tuple[int, Path]]:
    """(generation, path) of every snapshot in the directory, newest first."""
    if not snapshot_dir.is_dir():
        return []
    found = []
    for child in snapshot_dir.iterdir():
        match = _NAME.match(child.name)
        if match and child.is_file():
            found.append((int(match.group(1)), child))
    return sorted(found, reverse=True)


def write_snapshot(
    snapshot_dir: Path,
    trees: Mapping[str, Path],
    *,
    audit: AuditLog,
    session: Mapping[str, Any],
    keep: int = 2,
) -> SnapshotInfo:
    """Snapshot ``trees`` (archive name -> directory) and the audit log; prune to ``keep``."""
    if keep < 1:
        raise ValueError("keep must be at least 1")
    snapshot_dir.mkdir(parents=True, exist_ok=True)
    for leftover in snapshot_dir.glob(".snap-*.tmp"):
        leftover.unlink(missing_ok=True)  # from a crash mid-write; never a snapshot
    existing = list_snapshots(snapshot_dir)
    generation = existing[0][0] + 1 if existing else 1
    created = datetime.now(UTC).isoformat(timespec="seconds")
    head, audit_bytes = audit.position()
    descriptor, temporary = tempfile.mkstemp(prefix=".snap-", suffix=".tmp", dir=snapshot_dir)
    try:
        with os.fdopen(descriptor, "wb", buffering=CHUNK) as sink:
            writer = ArchiveWriter(sink)
            for name, root in trees.items():
                root.mkdir(parents=True, exist_ok=True)
                writer.add_tree(name, root)
            writer.add_file_prefix(AUDIT, audit.path, audit_bytes)
            metadata = {
                "generation": generation,
                "created": created,
                "trees": list(trees),
                "session": {**session, "auditHead": head.to_dict()},
            }
            digest, _ = writer.finish(metadata)
            sink.flush()
            os.fsync(sink.fileno())
        final = snapshot_dir / f"snap-{generation:08d}.tar"
        os.replace(temporary, final)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_dir(snapshot_dir)
    for _, old in list_snapshots(snapshot_dir)[keep:]:
        old.unlink(missing_ok=True)
    _fsync_dir(snapshot_dir)
    files = [e for e in writer.entries if e.type == "file" and e.path != AUDIT]
    return SnapshotInfo(
        generation=generation,
        path=final,
        sha256=digest,
        size_bytes=final.stat().st_size,
        files=len(files),
        data_bytes=sum(e.size for e in files),
        audit_head=head,
        created=created,
        skipped=tuple(writer.skipped),
    )


def restore_snapshot(
    snapshot_dir: Path,
    targets: Mapping[str, Path],
    *,
    audit: AuditLog,
    generation: int | None = None,
    fallback: bool = False,
) -> RestoreResult:
    """Restore the newest snapshot (or ``generation``) into ``targets`` (tree -> directory).

    A corrupt snapshot raises ``SnapshotCorrupt`` and changes nothing; with ``fallback`` the
    next older snapshot is tried instead, and the result lists the ones skipped.
    """
    candidates = list_snapshots(snapshot_dir)
    if generation is not None:
        candidates = [(g, p) for g, p in candidates if g == generation]
    if not candidates:
        which = f" of generation {generation}" if generation is not None else ""
        raise SnapshotError(f"no snapshot to restore: {snapshot_dir} holds no snapshot{which}")
    skipped: list[str] = []
    archive: VerifiedArchive | None = None
    for _, path in candidates:
        try:
            archive = verify_archive(path)
            break
        except SnapshotCorrupt as error:
            if not fallback or generation is not None:
                older = [g for g, p in list_snapshots(snapshot_dir) if p != path]
                hint = (
                    f"; older snapshot generation(s) {older} are kept: restore one with "
                    "generation=N, or pass fallback=true to take the newest good one"
                    if older
                    else "; no older snapshot is kept"
                )
                raise SnapshotCorrupt(f"{error}{hint}") from None
            skipped.append(str(error))
    if archive is None:
        raise SnapshotCorrupt("every snapshot is corrupt: " + " | ".join(skipped))
    missing = set(archive.manifest["trees"]) - set(targets)
    if missing:
        raise SnapshotError(f"no restore target for the snapshot's trees {sorted(missing)}")
    staged: dict[str, Path] = {}
    try:
        for tree in archive.manifest["trees"]:
            staged[tree] = _extract_tree(archive, tree, targets[tree])
        # The last step that can refuse; after it the targets are replaced.
        audit_outcome, replaced = _restore_audit(archive, audit)
    except BaseException:
        for staging in staged.values():
            shutil.rmtree(staging, ignore_errors=True)
        raise
    for tree, staging in staged.items():
        _swap_in(staging, targets[tree])
    files = [e for e in archive.entries if e.type == "file" and e.path != AUDIT]
    generation_restored = int(archive.manifest.get("generation", 0))
    return RestoreResult(
        generation=generation_restored,
        path=archive.path,
        files=len(files),
        data_bytes=sum(e.size for e in files),
        audit=audit_outcome,
        session=dict(archive.manifest.get("session", {})),
        replaced_audit=replaced,
        skipped_corrupt=tuple(skipped),
    )


def _extract_tree(archive: VerifiedArchive, tree: str, target: Path) -> Path:
    """Extract one tree into a fresh staging directory inside ``target``; re-hash every file."""
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=target))
    try:
        wanted = dict(iter_tree(archive, tree))
        links: list[tuple[Path, str]] = []
        with tarfile.open(archive.path, mode="r:") as tar:
            for member in tar:
                if member.name != tree and not member.name.startswith(tree + "/"):
                    continue
                relative = member.name[len(tree) + 1 :]
                entry = wanted[relative]
                destination = staging / relative if relative else staging
                if entry.type == "dir":
                    destination.mkdir(exist_ok=True)
                    os.chmod(destination, entry.mode | 0o700)
                elif entry.type == "symlink":
                    links.append((destination, entry.target))
                else:
                    _extract_file(tar, member, destination, entry.sha256, entry.mode)
                    os.utime(destination, (entry.mtime, entry.mtime))
        # Links last: no file above was written through a link the archive planted.
        for destination, link_target in links:
            os.symlink(link_target, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def _extract_file(
    tar: tarfile.TarFile, member: tarfile.TarInfo, destination: Path, sha256: str, mode: int
) -> None:
    source = tar.extractfile(member)
    if source is None:
        raise SnapshotCorrupt(f"{member.name} is not a regular member")
    digest = hashlib.sha256()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    with os.fdopen(os.open(destination, flags, mode), "wb", buffering=0) as sink:
        while chunk := source.read(CHUNK):
            digest.update(chunk)
            sink.write(chunk)
    if digest.hexdigest() != sha256:
        raise SnapshotCorrupt(
            f"{member.name} changed between verification and restore; nothing was restored"
        )


def _restore_audit(archive: VerifiedArchive, audit: AuditLog) -> tuple[str, str | None]:
    """Keep the live log when it continues the snapshot's chain; otherwise install the
    snapshot's log (moving a different live chain aside, never deleting it)."""
    session = archive.manifest.get("session", {})
    raw_head = session.get("auditHead", {}) if isinstance(session, dict) else {}
    snapshot_head = AuditHead(int(raw_head.get("seq", 0)), str(raw_head.get("hash", "")))
    live = audit.head
    if live.seq > 0 and verify(audit.path, expect_head=snapshot_head).ok:
        return "kept", None
    with tarfile.open(archive.path, mode="r:") as tar:
        member = tar.getmember(AUDIT)
        entry = next(e for e in archive.entries if e.path == AUDIT)
        incoming = audit.path.with_name(audit.path.name + ".restoring")
        incoming.unlink(missing_ok=True)
        _extract_file(tar, member, incoming, entry.sha256, 0o600)
    try:
        replaced = audit.adopt(incoming)
    except AuditLogCorrupt as error:
        incoming.unlink(missing_ok=True)
        raise SnapshotCorrupt(f"snapshot {archive.path}: {error}") from None
    return ("replaced", str(replaced)) if replaced is not None else ("restored", None)


def _swap_in(staging: Path, target: Path) -> None:
    """Replace ``target``'s contents with ``staging``'s, then remove ``staging``."""
    for child in target.iterdir():
        if child == staging:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    for child in staging.iterdir():
        os.replace(child, target / child.name)
    staging.rmdir()
    _fsync_dir(target)


def _fsync_dir(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
