"""Workspace file operations on paths the policy guard already approved.

The guard resolves a path once; between that check and the system call an agent could swap a
directory for a symlink. So every open here refuses a symlink as the final component
(``O_NOFOLLOW``) and then asks the kernel where the opened file really is (``/proc/self/fd``)
before a byte is read or a write is committed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from kleave.sandbox.credentials import is_within


class ToolError(Exception):
    """A tool call that is allowed but cannot be done (missing file, too large, ...)."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status

    def to_dict(self) -> dict[str, str]:
        """The error as API responses and audit entries carry it."""
        return {"code": self.code, "message": self.message}


def _confirm_inside(descriptor: int, workspace: Path, shown: str) -> None:
    """Fail unless the open file really is inside the workspace (defeats check/use races)."""
    real = os.readlink(f"/proc/self/fd/{descriptor}")
    if not is_within(real, str(workspace)):
        raise ToolError(
            "path-outside-workspace",
            f"{shown} changed to lead outside the workspace while it was being opened",
            403,
        )


def open_for_read(path: Path, workspace: Path, max_bytes: int) -> tuple[IO[bytes], int]:
    """An open regular file inside the workspace and its size (at most ``max_bytes``)."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ToolError("not-found", f"{path} does not exist", 404) from None
    except OSError as error:
        raise ToolError("unreadable", f"cannot open {path}: {error.strerror}", 400) from None
    handle = os.fdopen(descriptor, "rb")
    try:
        _confirm_inside(descriptor, workspace, str(path))
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            kind = "a directory (use the list call)" if stat.S_ISDIR(info.st_mode) else "special"
            raise ToolError("not-a-file", f"{path} is {kind}, not a regular file", 400)
        if info.st_size > max_bytes:
            raise ToolError(
                "too-large",
                f"{path} is {info.st_size} bytes, over the template's tools.maxFileBytes "
                f"({max_bytes})",
                413,
            )
    except BaseException:
        handle.close()
        raise
    return handle, info.st_size


class Upload:
    """A file write: streamed to a temporary file beside the target, renamed in on commit."""

    def __init__(self, path: Path, workspace: Path, max_bytes: int) -> None:
        if path == workspace or (path.is_dir() and not path.is_symlink()):
            raise ToolError("is-a-directory", f"{path} is a directory", 409)
        self.path = path
        self.max_bytes = max_bytes
        self.size = 0
        self._hash = hashlib.sha256()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            descriptor, temporary = tempfile.mkstemp(prefix=".kleave-upload-", dir=path.parent)
        except OSError as error:
            raise ToolError(
                "unwritable", f"cannot create {path}: {error.strerror or error}", 409
            ) from None
        self._temporary = Path(temporary)
        self._handle = os.fdopen(descriptor, "wb")
        try:
            _confirm_inside(descriptor, workspace, str(path))
        except BaseException:
            self.abort()
            raise

    def write(self, chunk: bytes) -> None:
        """Append a chunk; over the size limit the upload is aborted."""
        self.size += len(chunk)
        if self.size > self.max_bytes:
            self.abort()
            raise ToolError(
                "too-large",
                f"the upload exceeds the template's tools.maxFileBytes ({self.max_bytes} bytes)",
                413,
            )
        self._hash.update(chunk)
        self._handle.write(chunk)

    def commit(self) -> str:
        """Put the file in place (atomically replacing an old one); its SHA-256."""
        self._handle.close()
        os.chmod(self._temporary, 0o644)
        os.replace(self._temporary, self.path)
        return self._hash.hexdigest()

    def abort(self) -> None:
        """Drop the temporary file; the target is untouched."""
        self._handle.close()
        self._temporary.unlink(missing_ok=True)


def delete(path: Path, workspace: Path, *, recursive: bool) -> str:
    """Remove a file, link or (with ``recursive``, non-empty) directory; what it was."""
    if path == workspace:
        raise ToolError("bad-path", "the workspace root itself cannot be deleted", 400)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise ToolError("not-found", f"{path} does not exist", 404) from None
    if stat.S_ISDIR(info.st_mode):
        if recursive:
            shutil.rmtree(path)  # never follows symlinks inside
        else:
            try:
                os.rmdir(path)
            except OSError:
                raise ToolError(
                    "not-empty", f"{path} is a non-empty directory; pass recursive=true", 409
                ) from None
        return "dir"
    os.unlink(path)
    return "symlink" if stat.S_ISLNK(info.st_mode) else "file"


@dataclass(frozen=True)
class Listing:
    """Directory entries (workspace-relative paths) and whether the limit cut the list short."""

    entries: list[dict[str, Any]]
    truncated: bool


def list_directory(path: Path, workspace: Path, *, recursive: bool, limit: int) -> Listing:
    """Entries under ``path`` without following symlinks; at most ``limit`` of them."""
    if not path.is_dir() or path.is_symlink():
        raise ToolError("not-a-directory", f"{path} is not a directory", 400)
    entries: list[dict[str, Any]] = []
    for entry in _scan(path, recursive):
        if len(entries) >= limit:
            return Listing(entries, True)
        info = entry.stat(follow_symlinks=False)
        kind = (
            "symlink"
            if entry.is_symlink()
            else "dir"
            if entry.is_dir(follow_symlinks=False)
            else "file"
            if entry.is_file(follow_symlinks=False)
            else "other"
        )
        entries.append(
            {
                "path": os.path.relpath(entry.path, workspace),
                "name": entry.name,
                "type": kind,
                "size": info.st_size,
                "mtime": info.st_mtime,
            }
        )
    return Listing(entries, False)


def _scan(path: Path, recursive: bool) -> Iterator[os.DirEntry[str]]:
    with os.scandir(path) as iterator:
        children = sorted(iterator, key=lambda e: e.name)
    for child in children:
        if child.name.startswith((".kleave-upload-", ".kleave-restore-")):
            continue
        yield child
        if recursive and child.is_dir(follow_symlinks=False):
            yield from _scan(Path(child.path), recursive)
