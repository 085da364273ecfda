"""Running one command: its own process group, streamed output, timeout, output cap, kill.

Each command starts in a new session, so "kill" means the whole process group: a command that
forked helpers, or a shell pipeline, leaves nothing behind. When the command itself exits, the
rest of its group is killed too; a background process would otherwise hold the output pipes
open and the call would never end (``backgroundKilled`` in the exit event says it happened).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import os
import secrets
import signal
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

READ_SIZE = 64 * 1024


@dataclass(frozen=True)
class ExecSpec:
    """A checked command: what to start, where, with what, and its limits."""

    executable: str
    argv: Sequence[str]
    cwd: Path
    env: Mapping[str, str]
    timeout: float
    max_output_bytes: int
    stdin: bytes | None = None


@dataclass
class ExecResult:
    """How a command ended; the fields of the exit event."""

    code: int | None = None
    timed_out: bool = False
    killed: bool = False
    output_limit_exceeded: bool = False
    background_killed: bool = False
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    duration_seconds: float = 0.0

    def to_event(self) -> dict[str, Any]:
        """The final NDJSON event of an exec stream."""
        return {
            "type": "exit",
            "code": self.code,
            "timedOut": self.timed_out,
            "killed": self.killed,
            "outputLimitExceeded": self.output_limit_exceeded,
            "backgroundKilled": self.background_killed,
            "stdoutBytes": self.stdout_bytes,
            "stderrBytes": self.stderr_bytes,
            "durationSeconds": round(self.duration_seconds, 6),
        }


class ExecProcess:
    """One started command; iterate ``events()`` to drive it to the end."""

    def __init__(self, spec: ExecSpec) -> None:
        self.spec = spec
        self.id = secrets.token_hex(8)
        self.result = ExecResult()
        self._process: asyncio.subprocess.Process | None = None
        self._queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue()
        self._output = 0
        self._started = 0.0

    @property
    def pid(self) -> int | None:
        """The command's pid, which is also its process group id."""
        return self._process.pid if self._process else None

    async def start(self) -> None:
        """Start the command (raises ``OSError`` when it cannot be executed)."""
        self._started = time.monotonic()
        self._process = await asyncio.create_subprocess_exec(
            self.spec.argv[0],
            *self.spec.argv[1:],
            executable=self.spec.executable,
            cwd=self.spec.cwd,
            env=dict(self.spec.env),
            stdin=asyncio.subprocess.PIPE
            if self.spec.stdin is not None
            else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )

    def kill(self, *, reason: str = "killed") -> bool:
        """SIGKILL the whole process group; whether anything was still running."""
        if not self._kill_group():
            return False
        if reason == "timeout":
            self.result.timed_out = True
        elif reason == "output":
            self.result.output_limit_exceeded = True
        else:
            self.result.killed = True
        return True

    def close(self) -> None:
        """Make sure nothing of the command runs on (the caller is done with it)."""
        if self._process is not None and self._process.returncode is None:
            self.kill()
        self._kill_group()

    def _kill_group(self) -> bool:
        if self._process is None:
            return False
        try:
            os.killpg(self._process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    async def events(self) -> AsyncGenerator[dict[str, Any], None]:
        """stdout/stderr events as output arrives, then the exit event; kills on early exit."""
        process = self._process
        assert process is not None and process.stdout is not None and process.stderr is not None
        pumps = [
            asyncio.create_task(self._pump("stdout", process.stdout)),
            asyncio.create_task(self._pump("stderr", process.stderr)),
        ]
        if self.spec.stdin is not None:
            pumps.append(asyncio.create_task(self._feed(self.spec.stdin)))
        waiter = asyncio.create_task(self._wait(process))
        decoders = {
            name: codecs.getincrementaldecoder("utf-8")(errors="replace")
            for name in ("stdout", "stderr")
        }
        open_streams = 2
        try:
            while open_streams:
                item = await self._queue.get()
                if item is None:
                    open_streams -= 1
                    continue
                stream, data = item
                text = decoders[stream].decode(data)
                if text:
                    yield {"type": stream, "data": text}
            for stream, decoder in decoders.items():
                tail = decoder.decode(b"", final=True)
                if tail:
                    yield {"type": stream, "data": tail}
            await waiter
            yield self.result.to_event()
        finally:
            self.close()
            for task in (*pumps, waiter):
                task.cancel()
            await asyncio.gather(*pumps, waiter, return_exceptions=True)

    async def _pump(self, name: str, stream: asyncio.StreamReader) -> None:
        try:
            while data := await stream.read(READ_SIZE):
                room = self.spec.max_output_bytes - self._output
                if len(data) > room:
                    data = data[: max(room, 0)]
                    self.kill(reason="output")
                self._output += len(data)
                if name == "stdout":
                    self.result.stdout_bytes += len(data)
                else:
                    self.result.stderr_bytes += len(data)
                if data:
                    await self._queue.put((name, data))
        finally:
            await self._queue.put(None)

    async def _feed(self, data: bytes) -> None:
        assert self._process is not None and self._process.stdin is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._process.stdin.write(data)
            await self._process.stdin.drain()
            self._process.stdin.close()

    async def _wait(self, process: asyncio.subprocess.Process) -> None:
        # Not process.wait(): asyncio's wait also waits for the pipes to close, which a
        # background child holding them would postpone until it, too, exits.
        try:
            code = await asyncio.wait_for(_exited(process), self.spec.timeout)
        except TimeoutError:
            self.kill(reason="timeout")
            code = await _exited(process)
        # Whatever the command left running in its group would hold the pipes open.
        leftover = self._kill_group()
        ended_by_us = self.result.timed_out or self.result.killed
        self.result.background_killed = leftover and not (
            ended_by_us or self.result.output_limit_exceeded
        )
        self.result.code = code
        self.result.duration_seconds = time.monotonic() - self._started


async def _exited(process: asyncio.subprocess.Process) -> int:
    """The exit code, as soon as the process itself ends (whatever holds its pipes)."""
    try:
        descriptor = os.pidfd_open(process.pid)
    except (AttributeError, OSError):
        descriptor = None  # no pidfd (old kernel) or already gone: the poll below suffices
    if descriptor is not None:
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not ended.done():
                ended.set_result(None)

        loop.add_reader(descriptor, readable)
        try:
            await ended
        finally:
            loop.remove_reader(descriptor)
            os.close(descriptor)
    # asyncio's child watcher records the status just after the exit.
    while process.returncode is None:
        await asyncio.sleep(0.005)
    return process.returncode
