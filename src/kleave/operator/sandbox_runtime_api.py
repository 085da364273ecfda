"""The operator's calls to a sandbox's runtime (``kleave sandbox runtime``): pause, resume, idle.

Three things only the runtime inside the pod can do or know: write a state snapshot to the
sandbox's volume before its pod is freed, restore one into a fresh pod, and say when the agent
last did something. Every call has a deadline, and a failure is a :class:`RuntimeCallError`
whose message names the endpoint and what the runtime answered, for the sandbox's conditions.
"""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from kleave.sandbox.audit import AuditHead, AuditVerification, verify

HEALTH_TIMEOUT_S = 5.0
SNAPSHOT_TIMEOUT_S = 600.0  # a large workspace is read, archived and fsynced
RESTORE_TIMEOUT_S = 600.0


class RuntimeCallError(Exception):
    """A runtime call failed; ``code`` is the runtime's error code when it answered one."""

    def __init__(self, message: str, *, status: int | None = None, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code

    @property
    def corrupt(self) -> bool:
        """The snapshot asked for failed its checksums (the runtime kept the older ones)."""
        return self.code == "snapshot-corrupt"


@dataclass(frozen=True)
class Health:
    """What ``GET /healthz`` says: the idle clock and the audit log's head."""

    last_activity: datetime | None
    running_commands: int
    audit_head: dict[str, Any] | None


class RuntimeApi:
    """An HTTP client for sandbox runtimes, one session shared by every sandbox; each call
    carries the bearer token of the pod it goes to."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _call(
        self,
        method: str,
        endpoint: str,
        path: str,
        *,
        token: str | None,
        timeout: float,
        body: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        url = _base_url(endpoint) + path
        session = await self._http()
        try:
            async with session.request(
                method,
                url,
                json=body,
                headers=_auth(token),
                timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=min(timeout, 5.0)),
            ) as response:
                payload: Any = await response.json(content_type=None)
                if response.status >= 400:
                    error = (payload or {}).get("error") or {} if isinstance(payload, dict) else {}
                    raise RuntimeCallError(
                        f"{method} {url}: {response.status} "
                        f"{error.get('code') or ''} {error.get('message') or ''}".strip(),
                        status=response.status,
                        code=str(error.get("code") or ""),
                    )
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            reason = "timed out" if isinstance(error, TimeoutError) else str(error)
            raise RuntimeCallError(f"{method} {url}: {reason or type(error).__name__}") from None
        if not isinstance(payload, dict):
            raise RuntimeCallError(f"{method} {url}: the runtime answered {payload!r:.200}")
        return payload

    async def health(self, endpoint: str, token: str | None) -> Health:
        body = await self._call("GET", endpoint, "/healthz", token=token, timeout=HEALTH_TIMEOUT_S)
        raw = body.get("lastActivity")
        return Health(
            last_activity=_parse(raw) if isinstance(raw, str) else None,
            running_commands=int(body.get("runningCommands") or 0),
            audit_head=body.get("auditHead") if isinstance(body.get("auditHead"), dict) else None,
        )

    async def snapshot(self, endpoint: str, token: str | None) -> dict[str, Any]:
        """Write a snapshot; the runtime's answer (generation, path, sha256, sizeBytes, ...)."""
        return await self._call(
            "POST", endpoint, "/v1/snapshot", token=token, timeout=SNAPSHOT_TIMEOUT_S
        )

    async def restore(
        self, endpoint: str, token: str | None, generation: int, *, fallback: bool
    ) -> dict[str, Any]:
        body = {"generation": generation, "fallback": fallback}
        return await self._call(
            "POST", endpoint, "/v1/restore", token=token, body=body, timeout=RESTORE_TIMEOUT_S
        )

    async def verify_audit(
        self, endpoint: str, token: str | None, anchor: dict[str, Any] | None
    ) -> AuditVerification:
        """Fetch the sandbox's audit log and check its chain here, against ``anchor``.

        Checked by the operator, not by the runtime: code running in the sandbox shares the
        runtime's uid and could make a runtime's own answer say anything.
        """
        url = _base_url(endpoint) + "/v1/audit"
        session = await self._http()
        timeout = aiohttp.ClientTimeout(total=SNAPSHOT_TIMEOUT_S, sock_connect=5.0)
        with tempfile.NamedTemporaryFile(prefix="kleave-audit-", suffix=".jsonl") as copy:
            try:
                async with session.get(url, headers=_auth(token), timeout=timeout) as response:
                    if response.status >= 400:
                        raise RuntimeCallError(
                            f"GET {url}: {response.status}", status=response.status
                        )
                    async for chunk in response.content.iter_chunked(1 << 20):
                        copy.write(chunk)
            except (aiohttp.ClientError, TimeoutError) as error:
                raise RuntimeCallError(f"GET {url}: {error or 'timed out'}") from None
            copy.flush()
            head = None
            if anchor and anchor.get("hash") and anchor.get("seq") is not None:
                head = AuditHead(int(anchor["seq"]), str(anchor["hash"]))
            return await asyncio.to_thread(verify, Path(copy.name), head)


def _auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _base_url(endpoint: str) -> str:
    """``status.endpoint`` is ``host:port`` (or a full URL for a custom runtime)."""
    endpoint = endpoint.rstrip("/")
    return endpoint if "://" in endpoint else f"http://{endpoint}"


def _parse(value: str) -> datetime | None:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
