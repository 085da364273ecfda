"""The servers that hold a KV cache and stream tokens: colocated, decode and attention.

All three run the continuous-batching engine and answer ``POST /v1/generate``; they differ in
where a request's prefill comes from and where the FFN runs:

* ``colocated``: the engine prefills the prompt itself;
* ``decode`` (PD): a prefill worker sends the prompt's K/V to this worker's KV receiver under
  the request id, and the router's generate call carries the prefill's first token. A decode
  worker also prefills requests that come without one (the router's fallback);
* ``attention`` (PDAF): a decode worker whose every layer's FFN runs on an FFN worker.

``POST /v1/generate`` body: ``request_id``, ``prompt_tokens``, ``sampling`` (SamplingParams
fields), optional ``first_token`` (then the K/V must arrive within ``kv_timeout_s``), ``stream``
(``"ndjson"`` default, ``"sse"``, or false for one JSON answer). Stream lines are
``{"index", "token"}``, then ``{"finish_reason", "prompt_tokens", "completion_tokens"}``, or
``{"error": {...}}`` when the request fails after the stream began.

Decode and attention workers also answer ``POST /v1/kv/hold {request_id, prompt_tokens, ttl_s}``
with ``{cached_tokens}``: the router asks before the prefill, and the prefill worker then sends
only the K/V after those tokens (``prefix_holds``); ``POST /v1/kv/release {request_id}`` drops a
hold whose prefill failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from kleave.workers.kv_cache import PagedKVCache
from kleave.workers.model import Decoder
from kleave.workers.serve.engine import (
    Engine,
    ErrorEvent,
    FinishEvent,
    RejectedRequestError,
    RequestStream,
    TokenEvent,
)
from kleave.workers.serve.ffn_link import FFNLink
from kleave.workers.serve.forward import Forward, LocalForward, ModelThread, RemoteFFNForward
from kleave.workers.serve.http import (
    ApiError,
    add_health_routes,
    error_body,
    errors_middleware,
    field,
    read_json,
    token_list,
)
from kleave.workers.serve.metrics import WorkerMetrics
from kleave.workers.serve.plan import ServingPlan
from kleave.workers.serve.runtime import (
    WorkerOptions,
    build_cache,
    build_model,
    close_model,
    model_failure,
    plan_info,
)
from kleave.workers.serve.sampling import SamplingError, SamplingParams
from kleave.workers.transport.kv_transfer import KVReceiver, KVTransferError

log = logging.getLogger(__name__)

STREAM_FORMATS = ("ndjson", "sse")
MAX_HOLD_S = 3600.0  # a hold pins cache blocks: no client may pin them for longer


def parse_sampling(raw: Any) -> SamplingParams:
    if raw is None:
        return SamplingParams()
    if not isinstance(raw, Mapping):
        raise ApiError(400, "sampling must be an object", param="sampling")
    try:
        return SamplingParams.from_dict(raw)
    except SamplingError as error:
        raise ApiError(400, str(error), param=error.field) from None


class DecodeServer:
    """One colocated, decode or attention worker: engine, KV receiver, FFN link, HTTP API."""

    def __init__(self, plan: ServingPlan, options: WorkerOptions, role: str) -> None:
        self.plan = plan
        self.options = options
        self.role = role
        self.metrics = WorkerMetrics(plan.model, max_model_len=plan.config.max_position)
        self.thread = ModelThread()
        self.model: Decoder | None = None
        self.cache: PagedKVCache | None = None
        self.engine: Engine | None = None
        self.receiver: KVReceiver | None = None
        self.ffn: FFNLink | None = None
        self.load_error: str | None = None
        self._loading: asyncio.Task[None] | None = None
        self._linking: asyncio.Task[None] | None = None

    # ----- lifecycle --------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[errors_middleware], client_max_size=64 * 2**20)
        add_health_routes(
            app,
            render_metrics=self.metrics.render,
            ready=self.not_ready,
            info=self.info,
            alive=lambda: model_failure(self.model),
        )
        app.router.add_post("/v1/generate", self.generate)
        if self.role != "colocated":
            app.router.add_post("/v1/kv/hold", self.hold)
            app.router.add_post("/v1/kv/release", self.release)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, _: web.Application) -> None:
        if self.role != "colocated":
            self.receiver = KVReceiver(backend=self.options.kv_backend, device=self.options.device)
            await self.receiver.start(self.options.host, self.options.kv_port)
        # Load in the background: /healthz answers while a large model initialises.
        self._loading = asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        try:
            self.model = await self.thread.run(build_model, self.plan, self.options)
            self.cache = await self.thread.run(build_cache, self.plan, self.options, self.model)
            forward: Forward
            if self.role == "attention":
                self.ffn = FFNLink(self.plan, self.options)
                loop = asyncio.get_running_loop()
                self._linking = loop.create_task(self.ffn.keep_connected())
                forward = RemoteFFNForward(
                    self.model, self.thread, self.ffn.ffn, self.metrics.af_exchange_seconds.observe
                )
            else:
                forward = LocalForward(self.model, self.thread)
            self.engine = Engine(
                forward,
                self.cache,
                self.thread,
                self.metrics,
                max_model_len=self.plan.config.max_position,
                max_num_seqs=self.options.max_num_seqs,
                max_prefill_tokens=self.options.max_prefill_tokens,
                prefix_caching=self.options.prefix_caching,
            )
            self.engine.start()
        except Exception as error:
            log.exception("the %s worker failed to start", self.role)
            self.load_error = f"{type(error).__name__}: {error}"

    async def _on_cleanup(self, _: web.Application) -> None:
        for task in (self._loading, self._linking):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.engine is not None:
            await self.engine.stop()
        if self.receiver is not None:
            await self.receiver.close()
        if self.ffn is not None:
            await self.ffn.close()
        await asyncio.to_thread(close_model, self.model)
        self.thread.close()

    def not_ready(self) -> str | None:
        if self.load_error is not None:
            return f"the {self.role} worker failed to start: {self.load_error}"
        if self.engine is None:
            return f"the {self.role} worker is loading model {self.plan.preset}"
        failure = model_failure(self.model)
        if failure is not None:
            return f"the {self.role} worker cannot compute: {failure}"
        if not self.engine.alive:
            return f"the {self.role} worker's engine stopped: {self.engine.failure!r}"
        if self.ffn is not None:
            return self.ffn.not_ready()
        return None

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "role": self.role,
            **plan_info(self.plan, self.model),
            "kv_port": self.receiver.port if self.receiver is not None else None,
            "kv_host": self.options.advertise_host,
        }
        if self.engine is not None:
            info |= self.engine.stats()
        if self.ffn is not None:
            info["ffn_peer"] = self.ffn.peer
        return info

    # ----- POST /v1/generate ------------------------------------------------------------------
    async def generate(self, request: web.Request) -> web.StreamResponse:
        arrival = time.perf_counter()
        engine = self._engine()
        body = await read_json(request)
        request_id = field(body, "request_id", str)
        prompt = token_list(body, "prompt_tokens", self.plan.config.vocab_size)
        params = parse_sampling(body.get("sampling"))
        first_token = field(body, "first_token", int, None)
        stream_format = _stream_format(body.get("stream", "ndjson"))
        kv_timeout = float(field(body, "kv_timeout_s", (int, float), self.options.kv_timeout_s))
        # Taken now, so it cannot expire while the K/V arrive; submit owns it from here.
        hold = engine.holds.take(request_id) if first_token is not None else None
        try:
            engine.check(len(prompt), params)
            if first_token is not None and not 0 <= first_token < self.plan.config.vocab_size:
                raise ApiError(
                    400, f"first_token {first_token} is outside the vocabulary", "first_token"
                )
        except (RejectedRequestError, ApiError) as error:
            if first_token is not None and self.receiver is not None:
                self.receiver.discard(request_id)  # its K/V must not wait here for ever
            engine.give_back(hold)
            if isinstance(error, ApiError):
                raise
            raise ApiError(400, str(error), param=error.field) from None
        kv, kv_start = None, 0
        if first_token is not None:
            try:
                kv, kv_start = await self._receive_kv(engine, request_id, kv_timeout)
            except BaseException:
                engine.give_back(hold)
                raise
        try:
            stream = engine.submit(
                request_id,
                prompt,
                params,
                first_token=first_token,
                kv=kv,
                kv_start=kv_start,
                hold=hold,
                arrival=arrival,
            )
        except RejectedRequestError as error:
            raise ApiError(400, str(error), param=error.field) from None
        if stream_format is None:
            return await _collect(request_id, stream)
        return await _stream(request, request_id, stream, stream_format)

    def _engine(self) -> Engine:
        reason = self.not_ready()
        if reason is not None or self.engine is None:
            raise ApiError(503, reason or "not ready")
        return self.engine

    async def hold(self, request: web.Request) -> web.Response:
        """Pin the prompt's cached prefix for the request's K/V; -> ``{cached_tokens}``."""
        engine = self._engine()
        body = await read_json(request)
        request_id = field(body, "request_id", str)
        prompt = token_list(body, "prompt_tokens", self.plan.config.vocab_size)
        ttl = float(field(body, "ttl_s", (int, float), self.options.kv_timeout_s))
        if not 0 < ttl <= MAX_HOLD_S:
            raise ApiError(400, f"ttl_s must be in (0, {MAX_HOLD_S:.0f}] seconds", "ttl_s")
        try:
            cached = engine.hold_prefix(request_id, prompt, ttl)
        except RejectedRequestError as error:
            raise ApiError(400, str(error), param=error.field) from None
        except RuntimeError as error:
            raise ApiError(503, str(error)) from None
        return web.json_response({"request_id": request_id, "cached_tokens": cached})

    async def release(self, request: web.Request) -> web.Response:
        """Drop a hold whose prefill failed (a hold also ends at its ``ttl_s``)."""
        engine = self._engine()
        request_id = field(await read_json(request), "request_id", str)
        released = engine.release_hold(request_id)
        return web.json_response({"request_id": request_id, "released": released})

    async def _receive_kv(
        self, engine: Engine, request_id: str, timeout: float
    ) -> tuple[list[tuple[Any, Any]], int]:
        """The request's K/V and the prompt position they start at."""
        assert self.receiver is not None, "a colocated worker has no KV receiver"
        engine.pending += 1
        try:
            received = await self.receiver.receive(request_id, timeout=timeout)
        except KVTransferError as error:
            raise ApiError(502, f"the prefill KV of request {request_id} failed: {error}") from None
        finally:
            engine.pending -= 1
        self.metrics.kv_transfer_bytes.inc(received.bytes)
        self.metrics.kv_transfer_seconds.observe(received.seconds)
        start = received.meta.get("start", 0)
        if not isinstance(start, int) or isinstance(start, bool):
            raise ApiError(502, f"the prefill KV of request {request_id} has a bad start {start!r}")
        return received.layers, start


def _stream_format(value: Any) -> str | None:
    if value is False or value is None:
        return None
    if value is True:
        return "ndjson"
    if value in STREAM_FORMATS:
        return str(value)
    raise ApiError(
        400, f"stream must be false, true, {' or '.join(STREAM_FORMATS)}", param="stream"
    )


def event_payload(event: TokenEvent | FinishEvent | ErrorEvent) -> dict[str, Any]:
    if isinstance(event, TokenEvent):
        return {"index": event.index, "token": event.token}
    if isinstance(event, FinishEvent):
        return {
            "finish_reason": event.reason,
            "prompt_tokens": event.prompt_tokens,
            "completion_tokens": event.completion_tokens,
        }
    return error_body(event.status, event.message)


async def _collect(request_id: str, stream: RequestStream) -> web.Response:
    tokens: list[int] = []
    async for event in stream:
        if isinstance(event, TokenEvent):
            tokens.append(event.token)
        elif isinstance(event, FinishEvent):
            return web.json_response(
                {"request_id": request_id, "tokens": tokens, **event_payload(event)}
            )
        else:
            return web.json_response(event_payload(event), status=event.status)
    raise ApiError(500, f"request {request_id} ended without a finish event")


async def _stream(
    request: web.Request, request_id: str, stream: RequestStream, stream_format: str
) -> web.StreamResponse:
    sse = stream_format == "sse"
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream" if sse else "application/x-ndjson",
            "Cache-Control": "no-cache",
            "X-Request-Id": request_id,
        }
    )
    await response.prepare(request)
    async for event in stream:
        line = json.dumps(event_payload(event), separators=(",", ":"))
        await response.write((f"data: {line}\n\n" if sse else line + "\n").encode())
    if sse:
        await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response
