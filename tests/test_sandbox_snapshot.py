"""State snapshots: round trip with checksums, corruption refused, the previous one kept."""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kleave.sandbox.audit import AuditLog, read_entries, verify
from kleave.sandbox.snapshot import (
    SnapshotCorrupt,
    SnapshotError,
    list_snapshots,
    restore_snapshot,
    write_snapshot,
)
from kleave.sandbox.snapshot_archive import verify_archive

_OPEN_LOGS: list[AuditLog] = []


@pytest.fixture(autouse=True)
def _close_logs() -> Iterator[None]:
    yield
    while _OPEN_LOGS:
        _OPEN_LOGS.pop().close()


class Sandbox:
    """A workspace, a skills tree, an audit log and a snapshot directory under tmp_path."""

    def __init__(self, root: Path, snapshots: Path | None = None) -> None:
        self.workspace = root / "workspace"
        self.skills = root / "state" / "skills"
        self.snapshots = snapshots or root / "state" / "snapshots"
        self.workspace.mkdir(parents=True)
        self.skills.mkdir(parents=True)
        self.audit = AuditLog(root / "state" / "audit.jsonl", fsync=False)
        _OPEN_LOGS.append(self.audit)

    @property
    def trees(self) -> dict[str, Path]:
        return {"workspace": self.workspace, "skills": self.skills}

    def snapshot(self) -> int:
        info = write_snapshot(
            self.snapshots, self.trees, audit=self.audit, session={"policyDigest": "d" * 64}
        )
        return info.generation


def _tree_digest(root: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        relative = str(path.relative_to(root))
        if path.is_symlink():
            found[relative] = "->" + os.readlink(path)
        elif path.is_file():
            found[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            found[relative] = "dir"
    return found


def _populate(box: Sandbox) -> None:
    (box.workspace / "src" / "pkg").mkdir(parents=True)
    (box.workspace / "src" / "pkg" / "main.py").write_text("print('hi')\n")
    (box.workspace / "empty-dir").mkdir()
    (box.workspace / "data.bin").write_bytes(os.urandom(300_000))
    (box.workspace / "run.sh").write_text("#!/bin/sh\necho run\n")
    (box.workspace / "run.sh").chmod(0o755)
    (box.workspace / "link").symlink_to("src/pkg/main.py")
    (box.workspace / ("long-name-" + "x" * 150)).write_text("pax names\n")
    (box.skills / "pdf").mkdir()
    (box.skills / "pdf" / "SKILL.md").write_text("---\nname: pdf\n---\n")
    box.audit.append("exec", "allowed", {"argv": ["true"]})


def test_round_trip_restores_every_file_mode_link_and_the_audit_log(tmp_path: Path) -> None:
    box = Sandbox(tmp_path / "a")
    _populate(box)
    before = _tree_digest(box.workspace)
    info = write_snapshot(box.snapshots, box.trees, audit=box.audit, session={"k": "v"})
    assert info.generation == 1 and info.files == 5 and info.audit_head.seq == 1
    assert verify_archive(info.path).sha256 == info.sha256

    # A fresh sandbox (new pod, no state) gets the snapshot's files and audit log back.
    fresh = Sandbox(tmp_path / "b", snapshots=box.snapshots)
    (fresh.workspace / "stale.txt").write_text("from the new pod\n")
    result = restore_snapshot(fresh.snapshots, fresh.trees, audit=fresh.audit)
    assert result.generation == 1 and result.audit == "restored"
    assert _tree_digest(fresh.workspace) == before
    assert os.access(fresh.workspace / "run.sh", os.X_OK)
    assert (fresh.skills / "pdf" / "SKILL.md").exists()
    assert fresh.audit.head == box.audit.head
    assert result.session["k"] == "v"
    assert result.session["auditHead"] == box.audit.head.to_dict()


def test_restore_keeps_a_live_log_that_continues_the_snapshot(tmp_path: Path) -> None:
    box = Sandbox(tmp_path)
    _populate(box)
    box.snapshot()
    box.audit.append("file.write", "allowed", {"path": "later.txt"})
    (box.workspace / "later.txt").write_text("after the snapshot\n")
    result = restore_snapshot(box.snapshots, box.trees, audit=box.audit)
    assert result.audit == "kept"
    assert box.audit.head.seq == 2  # nothing was cut from the log
    assert not (box.workspace / "later.txt").exists()  # but the workspace went back


def test_restore_replaces_a_different_chain_but_keeps_it_aside(tmp_path: Path) -> None:
    box = Sandbox(tmp_path / "a")
    _populate(box)
    box.snapshot()
    other = Sandbox(tmp_path / "b")
    other.audit.append("runtime.start", "ok", {})
    result = restore_snapshot(box.snapshots, other.trees, audit=other.audit)
    assert result.audit == "replaced" and result.replaced_audit is not None
    assert [e["action"] for e in read_entries(Path(result.replaced_audit))] == ["runtime.start"]
    assert other.audit.head == box.audit.head
    other.audit.append("restore", "ok", {})
    assert verify(other.audit.path).ok


def _corrupt_one_byte(path: Path, member: str) -> None:
    with tarfile.open(path) as tar:
        offset = tar.getmember(member).offset_data
    with path.open("r+b") as handle:
        handle.seek(offset + 7)
        byte = handle.read(1)
        handle.seek(offset + 7)
        handle.write(bytes([byte[0] ^ 0x01]))


def test_a_corrupt_byte_is_refused_and_the_target_left_alone(tmp_path: Path) -> None:
    box = Sandbox(tmp_path)
    _populate(box)
    first = box.snapshot()
    (box.workspace / "src" / "pkg" / "main.py").write_text("print('second')\n")
    second = box.snapshot()
    _corrupt_one_byte(list_snapshots(box.snapshots)[0][1], "workspace/data.bin")
    (box.workspace / "work-in-progress.txt").write_text("must survive a refused restore\n")
    current = _tree_digest(box.workspace)

    with pytest.raises(SnapshotCorrupt) as refused:
        restore_snapshot(box.snapshots, box.trees, audit=box.audit)
    message = str(refused.value)
    assert f"snap-{second:08d}.tar" in message and "SHA-256" in message
    assert f"[{first}]" in message and "fallback" in message
    assert _tree_digest(box.workspace) == current
    assert not list(box.workspace.glob(".kleave-restore-*"))

    result = restore_snapshot(box.snapshots, box.trees, audit=box.audit, fallback=True)
    assert result.generation == first and len(result.skipped_corrupt) == 1
    assert (box.workspace / "src" / "pkg" / "main.py").read_text() == "print('hi')\n"


@pytest.mark.parametrize("member", ["MANIFEST.json", "CHECKSUM", "audit.jsonl"])
def test_corruption_anywhere_is_refused(tmp_path: Path, member: str) -> None:
    box = Sandbox(tmp_path)
    _populate(box)
    box.snapshot()
    path = list_snapshots(box.snapshots)[0][1]
    _corrupt_one_byte(path, member)
    with pytest.raises(SnapshotCorrupt):
        verify_archive(path)


def test_a_truncated_snapshot_is_refused(tmp_path: Path) -> None:
    box = Sandbox(tmp_path)
    _populate(box)
    box.snapshot()
    path = list_snapshots(box.snapshots)[0][1]
    with path.open("r+b") as handle:
        handle.truncate(path.stat().st_size // 2)
    with pytest.raises(SnapshotCorrupt, match="no older snapshot"):
        restore_snapshot(box.snapshots, box.trees, audit=box.audit)


def test_only_the_newest_two_generations_are_kept(tmp_path: Path) -> None:
    box = Sandbox(tmp_path)
    _populate(box)
    for _ in range(4):
        box.snapshot()
    assert [g for g, _ in list_snapshots(box.snapshots)] == [4, 3]
    assert not list(box.snapshots.glob(".snap-*"))


def test_restoring_a_missing_generation_says_what_exists(tmp_path: Path) -> None:
    box = Sandbox(tmp_path)
    with pytest.raises(SnapshotError, match="no snapshot to restore"):
        restore_snapshot(box.snapshots, box.trees, audit=box.audit)
    box.snapshot()
    with pytest.raises(SnapshotError, match="generation 7"):
        restore_snapshot(box.snapshots, box.trees, audit=box.audit, generation=7)


def test_a_forged_archive_with_an_escaping_member_is_refused(tmp_path: Path) -> None:
    """A valid checksum proves integrity, not origin: member names are checked too."""
    import io
    import json

    from kleave.sandbox.snapshot_archive import ArchiveWriter, Entry

    box = Sandbox(tmp_path)
    forged = box.snapshots / "snap-00000001.tar"
    box.snapshots.mkdir(parents=True)
    with forged.open("wb") as sink:
        writer = ArchiveWriter(sink)
        data = b"owned\n"
        info = tarfile.TarInfo("workspace/../../escaped.txt")
        info.size = len(data)
        writer._tar.addfile(info, io.BytesIO(data))
        writer.entries.append(
            Entry(
                info.name,
                "file",
                mode=0o644,
                size=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
            )
        )
        writer.add_file_prefix("audit.jsonl", box.audit.path, 0)
        writer.finish({"trees": ["workspace"], "session": json.loads("{}")})
    with pytest.raises(SnapshotCorrupt, match=r"'\.\.' path segment"):
        restore_snapshot(box.snapshots, box.trees, audit=box.audit)
    assert not (tmp_path / "escaped.txt").exists()


def test_a_snapshot_carrying_a_tampered_audit_log_is_refused(tmp_path: Path) -> None:
    """Checksums can be recomputed by a forger; the audit chain inside cannot be faked."""
    import json

    from kleave.sandbox.snapshot_archive import ArchiveWriter

    box = Sandbox(tmp_path / "a")
    _populate(box)
    box.audit.append("exec", "refused", {"argv": ["cat", "~/.ssh/id_rsa"]})
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_text(box.audit.path.read_text().replace('"refused"', '"ok"'))
    box.snapshots.mkdir(parents=True)
    with (box.snapshots / "snap-00000001.tar").open("wb") as sink:
        writer = ArchiveWriter(sink)
        writer.add_tree("workspace", box.workspace)
        writer.add_file_prefix("audit.jsonl", tampered, tampered.stat().st_size)
        session = {"auditHead": json.loads(json.dumps(box.audit.head.to_dict()))}
        writer.finish({"trees": ["workspace"], "session": session, "generation": 1})

    fresh = Sandbox(tmp_path / "b", snapshots=box.snapshots)
    (fresh.workspace / "mine.txt").write_text("kept\n")
    with pytest.raises(SnapshotCorrupt, match="does not verify"):
        restore_snapshot(fresh.snapshots, {"workspace": fresh.workspace}, audit=fresh.audit)
    assert sorted(p.name for p in fresh.workspace.iterdir()) == ["mine.txt"]
    assert fresh.audit.head.seq == 0
