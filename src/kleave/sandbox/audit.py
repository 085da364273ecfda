"""The sandbox's append-only, hash-chained audit log (JSONL).

Each line is one entry in canonical JSON (sorted keys, no spaces, ASCII):
``{"seq", "time", "action", "outcome", "detail", "prev", "hash"}``, where ``hash`` is the
SHA-256 of the canonical JSON of the entry without ``hash`` and ``prev`` is the previous
entry's hash (64 zeros for the first). Changing, deleting, inserting or reordering any entry
breaks the chain at that line; cutting entries off the end does not, which is why the head
(last seq and hash) is handed to the operator to anchor in status, and ``verify`` takes it back
as ``expect_head``.

Flush policy: every append is written with one ``write`` call and fsynced before ``append``
returns, so an entry the runtime acknowledged survives a crash of the runtime or the node. A
crash mid-write can leave a final line without its newline; opening the log drops that torn
line (it was never acknowledged) and records the repair as the next entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

GENESIS = "0" * 64
ENTRY_KEYS = frozenset({"seq", "time", "action", "outcome", "detail", "prev", "hash"})


class AuditLogCorrupt(Exception):  # noqa: N818 - a state, like SnapshotCorrupt
    """The log on disk does not verify, so appending to it would extend a broken chain."""


def canonical(entry: Mapping[str, Any]) -> str:
    """The one JSON spelling of an entry that its hash is computed over."""
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def entry_hash(entry: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of ``entry`` without its ``hash`` key."""
    body = {key: value for key, value in entry.items() if key != "hash"}
    return hashlib.sha256(canonical(body).encode()).hexdigest()


@dataclass(frozen=True)
class AuditHead:
    """The last entry's sequence number and hash; seq 0 and the genesis hash for a new log."""

    seq: int
    hash: str

    def to_dict(self) -> dict[str, Any]:
        """The head as the API and the operator's status carry it."""
        return {"seq": self.seq, "hash": self.hash}


@dataclass(frozen=True)
class AuditVerification:
    """The result of checking a log: ``ok``, or the first bad line and what is wrong with it."""

    ok: bool
    entries: int
    head: AuditHead
    """The head of the verified prefix (the whole log when ``ok``)."""
    bad_line: int | None = None
    """1-based line number of the first problem; None when ok or when the problem is the
    whole log (a truncation detected through ``expect_head``)."""
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The verification as ``GET /v1/audit/verify`` returns it."""
        return {
            "ok": self.ok,
            "entries": self.entries,
            "head": self.head.to_dict(),
            "badLine": self.bad_line,
            "error": self.error,
        }


def verify(path: Path, expect_head: AuditHead | None = None) -> AuditVerification:
    """Check the whole chain of the log at ``path``, naming the first line that breaks it.

    ``expect_head`` is a head recorded earlier (by the operator, or in a snapshot): the log
    must still contain that exact entry, so truncation and a rewritten tail are detected.
    A missing file is an empty log.
    """
    head = AuditHead(0, GENESIS)
    entries = 0
    if expect_head is not None and expect_head.seq == 0:
        if expect_head.hash != GENESIS:
            return AuditVerification(
                False, 0, head, None, "an anchored head at seq 0 must carry the genesis hash"
            )
        expect_head = None
    anchored = expect_head is None
    for number, line in _lines(path):
        problem = _check_line(line, head)
        if problem is not None:
            return AuditVerification(False, entries, head, number, f"line {number}: {problem}")
        parsed = json.loads(line)
        head = AuditHead(parsed["seq"], parsed["hash"])
        entries += 1
        if expect_head is not None and head.seq == expect_head.seq:
            if head.hash != expect_head.hash:
                return AuditVerification(
                    False,
                    entries,
                    head,
                    number,
                    f"line {number}: entry {head.seq} has hash {head.hash}, not the "
                    f"anchored {expect_head.hash}: the log was rewritten since it was anchored",
                )
            anchored = True
    if not anchored and expect_head is not None:
        return AuditVerification(
            False,
            entries,
            head,
            None,
            f"the log ends at entry {head.seq} but entry {expect_head.seq} was anchored: "
            f"{expect_head.seq - head.seq} entries were cut off the end",
        )
    return AuditVerification(True, entries, head)


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        return
    with handle:
        yield from enumerate(handle, start=1)


def _check_line(line: bytes, previous: AuditHead) -> str | None:
    """What is wrong with one raw line given the entry before it, or None."""
    if not line.endswith(b"\n"):
        return "incomplete last line (no newline): a torn write or a cut"
    try:
        entry = json.loads(line)
    except ValueError as error:
        return f"not valid JSON ({error})"
    if not isinstance(entry, dict) or set(entry) != ENTRY_KEYS:
        keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        return f"not an audit entry (keys {keys}, expected {sorted(ENTRY_KEYS)})"
    seq = entry["seq"]
    if not isinstance(seq, int) or isinstance(seq, bool) or seq != previous.seq + 1:
        return (
            f"seq {seq!r} where {previous.seq + 1} was expected: an entry was deleted, "
            "inserted or moved"
        )
    if entry["prev"] != previous.hash:
        return (
            f"prev {entry['prev']!r} does not match the previous entry's hash {previous.hash}: "
            "the entry before it was changed, or entries were replaced"
        )
    if entry["hash"] != entry_hash(entry):
        return "hash does not match the entry's content: the entry was modified"
    if line.rstrip(b"\n") != canonical(entry).encode():
        return "not in canonical form: the line was rewritten"
    return None


class AuditLog:
    """Appends chained entries to one JSONL file; safe to share between threads.

    Opening verifies the existing log and refuses (``AuditLogCorrupt``) one that does not
    verify, so a tampered log is surfaced instead of silently extended.
    """

    def __init__(self, path: Path, *, fsync: bool = True) -> None:
        self.path = path
        self.fsync = fsync
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        torn = self._drop_torn_tail()
        result = verify(path)
        if not result.ok:
            raise AuditLogCorrupt(
                f"the audit log {path} fails verification ({result.error}); keep it as "
                "evidence and start the sandbox with a fresh state directory"
            )
        self._head = result.head
        self._file = path.open("ab")
        if torn:
            self.append("audit.recovered", "ok", {"droppedBytes": torn})

    @property
    def head(self) -> AuditHead:
        """The last entry's seq and hash, for anchoring."""
        with self._lock:
            return self._head

    def append(self, action: str, outcome: str, detail: Mapping[str, Any]) -> AuditHead:
        """Record one event; returns the new head once the entry is on disk."""
        with self._lock:
            entry: dict[str, Any] = {
                "seq": self._head.seq + 1,
                "time": datetime.now(UTC).isoformat(timespec="microseconds"),
                "action": action,
                "outcome": outcome,
                "detail": dict(detail),
                "prev": self._head.hash,
            }
            entry["hash"] = entry_hash(entry)
            self._file.write(canonical(entry).encode() + b"\n")
            self._file.flush()
            if self.fsync:
                os.fsync(self._file.fileno())
            self._head = AuditHead(entry["seq"], entry["hash"])
            return self._head

    def position(self) -> tuple[AuditHead, int]:
        """The head and the byte length of the log up to it, read together.

        The log is append-only, so its first ``length`` bytes stay exactly the entries up to
        ``head``: a snapshot copies that prefix while appends go on.
        """
        with self._lock:
            return self._head, self._file.tell()

    def adopt(self, restored: Path) -> Path | None:
        """Make the log at ``restored`` (same directory) this log, e.g. from a snapshot.

        The incoming log must verify. A current log with entries is not deleted: it is moved
        aside as ``<name>.replaced-<time>`` (returned) so its chain stays available as evidence.
        """
        result = verify(restored)
        if not result.ok:
            raise AuditLogCorrupt(f"the restored audit log does not verify: {result.error}")
        with self._lock:
            self._file.close()
            replaced: Path | None = None
            if self._head.seq > 0:
                stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
                replaced = self.path.with_name(f"{self.path.name}.replaced-{stamp}")
                os.replace(self.path, replaced)
            os.replace(restored, self.path)
            _fsync_dir(self.path.parent)
            self._file = self.path.open("ab")
            self._head = result.head
            return replaced

    def close(self) -> None:
        """Close the file; later appends fail."""
        with self._lock:
            self._file.close()

    def _drop_torn_tail(self) -> int:
        """Cut a final line without a newline (a write the crash interrupted); its byte count."""
        try:
            with self.path.open("rb+") as handle:
                size = handle.seek(0, os.SEEK_END)
                if size == 0:
                    return 0
                handle.seek(size - 1)
                if handle.read(1) == b"\n":
                    return 0
                keep = _last_newline_end(handle, size)
                handle.truncate(keep)
                handle.flush()
                os.fsync(handle.fileno())
                return size - keep
        except FileNotFoundError:
            return 0


def _fsync_dir(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _last_newline_end(handle: IO[bytes], size: int) -> int:
    """Offset just past the last newline before ``size`` (0 when there is none)."""
    position = size
    while position > 0:
        step = min(1 << 16, position)
        position -= step
        handle.seek(position)
        chunk = handle.read(step)
        index = chunk.rfind(b"\n")
        if index >= 0:
            return position + index + 1
    return 0


def read_entries(path: Path, since: int = 0) -> Iterator[dict[str, Any]]:
    """Parsed entries with ``seq > since`` (no verification; use ``verify`` for that)."""
    for _, line in _lines(path):
        entry = json.loads(line)
        if entry["seq"] > since:
            yield entry
