"""Sending :class:`HttpRequest` objects over httpx, blocking or async.

The request-building and answer-reading code is shared and pure; these two small classes are
the only places that differ between the sync and the async SDK. They turn httpx's transport
exceptions into :class:`SandboxError` subclasses that name what could not be reached, so a
caller never has to import httpx to handle a sandbox that went away.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator

import httpx

from kleave.sandbox.client_types import HttpRequest, SandboxError, SandboxUnreachable

CONNECT_TIMEOUT = 10.0
WRITE_TIMEOUT = 60.0
LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=64, keepalive_expiry=30)
"""No cap on connections: each waiting sandbox holds one watch open, and a benchmark waits on
a hundred at once; a cap would make creates queue behind watches."""


def _timeout(request: HttpRequest) -> httpx.Timeout:
    return httpx.Timeout(
        connect=CONNECT_TIMEOUT, read=request.read_timeout, write=WRITE_TIMEOUT, pool=None
    )


def _failure(request: HttpRequest, error: httpx.TransportError) -> SandboxError:
    detail = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    if isinstance(error, httpx.ConnectError | httpx.ConnectTimeout):
        return SandboxUnreachable(f"cannot connect to {request.target}: {detail}")
    return SandboxError(f"{request.method} {request.url} to {request.target} failed: {detail}")


def _build(http: httpx.Client | httpx.AsyncClient, request: HttpRequest) -> httpx.Request:
    return http.build_request(
        request.method,
        request.url,
        params=dict(request.params),
        headers=dict(request.headers),
        content=request.content,
        timeout=_timeout(request),
    )


class SyncStream:
    """An answer being read as it arrives; read errors become :class:`SandboxError`."""

    def __init__(self, response: httpx.Response, request: HttpRequest) -> None:
        self.response = response
        self.request = request
        self.status = response.status_code

    def read(self) -> bytes:
        try:
            return self.response.read()
        except httpx.TransportError as error:
            raise _failure(self.request, error) from error

    def lines(self) -> Generator[str, None, None]:
        try:
            yield from self.response.iter_lines()
        except httpx.TransportError as error:
            raise _failure(self.request, error) from error


class AsyncStream:
    """The async twin of :class:`SyncStream`."""

    def __init__(self, response: httpx.Response, request: HttpRequest) -> None:
        self.response = response
        self.request = request
        self.status = response.status_code

    async def read(self) -> bytes:
        try:
            return await self.response.aread()
        except httpx.TransportError as error:
            raise _failure(self.request, error) from error

    async def lines(self) -> AsyncGenerator[str, None]:
        try:
            async for line in self.response.aiter_lines():
                yield line
        except httpx.TransportError as error:
            raise _failure(self.request, error) from error


class SyncTransport:
    """Blocking calls on one httpx connection pool."""

    def __init__(self, verify: ssl.SSLContext | bool = True, *, trust_env: bool = True) -> None:
        self.http = httpx.Client(verify=verify, limits=LIMITS, trust_env=trust_env)

    def send(self, request: HttpRequest) -> httpx.Response:
        """Send and read the whole answer."""
        try:
            return self.http.send(_build(self.http, request))
        except httpx.TransportError as error:
            raise _failure(request, error) from error

    @contextlib.contextmanager
    def stream(self, request: HttpRequest) -> Iterator[SyncStream]:
        """Send and hand over the answer unread; leaving the block closes the connection."""
        try:
            response = self.http.send(_build(self.http, request), stream=True)
        except httpx.TransportError as error:
            raise _failure(request, error) from error
        try:
            yield SyncStream(response, request)
        finally:
            response.close()

    def close(self) -> None:
        self.http.close()


class AsyncTransport:
    """The same calls on an httpx.AsyncClient, so waiting on a sandbox never blocks the loop."""

    def __init__(self, verify: ssl.SSLContext | bool = True, *, trust_env: bool = True) -> None:
        self.http = httpx.AsyncClient(verify=verify, limits=LIMITS, trust_env=trust_env)

    async def send(self, request: HttpRequest) -> httpx.Response:
        """Send and read the whole answer."""
        try:
            return await self.http.send(_build(self.http, request))
        except httpx.TransportError as error:
            raise _failure(request, error) from error

    @contextlib.asynccontextmanager
    async def stream(self, request: HttpRequest) -> AsyncIterator[AsyncStream]:
        """Send and hand over the answer unread; leaving the block closes the connection."""
        try:
            response = await self.http.send(_build(self.http, request), stream=True)
        except httpx.TransportError as error:
            raise _failure(request, error) from error
        try:
            yield AsyncStream(response, request)
        finally:
            await response.aclose()

    async def close(self) -> None:
        await self.http.aclose()
