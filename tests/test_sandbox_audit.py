"""The audit log's hash chain: every kind of tampering is caught and the bad line named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kleave.sandbox.audit import (
    GENESIS,
    AuditHead,
    AuditLog,
    AuditLogCorrupt,
    canonical,
    entry_hash,
    read_entries,
    verify,
)


def _log(tmp_path: Path, count: int = 5) -> Path:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, fsync=False)
    for index in range(count):
        log.append("exec", "allowed", {"argv": ["echo", str(index)]})
    log.close()
    return path


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def _write(path: Path, lines: list[str]) -> None:
    path.write_text("".join(lines))


def test_a_fresh_log_chains_from_genesis_and_verifies(tmp_path: Path) -> None:
    path = _log(tmp_path, 3)
    entries = list(read_entries(path))
    assert [e["seq"] for e in entries] == [1, 2, 3]
    assert entries[0]["prev"] == GENESIS
    assert entries[1]["prev"] == entries[0]["hash"]
    assert all(e["hash"] == entry_hash(e) for e in entries)
    result = verify(path)
    assert result.ok and result.entries == 3
    assert result.head == AuditHead(3, entries[2]["hash"])


def test_reopening_continues_the_chain(tmp_path: Path) -> None:
    path = _log(tmp_path, 2)
    log = AuditLog(path, fsync=False)
    assert log.head.seq == 2
    log.append("file.read", "refused", {"reason": "credential-path"})
    log.close()
    assert verify(path).ok
    assert [e["seq"] for e in read_entries(path, since=2)] == [3]


def test_a_modified_entry_fails_naming_its_line(tmp_path: Path) -> None:
    path = _log(tmp_path)
    lines = _lines(path)
    lines[2] = lines[2].replace('"allowed"', '"refused"')
    _write(path, lines)
    result = verify(path)
    assert not result.ok
    assert result.bad_line == 3
    assert "modified" in (result.error or "")


def test_a_modified_entry_with_a_recomputed_hash_breaks_the_next_link(tmp_path: Path) -> None:
    path = _log(tmp_path)
    lines = _lines(path)
    entry = json.loads(lines[1])
    entry["detail"] = {"argv": ["echo", "innocent"]}
    entry["hash"] = entry_hash(entry)
    lines[1] = canonical(entry) + "\n"
    _write(path, lines)
    result = verify(path)
    assert not result.ok and result.bad_line == 3
    assert "prev" in (result.error or "")


def test_a_deleted_entry_fails(tmp_path: Path) -> None:
    path = _log(tmp_path)
    lines = _lines(path)
    del lines[1]
    _write(path, lines)
    result = verify(path)
    assert not result.ok and result.bad_line == 2
    assert "deleted" in (result.error or "")


def test_an_inserted_entry_fails(tmp_path: Path) -> None:
    path = _log(tmp_path)
    lines = _lines(path)
    lines.insert(2, lines[1])
    _write(path, lines)
    result = verify(path)
    assert not result.ok and result.bad_line == 3


def test_reordered_entries_fail(tmp_path: Path) -> None:
    path = _log(tmp_path)
    lines = _lines(path)
    lines[1], lines[2] = lines[2], lines[1]
    _write(path, lines)
    result = verify(path)
    assert not result.ok and result.bad_line == 2


def test_bad_json_fails_naming_the_line(tmp_path: Path) -> None:
    path = _log(tmp_path)
    lines = _lines(path)
    lines[3] = lines[3][:20] + "\n"
    _write(path, lines)
    result = verify(path)
    assert not result.ok and result.bad_line == 4
    assert "JSON" in (result.error or "")


def test_reformatted_json_fails(tmp_path: Path) -> None:
    """Same content, different spelling: the log must stay byte-canonical."""
    path = _log(tmp_path)
    lines = _lines(path)
    lines[0] = json.dumps(json.loads(lines[0]), indent=None) + "\n"
    _write(path, lines)
    result = verify(path)
    assert not result.ok and result.bad_line == 1


def test_truncation_is_invisible_without_an_anchor_and_caught_with_one(tmp_path: Path) -> None:
    path = _log(tmp_path)
    anchored = verify(path).head
    _write(path, _lines(path)[:3])
    assert verify(path).ok  # a shorter chain is still a valid chain...
    result = verify(path, expect_head=anchored)
    assert not result.ok  # ...but not the one the operator anchored
    assert "cut off" in (result.error or "")


def test_a_rewritten_tail_is_caught_by_the_anchor(tmp_path: Path) -> None:
    path = _log(tmp_path, 3)
    anchored = verify(path).head
    lines = _lines(path)[:2]
    entry = json.loads(_lines(path)[2])
    entry["detail"] = {"argv": ["true"]}
    entry["hash"] = entry_hash(entry)
    _write(path, [*lines, canonical(entry) + "\n"])
    assert verify(path).ok
    result = verify(path, expect_head=anchored)
    assert not result.ok and result.bad_line == 3


def test_an_anchor_older_than_the_head_still_verifies(tmp_path: Path) -> None:
    path = _log(tmp_path, 3)
    anchored = verify(path).head
    log = AuditLog(path, fsync=False)
    log.append("exec", "allowed", {})
    log.close()
    assert verify(path, expect_head=anchored).ok


def test_opening_a_tampered_log_refuses(tmp_path: Path) -> None:
    path = _log(tmp_path)
    lines = _lines(path)
    del lines[0]
    _write(path, lines)
    with pytest.raises(AuditLogCorrupt, match="line 1"):
        AuditLog(path, fsync=False)


def test_a_torn_last_line_is_dropped_and_the_repair_recorded(tmp_path: Path) -> None:
    path = _log(tmp_path, 3)
    with path.open("ab") as handle:
        handle.write(b'{"seq":4,"ti')
    log = AuditLog(path, fsync=False)
    log.close()
    entries = list(read_entries(path))
    assert entries[-1]["action"] == "audit.recovered"
    assert entries[-1]["detail"] == {"droppedBytes": 12}
    assert verify(path).ok


def test_position_is_a_consistent_prefix(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, fsync=False)
    log.append("a", "ok", {})
    head, length = log.position()
    log.append("b", "ok", {})
    log.close()
    prefix = tmp_path / "prefix.jsonl"
    prefix.write_bytes(path.read_bytes()[:length])
    assert verify(prefix).head == head
