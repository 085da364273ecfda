"""What every worker and the router serve alike: errors, health, metrics, request parsing.

Errors are OpenAI-style JSON (``{"error": {"message", "type", "param", "code"}}``) everywhere,
worker APIs included, so the router can pass a worker's refusal through unchanged and a client
library reports it as it would OpenAI's. Handlers are cancelled when their client disconnects
(``handler_cancellation``): a streaming request whose reader went away stops at once and
frees its KV blocks instead of generating into a closed socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from kleave.workers.serve.metrics import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

_ERROR_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    409: "conflict_error",
    502: "bad_gateway_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class ApiError(Exception):
    """An error a handler returns as OpenAI-style JSON with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": _ERROR_TYPES.get(status, "server_error"),
            "param": param,
            "code": status,
        }
    }


def error_response(status: int, message: str, param: str | None = None) -> web.Response:
    return web.json_response(error_body(status, message, param), status=status)


@web.middleware
async def errors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """ApiError -> its JSON; aiohttp's own 404/405 as JSON too; a bug as a JSON 500."""
    try:
        return await handler(request)
    except ApiError as failure:
        return error_response(failure.status, failure.message, failure.param)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, f"{request.method} {request.path}: {exc.reason}")
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as error:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, f"internal error: {error!r}")


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def field(
    body: Mapping[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...
) -> Any:
    """`body[name]` checked against `kind` (bools are not ints), or a 400 naming the field."""
    if name not in body or body[name] is None:
        if default is ...:
            raise ApiError(400, f"{name} is required", param=name)
        return default
    value = body[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise ApiError(400, f"{name} must be {_kind_name(kinds)}, not {value!r}", param=name)
    if not isinstance(value, kinds):
        raise ApiError(400, f"{name} must be {_kind_name(kinds)}, not {value!r}", param=name)
    return value


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean"}
    names |= {list: "a list", dict: "an object"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def token_list(body: Mapping[str, Any], name: str, vocab_size: int) -> list[int]:
    """A non-empty list of token ids below `vocab_size`, or a 400 naming the bad element."""
    value = field(body, name, list)
    if not value:
        raise ApiError(400, f"{name} must not be empty", param=name)
    for index, token in enumerate(value):
        if isinstance(token, bool) or not isinstance(token, int):
            raise ApiError(400, f"{name}[{index}] must be a token id, not {token!r}", param=name)
        if not 0 <= token < vocab_size:
            raise ApiError(
                400,
                f"{name}[{index}] = {token} is outside the vocabulary [0, {vocab_size})",
                param=name,
            )
    return list(value)


Probe = Callable[[], str | None]
"""None when ready, else why not (the /readyz 503 body)."""


def add_health_routes(
    app: web.Application,
    *,
    render_metrics: Callable[[], bytes],
    ready: Probe,
    info: Callable[[], Mapping[str, Any]],
    alive: Probe | None = None,
) -> None:
    """/healthz (the process answers; a 500 when ``alive`` says it can never serve again,
    so the kubelet restarts it), /readyz (it can serve), /metrics, /v1/info."""

    async def healthz(_: web.Request) -> web.Response:
        reason = alive() if alive is not None else None
        if reason is not None:
            return error_response(500, reason)
        return web.json_response({"status": "ok", **info()})

    async def readyz(_: web.Request) -> web.Response:
        reason = ready()
        if reason is not None:
            return error_response(503, reason)
        return web.json_response({"status": "ready"})

    async def metrics(_: web.Request) -> web.Response:
        response = web.Response(body=render_metrics())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def info_handler(_: web.Request) -> web.Response:
        return web.json_response(dict(info()))

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/info", info_handler)


async def serve_forever(app: web.Application, host: str, port: int, *, announce: str) -> None:
    """Run `app` until SIGTERM/SIGINT; print ``announce`` with the bound URL once listening.

    `announce` is a format string with ``{url}``: `kleave workers up` reads that line to learn
    the port a worker started with ``--port 0`` got.
    """
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    sock = bind_socket(host, port)
    bound = int(sock.getsockname()[1])
    site = web.SockSite(runner, sock, shutdown_timeout=2.0)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    print(announce.format(url=f"http://{_url_host(host)}:{bound}"), flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket; bound here so the caller knows the port ``0`` picked."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
