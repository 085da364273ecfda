"""What the sandbox SDK hands back and raises, shared by its sync and async halves.

The errors form one tree under :class:`SandboxError` so an agent platform can catch
everything the SDK raises with one ``except``, and still tell a policy refusal (the agent
asked for something the template forbids: report it to the model) from an infrastructure
failure (retry or page someone) by class.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class SandboxError(Exception):
    """Something the SDK could not do; the message says what and, where known, why."""


class SandboxTimeout(SandboxError):  # noqa: N818 - names the outcome, like TimeoutError
    """A wait ran out; the message carries the last phase and conditions seen."""

    def __init__(self, message: str, last_status: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.last_status = dict(last_status or {})


class SandboxUnreachable(SandboxError):  # noqa: N818 - names the state of the sandbox
    """No connection could be made, so the request was never sent (safe to retry)."""


class RuntimeRefused(SandboxError):  # noqa: N818 - a refusal, like PolicyRefusal
    """The in-sandbox runtime refused a call (400/401/403/404/409/413).

    ``code`` is the runtime's machine-readable reason (``command-not-allowed``,
    ``credential-path``, ``unauthorized``, ``not-found``, ...) so callers branch on it rather
    than on message text; ``details`` keeps the rest of the answer (a refused skill's report).
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        endpoint: str = "",
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.endpoint = endpoint
        self.details = dict(details or {})


class KubeApiError(SandboxError):
    """The Kubernetes API server answered with an error status."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"Kubernetes API {status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class ExecResult:
    """A finished command: its exit and everything it printed.

    ``code`` is negative when a signal ended the command (``-9``: killed by the timeout, a
    kill call or the output limit; the flags say which).
    """

    code: int
    stdout: str
    stderr: str
    timed_out: bool
    killed: bool
    duration_seconds: float
    id: str = ""
    output_limit_exceeded: bool = False
    background_killed: bool = False
    stdout_bytes: int = 0
    stderr_bytes: int = 0

    @property
    def ok(self) -> bool:
        """Exited 0 on its own (not timed out, killed or cut off)."""
        return (
            self.code == 0
            and not self.timed_out
            and not self.killed
            and not self.output_limit_exceeded
        )


class FileEntries(list[dict[str, Any]]):
    """A directory listing (``path``, ``name``, ``type``, ``size``, ``mtime`` per entry).

    A list, so it iterates like one, plus ``truncated``: the runtime stops at 10,000 entries
    and a caller walking a big tree must know the listing is partial.
    """

    def __init__(self, entries: list[dict[str, Any]], truncated: bool = False) -> None:
        super().__init__(entries)
        self.truncated = truncated


@dataclass(frozen=True)
class HttpRequest:
    """One HTTP call, built by pure code and sent by the sync or the async transport.

    ``read_timeout`` None means no read timeout: an exec stream is silent for as long as its
    command prints nothing, and a watch for as long as nothing changes.
    """

    method: str
    url: str
    target: str
    """What to name when no connection can be made ("the sandbox runtime at http://...")."""
    params: Mapping[str, str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    content: bytes | None = None
    read_timeout: float | None = 60.0
