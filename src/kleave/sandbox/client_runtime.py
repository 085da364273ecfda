"""The in-sandbox runtime's HTTP API as pure request builders and answer readers.

Both SDK flavours build their runtime calls here and read the answers here, so the sync and
async ``Sandbox`` cannot drift apart in what they send or how they read errors. Nothing in
this module does I/O. The API itself is documented in docs/sandbox-runtime.md.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kleave.sandbox.client_types import (
    ExecResult,
    FileEntries,
    HttpRequest,
    RuntimeRefused,
    SandboxError,
)

REFUSAL_STATUSES = frozenset({400, 401, 403, 404, 409, 413})
"""Statuses the runtime uses for "no, and here is why": the request, the token, the policy,
a missing file, a conflict or a size limit. Anything else is the runtime failing."""
NDJSON = "application/x-ndjson"


def normalize_endpoint(endpoint: str) -> str:
    """The runtime's base URL from ``status.endpoint``.

    The operator writes ``host:port`` (a pod IP and the template's runtimePort); a URL is
    accepted as is. A bare IPv6 address with a port (``fd00::5:8080``) gets its brackets, since
    the operator formats ``f"{pod_ip}:{port}"`` whatever the address family.
    """
    text = endpoint.strip().rstrip("/")
    if not text:
        raise SandboxError("the sandbox has no endpoint")
    if "://" in text:
        return text
    if text.count(":") > 1 and not text.startswith("["):
        host, _, port = text.rpartition(":")
        text = f"[{host}]:{port}"
    return f"http://{text}"


def check_argv(argv: Sequence[str]) -> list[str]:
    if isinstance(argv, str | bytes):
        raise TypeError(
            "argv is a list of arguments, e.g. ['ls', '-la'], not one string: the runtime "
            "runs no shell unless the template allows one"
        )
    items = list(argv)
    if not items or not all(isinstance(a, str) for a in items):
        raise TypeError("argv must be a non-empty list of strings")
    return items


class RuntimeCalls:
    """Requests against one runtime endpoint, with its bearer token when it has one."""

    def __init__(self, endpoint: str, token: str | None = None) -> None:
        self.endpoint = normalize_endpoint(endpoint)
        self.token = token
        self.target = f"the sandbox runtime at {self.endpoint}"

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        content: bytes | None = None,
        content_type: str | None = None,
        read_timeout: float | None = 60.0,
    ) -> HttpRequest:
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if body is not None:
            content = json.dumps(body).encode()
            content_type = "application/json"
        if content_type:
            headers["Content-Type"] = content_type
        return HttpRequest(
            method,
            self.endpoint + path,
            self.target,
            params=dict(params or {}),
            headers=headers,
            content=content,
            read_timeout=read_timeout,
        )

    def health(self) -> HttpRequest:
        return self._request("GET", "/healthz", read_timeout=10.0)

    def exec(
        self,
        argv: Sequence[str],
        *,
        cwd: str = ".",
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        stdin: str | bytes | None = None,
    ) -> HttpRequest:
        """``POST /v1/exec``; the answer is an NDJSON stream (or a JSON error)."""
        body: dict[str, Any] = {"argv": check_argv(argv), "cwd": cwd}
        if env:
            body["env"] = dict(env)
        if timeout is not None:
            body["timeoutSeconds"] = timeout
        if stdin is not None:
            body["stdin"] = stdin.decode() if isinstance(stdin, bytes) else stdin
        # No read timeout: a command may print nothing for minutes, and the runtime enforces
        # the template's maxExecSeconds itself.
        return self._request("POST", "/v1/exec", body=body, read_timeout=None)

    def kill(self, exec_id: str) -> HttpRequest:
        return self._request("POST", f"/v1/exec/{exec_id}/kill")

    def read_file(self, path: str) -> HttpRequest:
        return self._request("GET", "/v1/files", params={"path": path})

    def write_file(self, path: str, data: bytes | str) -> HttpRequest:
        content = data.encode() if isinstance(data, str) else bytes(data)
        return self._request(
            "PUT",
            "/v1/files",
            params={"path": path},
            content=content,
            content_type="application/octet-stream",
        )

    def list_files(self, path: str = ".", recursive: bool = False) -> HttpRequest:
        params = {"path": path, **({"recursive": "true"} if recursive else {})}
        return self._request("GET", "/v1/files/list", params=params)

    def delete_file(self, path: str, recursive: bool = False) -> HttpRequest:
        params = {"path": path, **({"recursive": "true"} if recursive else {})}
        return self._request("DELETE", "/v1/files", params=params)

    def load_skill(self, path: str) -> HttpRequest:
        return self._request("POST", "/v1/skills", body={"path": path})

    def audit(self, since: int = 0) -> HttpRequest:
        return self._request("GET", "/v1/audit", params={"since": str(since)} if since else {})

    def audit_head(self) -> HttpRequest:
        return self._request("GET", "/v1/audit/head")

    def verify_audit(self, anchor: Mapping[str, Any] | None = None) -> HttpRequest:
        params = {"seq": str(anchor["seq"]), "hash": str(anchor["hash"])} if anchor else {}
        return self._request("GET", "/v1/audit/verify", params=params, read_timeout=300.0)

    def snapshot(self) -> HttpRequest:
        # A big workspace takes a while to archive and fsync.
        return self._request("POST", "/v1/snapshot", read_timeout=1800.0)

    def restore(self, generation: int | None = None, fallback: bool = False) -> HttpRequest:
        body: dict[str, Any] = {"fallback": fallback}
        if generation is not None:
            body["generation"] = generation
        return self._request("POST", "/v1/restore", body=body, read_timeout=1800.0)


def audit_anchor(anchor: Mapping[str, Any] | tuple[int, str] | None) -> dict[str, Any] | None:
    """``{"seq", "hash"}`` from a status ``auditHead``, an ``audit_head()`` answer or a pair."""
    if anchor is None:
        return None
    if isinstance(anchor, tuple):
        seq, digest = anchor
        return {"seq": int(seq), "hash": str(digest)}
    return {"seq": int(anchor["seq"]), "hash": str(anchor["hash"])}


def check_answer(status: int, body: bytes, endpoint: str) -> None:
    """Raise what an error answer means: :class:`RuntimeRefused` keeping the runtime's code."""
    if status < 400:
        return
    payload: Any = None
    with contextlib.suppress(ValueError):  # a proxy's HTML error page, say
        payload = json.loads(body) if body else None
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        code = str(error.get("code") or f"http-{status}")
        message = str(error.get("message") or "")
    else:
        code, message = f"http-{status}", body[:500].decode(errors="replace")
    if status in REFUSAL_STATUSES:
        details = {k: v for k, v in payload.items() if k != "error"} if payload else {}
        raise RuntimeRefused(status, code, message, endpoint=endpoint, details=details)
    raise SandboxError(f"the sandbox runtime at {endpoint} failed ({status} {code}): {message}")


def json_object(status: int, body: bytes, endpoint: str) -> dict[str, Any]:
    """A JSON object answer, or the error it carries."""
    check_answer(status, body, endpoint)
    try:
        payload = json.loads(body)
    except ValueError:
        raise SandboxError(
            f"the sandbox runtime at {endpoint} answered {status} with something not JSON: "
            f"{body[:200]!r}"
        ) from None
    if not isinstance(payload, dict):
        raise SandboxError(f"the sandbox runtime at {endpoint} answered a non-object: {payload!r}")
    return payload


def json_lines(text: str) -> list[dict[str, Any]]:
    """The audit log's JSONL, one entry per line (blank lines skipped)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def file_entries(payload: Mapping[str, Any]) -> FileEntries:
    return FileEntries(list(payload.get("entries", [])), bool(payload.get("truncated", False)))


def exec_event(line: str) -> dict[str, Any] | None:
    """One NDJSON exec event, or None for a blank keep-alive line."""
    if not line.strip():
        return None
    event = json.loads(line)
    if not isinstance(event, dict):
        raise SandboxError(f"the exec stream sent a non-object line: {line[:200]!r}")
    return event


def collect_exec(events: Iterable[Mapping[str, Any]], endpoint: str) -> ExecResult:
    """Fold a finished exec stream into one :class:`ExecResult`."""
    stdout: list[str] = []
    stderr: list[str] = []
    exec_id = ""
    for event in events:
        kind = event.get("type")
        if kind == "start":
            exec_id = str(event.get("id", ""))
        elif kind == "stdout":
            stdout.append(str(event.get("data", "")))
        elif kind == "stderr":
            stderr.append(str(event.get("data", "")))
        elif kind == "exit":
            return ExecResult(
                code=int(event.get("code", -1)),
                stdout="".join(stdout),
                stderr="".join(stderr),
                timed_out=bool(event.get("timedOut", False)),
                killed=bool(event.get("killed", False)),
                duration_seconds=float(event.get("durationSeconds", 0.0)),
                id=exec_id,
                output_limit_exceeded=bool(event.get("outputLimitExceeded", False)),
                background_killed=bool(event.get("backgroundKilled", False)),
                stdout_bytes=int(event.get("stdoutBytes", 0)),
                stderr_bytes=int(event.get("stderrBytes", 0)),
            )
    raise SandboxError(
        f"the exec stream from {endpoint} ended without an exit event (command {exec_id or '?'}): "
        "the runtime failed or the connection dropped; the command was killed with it"
    )
