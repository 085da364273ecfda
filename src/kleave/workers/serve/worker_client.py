"""The router's calls to workers, with every failure turned into an error that names the worker.

A worker's 4xx is the client's mistake (a prompt too long for its cache, say) and passes
through with its message and ``param``; anything else (refused connection, reset, a stream
that ends early, a 5xx, a read that stalls past the timeout) is a 502 naming the worker's role
and URL, so whoever reads the error knows which process to look at. A read timeout bounds how
long a stalled worker can hold a request: a dead peer fails the request, never hangs it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp

from kleave.workers.serve.http import ApiError
from kleave.workers.serve.routing import WorkerState

_TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError, ConnectionError)


class WorkerFailedError(ApiError):
    """A worker did not do its part; `worker` is the one to look at.

    `detail` is what happened, without the worker's name; `param` is the field of the
    worker's own request that its error named (a prefill worker names ``decode`` when the
    decode worker it was to send the K/V to failed it).
    """

    def __init__(
        self, worker: WorkerState, detail: str, status: int = 502, param: str | None = None
    ) -> None:
        super().__init__(status, f"{worker.role} worker {worker.url} {detail}")
        self.worker = worker
        self.detail = detail
        self.worker_param = param


async def _error_of(response: aiohttp.ClientResponse) -> tuple[str, str | None]:
    text = await response.text()
    try:
        error = json.loads(text)["error"]
        return str(error.get("message", text)), error.get("param")
    except (ValueError, KeyError, TypeError, AttributeError):
        return text.strip()[:500] or response.reason or "", None


async def _raise_for(worker: WorkerState, response: aiohttp.ClientResponse) -> None:
    if response.status < 400:
        return
    message, param = await _error_of(response)
    if response.status in (400, 404, 409, 413):
        raise ApiError(response.status, message, param)
    raise WorkerFailedError(worker, f"answered {response.status}: {message}", param=param)


def _failed(worker: WorkerState, error: BaseException) -> WorkerFailedError:
    worker.ready = False  # until the next health probe says otherwise
    worker.failures += 1
    detail = str(error) or type(error).__name__
    worker.last_error = detail
    return WorkerFailedError(worker, f"failed: {detail}")


async def post_json(
    session: aiohttp.ClientSession,
    worker: WorkerState,
    path: str,
    body: Mapping[str, Any],
    timeout: aiohttp.ClientTimeout,
) -> dict[str, Any]:
    try:
        async with session.post(worker.url + path, json=body, timeout=timeout) as response:
            await _raise_for(worker, response)
            result: dict[str, Any] = await response.json()
            return result
    except ApiError:
        raise
    except _TRANSPORT_ERRORS as error:
        raise _failed(worker, error) from error


async def stream_events(
    session: aiohttp.ClientSession,
    worker: WorkerState,
    path: str,
    body: Mapping[str, Any],
    timeout: aiohttp.ClientTimeout,
) -> AsyncIterator[dict[str, Any]]:
    """The NDJSON events of a worker's stream, ending after its finish event.

    A stream that breaks off before its finish event (the worker died) raises
    WorkerFailedError; so does an ``{"error": ...}`` event.
    """
    try:
        async with session.post(worker.url + path, json=body, timeout=timeout) as response:
            await _raise_for(worker, response)
            async for raw in response.content:
                if not raw.strip():
                    continue
                event: dict[str, Any] = json.loads(raw)
                if "error" in event:
                    error = event["error"]
                    message = error.get("message") if isinstance(error, Mapping) else error
                    raise WorkerFailedError(worker, f"failed the request: {message}")
                yield event
                if "finish_reason" in event:
                    return
    except ApiError:
        raise
    except json.JSONDecodeError as error:
        raise WorkerFailedError(worker, f"sent a malformed stream line: {error}") from error
    except _TRANSPORT_ERRORS as error:
        raise _failed(worker, error) from error
    raise WorkerFailedError(worker, "closed the stream before the request finished")
