"""Snapshot and restore throughput of the sandbox runtime, measured on a runtime started here.

The bench starts the real runtime in-process (``SandboxRuntime`` + its HTTP server on
127.0.0.1), fills the workspace with files of mixed sizes, and times ``POST /v1/snapshot``
and ``POST /v1/restore`` through the SDK: what a pause and a resume spend on the sandbox's
state, without a cluster (so it runs with ``--skip-cluster`` and in the unit tests).

The bytes are random so compression cannot cheat, and fsyncs stay on, as in a sandbox pod.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

from kleave.api.sandbox_policy import ToolPolicy
from kleave.sandbox.bench_stats import SnapshotResult
from kleave.sandbox.client_async import AsyncSandbox
from kleave.sandbox.client_types import SandboxError
from kleave.sandbox.runtime import RuntimeConfig, SandboxRuntime
from kleave.sandbox.server import start_server

KIB = 1024
SIZE_CYCLE = (
    [4 * KIB] * 32 + [16 * KIB] * 16 + [64 * KIB] * 8 + [256 * KIB] * 4 + [1024 * KIB] * 2
) + [8 * 1024 * KIB]
"""One cycle of file sizes, small first: a source tree's many small files next to a few
large artifacts. About 11.9 MiB and 63 files per cycle; the last file is cut to fit."""
WRITE_CHUNK = 1 << 20


def file_sizes(total_bytes: int) -> Iterator[int]:
    """Sizes that add up to exactly ``total_bytes``, cycling through :data:`SIZE_CYCLE`."""
    left = total_bytes
    while left > 0:
        for size in SIZE_CYCLE:
            take = min(size, left)
            yield take
            left -= take
            if left == 0:
                return


def fill_workspace(workspace: Path, total_bytes: int) -> int:
    """Write ``total_bytes`` of random bytes in mixed-size files over nested directories;
    the number of files."""
    count = 0
    for index, size in enumerate(file_sizes(total_bytes)):
        directory = workspace / f"pkg{index % 8}" / f"mod{index % 3}"
        directory.mkdir(parents=True, exist_ok=True)
        with (directory / f"file{index:05d}.bin").open("wb") as handle:
            left = size
            while left:
                chunk = min(left, WRITE_CHUNK)
                handle.write(os.urandom(chunk))
                left -= chunk
        count += 1
    return count


async def measure_snapshot(workdir: Path, total_bytes: int) -> SnapshotResult:
    """Fill a fresh runtime's workspace, then time one snapshot and one restore of it.

    Before the restore half of the files are deleted, so the restore has real work to do
    (and the check that every byte came back means something).
    """
    token = secrets.token_hex(16)
    runtime = SandboxRuntime(
        RuntimeConfig(
            workspace=workdir / "workspace",
            state_dir=workdir / "state",
            snapshot_dir=workdir / "snapshots",
            policy=ToolPolicy.model_validate({}),
            token=token,
        )
    )
    try:
        files = fill_workspace(runtime.workspace, total_bytes)
        runner, port = await start_server(runtime, "127.0.0.1", 0)
        try:
            async with AsyncSandbox.from_endpoint(f"127.0.0.1:{port}", token=token) as sbx:
                started = time.perf_counter()
                snapshot = await sbx.snapshot()
                snapshot_seconds = time.perf_counter() - started
                for path in sorted(runtime.workspace.rglob("*.bin"))[::2]:
                    path.unlink()
                started = time.perf_counter()
                restored = await sbx.restore()
                restore_seconds = time.perf_counter() - started
        finally:
            await runner.cleanup()
    finally:
        runtime.close()
    if snapshot["dataBytes"] != total_bytes or restored["dataBytes"] != total_bytes:
        raise SandboxError(
            f"the snapshot holds {snapshot['dataBytes']} bytes and the restore wrote "
            f"{restored['dataBytes']}, but the workspace had {total_bytes}"
        )
    return SnapshotResult(
        workspace_bytes=total_bytes,
        files=files,
        archive_bytes=int(snapshot["sizeBytes"]),
        snapshot_seconds=snapshot_seconds,
        restore_seconds=restore_seconds,
    )
