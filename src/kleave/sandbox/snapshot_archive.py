"""The snapshot file format: a POSIX tar with a manifest and a whole-archive checksum.

Layout, in order::

    <tree>/<path>...    each tree's directories, regular files and symlinks
    audit.jsonl         the audit log up to the head recorded in the manifest
    MANIFEST.json       format, session metadata, and every member with type, size, SHA-256
    CHECKSUM            {"sha256": ..., "bytes": N}: the SHA-256 of the first N bytes of the
                        file, i.e. everything before this member's header

Writing streams (files are hashed as they are copied in, never loaded whole); reading checks
the checksum and every member's hash in one sequential pass before anything is extracted. The
checksum catches corruption; member-name rules (no absolute paths, no ``..``, only files,
directories and symlinks, symlinks created last) make even a forged archive harmless to
extract.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

FORMAT = "kleave-sandbox-snapshot/v1"
MANIFEST = "MANIFEST.json"
CHECKSUM = "CHECKSUM"
AUDIT = "audit.jsonl"
CHUNK = 1 << 20
STAGING_PREFIX = ".kleave-restore-"
"""Restores extract into a directory with this prefix inside the target; walks skip it."""

_TREE_NAME = re.compile(r"^[a-z][a-z0-9-]*$")
_MAX_MANIFEST_BYTES = 256 * 1024 * 1024


class SnapshotError(Exception):
    """A snapshot could not be written or restored."""


class SnapshotCorrupt(SnapshotError):  # noqa: N818 - names the state of the file
    """A snapshot failed verification; nothing was restored from it."""


@dataclass(frozen=True)
class Entry:
    """One manifest entry: a directory, regular file or symlink of a tree, or the audit log."""

    path: str
    type: str  # "dir", "file" or "symlink"
    mode: int = 0o755
    size: int = 0
    sha256: str = ""
    target: str = ""
    mtime: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The manifest spelling: only the keys that apply to the type."""
        data: dict[str, Any] = {"path": self.path, "type": self.type}
        if self.type == "file":
            data.update(size=self.size, sha256=self.sha256, mode=self.mode, mtime=self.mtime)
        elif self.type == "dir":
            data.update(mode=self.mode, mtime=self.mtime)
        else:
            data["target"] = self.target
        return data


class _HashingWriter:
    """A file-like sink that hashes everything written through it (tar calls write/tell)."""

    def __init__(self, sink: IO[bytes]) -> None:
        self._sink = sink
        self.hash = hashlib.sha256()
        self.count = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.count += len(data)
        return self._sink.write(data)

    def tell(self) -> int:
        return self.count


class _HashingReader:
    """Wraps a source file so the bytes tar copies in are hashed on the way."""

    def __init__(self, source: IO[bytes]) -> None:
        self._source = source
        self.hash = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        self.hash.update(data)
        return data


class ArchiveWriter:
    """Streams trees, the audit log prefix, the manifest and the checksum into one tar."""

    def __init__(self, sink: IO[bytes]) -> None:
        self._writer = _HashingWriter(sink)
        self._tar = tarfile.open(  # noqa: SIM115 - closed by finish(), after the checksum
            fileobj=self._writer,  # type: ignore[call-overload]
            mode="w",
            format=tarfile.PAX_FORMAT,
            copybufsize=CHUNK,
        )
        self.entries: list[Entry] = []
        self.skipped: list[str] = []

    def add_tree(self, name: str, root: Path) -> None:
        """Add a directory's contents under ``name/``: dirs, regular files, symlinks (as links)."""
        if not _TREE_NAME.match(name):
            raise ValueError(f"tree name {name!r} must match {_TREE_NAME.pattern}")
        self._add_dir(name, root)
        for directory, dirnames, filenames in os.walk(root, onerror=_raise):
            dirnames.sort()
            relative_dir = os.path.relpath(directory, root)
            for child in list(dirnames):
                if child.startswith(STAGING_PREFIX):
                    dirnames.remove(child)
                    continue
                full = os.path.join(directory, child)
                if os.path.islink(full):
                    self._add_symlink(_member(name, relative_dir, child), full)
                else:
                    self._add_dir(_member(name, relative_dir, child), Path(full))
            for child in sorted(filenames):
                full = os.path.join(directory, child)
                member = _member(name, relative_dir, child)
                info = os.lstat(full)
                if stat.S_ISLNK(info.st_mode):
                    self._add_symlink(member, full)
                elif stat.S_ISREG(info.st_mode):
                    self._add_file(member, Path(full), info.st_size)
                else:
                    self.skipped.append(f"{member} (not a regular file, directory or symlink)")

    def add_file_prefix(self, member: str, path: Path, size: int) -> None:
        """Add the first ``size`` bytes of a file (the audit log up to a consistent head)."""
        self._add_file(member, path, size)

    def finish(self, manifest: Mapping[str, Any]) -> tuple[str, int]:
        """Write MANIFEST.json (``manifest`` plus the entries) and CHECKSUM; the digest, size."""
        document = dict(manifest)
        document["format"] = FORMAT
        document["entries"] = [entry.to_dict() for entry in self.entries]
        self._add_bytes(MANIFEST, json.dumps(document, sort_keys=True, indent=1).encode())
        digest, covered = self._writer.hash.hexdigest(), self._writer.count
        self._add_bytes(CHECKSUM, json.dumps({"sha256": digest, "bytes": covered}).encode())
        self._tar.close()
        return digest, covered

    def _add_dir(self, member: str, path: Path) -> None:
        info = os.stat(path)
        tarinfo = tarfile.TarInfo(member)
        tarinfo.type = tarfile.DIRTYPE
        tarinfo.mode = info.st_mode & 0o777
        tarinfo.mtime = int(info.st_mtime)
        self._tar.addfile(tarinfo)
        self.entries.append(Entry(member, "dir", mode=tarinfo.mode, mtime=tarinfo.mtime))

    def _add_symlink(self, member: str, path: str) -> None:
        tarinfo = tarfile.TarInfo(member)
        tarinfo.type = tarfile.SYMTYPE
        tarinfo.linkname = os.readlink(path)
        self._tar.addfile(tarinfo)
        self.entries.append(Entry(member, "symlink", target=tarinfo.linkname))

    def _add_file(self, member: str, path: Path, size: int) -> None:
        with path.open("rb") as source:
            info = os.fstat(source.fileno())
            tarinfo = tarfile.TarInfo(member)
            tarinfo.size = size
            tarinfo.mode = info.st_mode & 0o777
            tarinfo.mtime = int(info.st_mtime)
            reader = _HashingReader(source)
            try:
                self._tar.addfile(tarinfo, reader)
            except OSError as error:
                raise SnapshotError(
                    f"{path} changed size while it was being snapshotted ({error}); take the "
                    "snapshot again when nothing is writing to it"
                ) from None
        self.entries.append(
            Entry(
                member,
                "file",
                mode=tarinfo.mode,
                size=size,
                sha256=reader.hash.hexdigest(),
                mtime=tarinfo.mtime,
            )
        )

    def _add_bytes(self, member: str, data: bytes) -> None:
        import io

        tarinfo = tarfile.TarInfo(member)
        tarinfo.size = len(data)
        tarinfo.mode = 0o644
        self._tar.addfile(tarinfo, io.BytesIO(data))


def _member(tree: str, relative_dir: str, child: str) -> str:
    return f"{tree}/{child}" if relative_dir == "." else f"{tree}/{relative_dir}/{child}"


def _raise(error: OSError) -> None:
    raise SnapshotError(f"cannot read {error.filename} for the snapshot: {error.strerror}")


# ----- reading ------------------------------------------------------------------------------
@dataclass(frozen=True)
class VerifiedArchive:
    """A snapshot that passed every check: its manifest and the tar members in order."""

    path: Path
    manifest: dict[str, Any]
    entries: tuple[Entry, ...]
    sha256: str


def verify_archive(path: Path) -> VerifiedArchive:
    """Check a snapshot completely, reading it once, without writing anything.

    Raises ``SnapshotCorrupt`` naming the file and the first problem found.
    """

    def corrupt(problem: str) -> SnapshotCorrupt:
        return SnapshotCorrupt(f"snapshot {path} is corrupt: {problem}")

    try:
        with tarfile.open(path, mode="r:") as tar:
            members = tar.getmembers()
            if len(members) < 2 or [m.name for m in members[-2:]] != [MANIFEST, CHECKSUM]:
                raise corrupt("it does not end with MANIFEST.json and CHECKSUM (truncated?)")
            manifest_member, checksum_member = members[-2], members[-1]
            if manifest_member.size > _MAX_MANIFEST_BYTES or checksum_member.size > 4096:
                raise corrupt("the manifest or checksum member is implausibly large")
            checksum = _read_json(tar, checksum_member, corrupt)
    except (tarfile.TarError, OSError, EOFError) as error:
        raise corrupt(f"not a readable tar archive ({error})") from None
    if checksum.get("bytes") != checksum_member.offset:
        raise corrupt("the checksum does not cover exactly the members before it")
    file_members = [m for m in members[:-1] if m.isfile()]
    whole, digests = _hash_pass(path, checksum_member.offset, file_members)
    if whole != checksum.get("sha256"):
        raise corrupt(
            f"whole-archive SHA-256 {whole} does not match the recorded {checksum.get('sha256')}"
        )
    # The checksum covers the manifest, so from here on the manifest is what was written.
    with tarfile.open(path, mode="r:") as tar:
        manifest = _read_json(tar, manifest_member, corrupt)
    if manifest.get("format") != FORMAT:
        raise corrupt(f"unknown format {manifest.get('format')!r}, expected {FORMAT}")
    entries = _parse_entries(manifest, corrupt)
    trees = manifest.get("trees")
    if not isinstance(trees, list) or not all(
        isinstance(t, str) and _TREE_NAME.match(t) for t in trees
    ):
        raise corrupt("the manifest's trees list is missing or malformed")
    _match_members(members[:-2], entries, trees, digests, corrupt)
    return VerifiedArchive(path, manifest, tuple(entries), whole)


def _read_json(tar: tarfile.TarFile, member: tarfile.TarInfo, corrupt: Any) -> dict[str, Any]:
    handle = tar.extractfile(member)
    if handle is None:
        raise corrupt(f"{member.name} is not a regular member")
    try:
        data = json.loads(handle.read())
    except ValueError as error:
        raise corrupt(f"{member.name} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise corrupt(f"{member.name} is not a JSON object")
    return data


def _hash_pass(
    path: Path, limit: int, file_members: list[tarfile.TarInfo]
) -> tuple[str, dict[str, str]]:
    """SHA-256 of the first ``limit`` bytes and of each member's data, in one sequential read."""
    whole = hashlib.sha256()
    ranges = sorted((m.offset_data, m.offset_data + m.size, m.name) for m in file_members)
    hashers = {name: hashlib.sha256() for _, _, name in ranges}
    index = 0
    position = 0
    with path.open("rb") as handle:
        while position < limit:
            chunk = handle.read(min(CHUNK, limit - position))
            if not chunk:
                break
            view = memoryview(chunk)
            whole.update(view)
            end = position + len(chunk)
            while index < len(ranges) and ranges[index][0] < end:
                start, stop, name = ranges[index]
                low, high = max(start, position), min(stop, end)
                if high > low:
                    hashers[name].update(view[low - position : high - position])
                if stop > end:
                    break
                index += 1
            position = end
    return whole.hexdigest(), {name: hasher.hexdigest() for name, hasher in hashers.items()}


def _parse_entries(manifest: Mapping[str, Any], corrupt: Any) -> list[Entry]:
    raw = manifest.get("entries")
    if not isinstance(raw, list):
        raise corrupt("the manifest has no entries list")
    entries: list[Entry] = []
    for item in raw:
        try:
            entry = Entry(
                path=item["path"],
                type=item["type"],
                mode=int(item.get("mode", 0o755)) & 0o777,
                size=int(item.get("size", 0)),
                sha256=str(item.get("sha256", "")),
                target=str(item.get("target", "")),
                mtime=int(item.get("mtime", 0)),
            )
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"malformed manifest entry {item!r}") from None
        entries.append(entry)
    return entries


def _match_members(
    members: list[tarfile.TarInfo],
    entries: list[Entry],
    trees: list[str],
    digests: Mapping[str, str],
    corrupt: Any,
) -> None:
    """Every member is a safe path, listed in the manifest in order, with matching content."""
    if len(members) != len(entries):
        raise corrupt(f"{len(members)} members but the manifest lists {len(entries)}")
    for member, entry in zip(members, entries, strict=True):
        if member.name != entry.path:
            raise corrupt(f"member {member.name!r} where the manifest lists {entry.path!r}")
        problem = unsafe_name(member.name, trees)
        if problem:
            raise corrupt(f"member {member.name!r}: {problem}")
        kind = {tarfile.REGTYPE: "file", tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink"}
        if kind.get(member.type) != entry.type:
            raise corrupt(f"member {member.name!r} is not the {entry.type} the manifest lists")
        if entry.type == "file":
            if member.size != entry.size or digests.get(member.name) != entry.sha256:
                raise corrupt(
                    f"{member.name} does not match its manifest SHA-256/size (content changed)"
                )
        elif entry.type == "symlink" and member.linkname != entry.target:
            raise corrupt(f"symlink {member.name!r} target differs from the manifest")
    if AUDIT not in {entry.path for entry in entries}:
        raise corrupt("it holds no audit log")


def unsafe_name(name: str, trees: list[str]) -> str | None:
    """Why a member name may not be extracted, or None: ``<tree>/<relative path>`` only."""
    if name == AUDIT:
        return None
    parts = name.split("/")
    if parts[0] not in trees:
        return f"outside the snapshot's trees {trees}"
    if any(part in ("", ".", "..") or "\x00" in part for part in parts[1:]):
        return "empty, '.' or '..' path segment"
    return None


def iter_tree(archive: VerifiedArchive, tree: str) -> Iterator[tuple[str, Entry]]:
    """The entries of one tree, as (path relative to the tree, entry); the root is ''."""
    for entry in archive.entries:
        if entry.path == tree:
            yield "", entry
        elif entry.path.startswith(tree + "/"):
            yield entry.path[len(tree) + 1 :], entry
