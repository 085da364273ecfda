"""The router: an OpenAI-compatible API in front of the prefill and decode (or attention) pools.

Per request: pick a decode worker and a prefill worker by load and prefix locality
(routing.py); ask the decode worker to hold the prompt's prefix its cache has (when it caches
prefixes), then the prefill worker to prefill the prompt and send the K/V of the rest to the
decode worker's KV receiver; then stream the decode worker's tokens to the client as OpenAI
chunks.
Colocated plans skip the prefill hop. A worker failure before the first token is retried on
other workers (`Generation`). Errors before the first token are HTTP errors (400
naming the field, 404 for another model, 503 when a pool has no ready worker, 502 naming the
worker that failed); after it, an SSE ``error`` event, which OpenAI's client raises as an
``APIError``; the stream then ends without ``[DONE]``, so a truncated answer never looks
complete.

Workers are found by resolving each pool's URL from the plan (a headless Service: one
address per ready pod) every `refresh_s`, and probed on ``/readyz`` and ``/v1/info`` (the
decode workers' KV ports come from there).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from kleave.workers.serve import openai_api
from kleave.workers.serve.http import (
    ApiError,
    add_health_routes,
    error_body,
    errors_middleware,
    read_json,
)
from kleave.workers.serve.metrics import RouterMetrics
from kleave.workers.serve.openai_api import GenerationRequest, StopMatcher
from kleave.workers.serve.plan import ServingPlan
from kleave.workers.serve.prefix_index import PrefixIndex, reusable_keys
from kleave.workers.serve.routing import (
    PrefixChoice,
    WorkerState,
    choose_by_prefix,
)
from kleave.workers.serve.worker_client import WorkerFailedError, post_json, stream_events
from kleave.workers.tokenizer import ByteTokenizer, IncrementalDecoder

log = logging.getLogger(__name__)

PROBE_TIMEOUT = aiohttp.ClientTimeout(total=3.0)
HOLD_MARGIN_S = 30.0  # a prefix hold outlives the prefill's own timeout by this much


@dataclass(frozen=True)
class RouterOptions:
    host: str = "0.0.0.0"
    port: int = 8000
    refresh_s: float = 1.0
    imbalance: int = 4  # in-flight requests a prefix's worker may exceed the idlest by
    default_max_tokens: int = 256  # chat requests without max_tokens
    worker_timeout_s: float = 60.0  # longest silence from a worker before the request fails
    block_size: int = 16  # the prefix-locality key's length in tokens (the KV page size)
    retries: int = 2  # attempts on other workers after a failure before the first token


class Generation:
    """One request's trip through the pools; `tokens()` yields, then `finish_reason` is set.

    A failure before the first token reaches the client is retried on other workers (up to
    `RouterOptions.retries` times): a prefill worker that died, a decode worker whose KV
    receiver is gone, a decode worker that failed before streaming. Each attempt avoids every
    worker an earlier one blamed and uses a fresh request id, so a decode worker holding a
    half-received transfer from the failed attempt never mistakes the retry for it. Once a
    token has been streamed the request fails instead (the client has part of an answer).
    """

    def __init__(self, router: Router, request: GenerationRequest) -> None:
        self.router = router
        self.request = request
        self.finish_reason = "length"
        self.attempts = 0
        self.keys = reusable_keys(request.prompt_tokens, router.options.block_size)

    async def tokens(self) -> AsyncGenerator[int, None]:
        router = self.router
        avoid: set[WorkerState] = set()
        failures: list[WorkerFailedError] = []
        while True:
            request_id = self.request.id if not failures else f"{self.request.id}.{len(failures)}"
            self.attempts += 1
            streamed = False
            try:
                async with contextlib.aclosing(self._attempt(request_id, avoid)) as attempt:
                    async for token in attempt:
                        streamed = True
                        yield token
                return
            except WorkerFailedError as error:
                if streamed or not self._can_retry(error, avoid, len(failures)):
                    raise _with_earlier(error, failures) from None
                failures.append(error)
                avoid.add(error.worker)
                router.metrics.retries.labels(router.plan.model, error.worker.role).inc()
                log.warning("request %s: %s; retrying", self.request.id, error.message)

    def _can_retry(self, error: WorkerFailedError, avoid: set[WorkerState], retried: int) -> bool:
        """Retries are left and the failed worker's pool has another ready worker."""
        if retried >= self.router.options.retries:
            return False
        role = error.worker.role
        return any(w is not error.worker for w in self.router.ready_workers(role, avoid))

    async def _attempt(self, request_id: str, avoid: set[WorkerState]) -> AsyncGenerator[int, None]:
        router, request = self.router, self.request
        plan = router.plan
        decode = router.choose(plan.decode_role, request.prompt_tokens, self.keys, avoid).worker
        body: dict[str, Any] = {
            "request_id": request_id,
            "prompt_tokens": request.prompt_tokens,
            "sampling": request.params.to_dict(),
            "stream": "ndjson",
        }
        timeout = aiohttp.ClientTimeout(
            total=None, connect=5.0, sock_read=router.options.worker_timeout_s
        )
        self._check_fits(decode)
        held = 0
        if plan.topology != "Colocated":
            body["first_token"], held = await self._prefill(request_id, decode, avoid, timeout)
        output: list[int] = []
        try:
            with router.track(decode):
                events = stream_events(router.session, decode, "/v1/generate", body, timeout)
                async for event in events:
                    if "token" in event:
                        output.append(int(event["token"]))
                        yield output[-1]
                    elif "finish_reason" in event:
                        self.finish_reason = str(event["finish_reason"])
        except BaseException:
            if held:  # in case the generate call never took it (a hold taken is not released)
                router.release_later(decode, request_id)
            raise
        router.record(decode, request.prompt_tokens + output)  # its cache keeps the answer too

    def _check_fits(self, decode: WorkerState) -> None:
        """Refuse before the prefill what the chosen decode worker's cache could never hold.

        The decode worker would refuse it too, but only after the prefill worker spent the
        compute and shipped K/V that nobody will use.
        """
        blocks, size = decode.info.get("num_blocks"), decode.info.get("block_size")
        if not isinstance(blocks, int) or not isinstance(size, int) or size < 1:
            return
        request = self.request
        total = len(request.prompt_tokens) + request.params.max_tokens
        if -(-total // size) > blocks:
            raise ApiError(
                400,
                f"the prompt ({len(request.prompt_tokens)} tokens) plus max_tokens "
                f"({request.params.max_tokens}) needs {-(-total // size)} KV blocks of {size} "
                f"tokens; {decode.role} worker {decode.url} has {blocks} in all",
                "max_tokens",
            )

    async def _prefill(
        self,
        request_id: str,
        decode: WorkerState,
        avoid: set[WorkerState],
        timeout: aiohttp.ClientTimeout,
    ) -> tuple[int, int]:
        """-> (the first token, the prompt tokens the decode worker holds)."""
        router, request = self.router, self.request
        kv = decode.kv_address
        if kv is None:
            raise ApiError(503, f"{decode.role} worker {decode.url} reports no KV receiver port")
        choice = router.choose("prefill", request.prompt_tokens, self.keys, avoid)
        outcome = "hit" if choice.affinity else "override"
        router.metrics.prefix_hits.labels(router.plan.model, outcome).inc()
        held = await self._hold(request_id, decode)
        body = {
            "request_id": request_id,
            "prompt_tokens": request.prompt_tokens,
            "sampling": request.params.to_dict(),
            "decode": kv,
            "decode_cached_tokens": held,
        }
        with router.track(choice.worker):
            try:
                result = await post_json(
                    router.session, choice.worker, "/v1/prefill", body, timeout
                )
            except BaseException as error:
                if held:
                    router.release_later(decode, request_id)
                if not isinstance(error, WorkerFailedError) or error.worker_param != "decode":
                    raise
                # The prefill worker is fine; the decode worker's KV receiver failed it.
                decode.failures += 1
                decode.last_error = f"KV transfer from {choice.worker.url} failed"
                raise WorkerFailedError(
                    decode, f"did not take the K/V from {choice.worker.url}: {error.detail}"
                ) from None
        return int(result["first_token"]), held

    async def _hold(self, request_id: str, decode: WorkerState) -> int:
        """Have the decode worker pin the prompt's prefix its cache holds; -> its tokens,
        which the prefill worker then does not send (0 when it caches no prefixes)."""
        router, prompt = self.router, self.request.prompt_tokens
        size = decode.info.get("block_size")
        if decode.info.get("prefix_caching") is not True or not isinstance(size, int):
            return 0  # a worker that caches no prefixes (or predates holds) gets all the K/V
        if len(prompt) <= size:
            return 0
        body = {
            "request_id": request_id,
            "prompt_tokens": prompt,
            "ttl_s": router.options.worker_timeout_s + HOLD_MARGIN_S,
        }
        try:
            result = await post_json(router.session, decode, "/v1/kv/hold", body, PROBE_TIMEOUT)
        except WorkerFailedError:
            router.release_later(decode, request_id)  # it may have held it before timing out
            raise
        except ApiError as error:  # an optimisation: without it, all the K/V are sent
            log.warning("request %s: %s did not hold its prefix: %s", request_id, decode.url, error)
            return 0
        cached = result.get("cached_tokens")
        return cached if isinstance(cached, int) and 0 <= cached < len(prompt) else 0


def _with_earlier(error: WorkerFailedError, earlier: list[WorkerFailedError]) -> ApiError:
    """The last failure, saying what the attempts before it hit."""
    if not earlier:
        return error
    before = "; ".join(e.message for e in earlier)
    return ApiError(error.status, f"{error.message} (after retrying: {before})", error.param)


class Router:
    def __init__(self, plan: ServingPlan, options: RouterOptions) -> None:
        self.plan = plan
        self.options = options
        self.tokenizer = ByteTokenizer(plan.config.vocab_size)
        self.metrics = RouterMetrics(plan.model)
        self.roles = ("decode",) if plan.topology == "Colocated" else ("prefill", plan.decode_role)
        self.workers: dict[str, dict[str, WorkerState]] = {role: {} for role in self.roles}
        self.prefixes = {role: PrefixIndex(options.block_size) for role in self.roles}
        self.resolve_errors: dict[str, str] = {}
        self.created = int(time.time())
        self._session: aiohttp.ClientSession | None = None
        self._discovery: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "the router is not started"
        return self._session

    def app(self) -> web.Application:
        app = web.Application(middlewares=[errors_middleware])
        add_health_routes(
            app, render_metrics=self.metrics.render, ready=self.not_ready, info=self.info
        )
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    # ----- workers ----------------------------------------------------------------------------
    async def _on_startup(self, _: web.Application) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
        )
        await self.refresh()
        self._discovery = asyncio.get_running_loop().create_task(self._discover())

    async def _on_cleanup(self, _: web.Application) -> None:
        if self._discovery is not None:
            self._discovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._discovery
        if self._background:
            await asyncio.wait(self._background, timeout=PROBE_TIMEOUT.total)
        if self._session is not None:
            await self._session.close()

    async def _discover(self) -> None:
        while True:
            await asyncio.sleep(self.options.refresh_s)
            try:
                await self.refresh()
            except Exception:
                log.exception("worker discovery failed")

    async def refresh(self) -> None:
        """Resolve every pool and probe each of its workers once."""
        probes = []
        for role in self.roles:
            try:
                urls = await self.plan.pool(role).resolve()
                self.resolve_errors.pop(role, None)
            except OSError as error:
                self.resolve_errors[role] = f"cannot resolve {self.plan.pool(role).url}: {error}"
                continue
            known = self.workers[role]
            for url in urls:
                known.setdefault(url, WorkerState(url, role))
            for url in [u for u, w in known.items() if u not in urls and not w.outstanding]:
                del known[url]  # its pod is gone
                self.prefixes[role].forget(url)
            probes += [self._probe(worker) for worker in known.values()]
        await asyncio.gather(*probes)

    async def _probe(self, worker: WorkerState) -> None:
        try:
            async with self.session.get(f"{worker.url}/readyz", timeout=PROBE_TIMEOUT) as response:
                if response.status != 200:
                    worker.ready = False
                    worker.last_error = f"not ready: {(await response.text())[:300]}"
                    return
            async with self.session.get(f"{worker.url}/v1/info", timeout=PROBE_TIMEOUT) as response:
                response.raise_for_status()
                info = await response.json()
            if worker.info.get("instance") != info.get("instance"):
                self.prefixes[worker.role].forget(worker.url)  # a new process: an empty cache
            worker.info = info
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            worker.ready = False
            worker.last_error = str(error) or type(error).__name__
            return
        if worker.role != "prefill" and self.plan.topology != "Colocated" and not worker.kv_address:
            worker.ready = False
            worker.last_error = "reports no KV receiver port"
            return
        worker.ready = True

    def ready_workers(self, role: str, avoid: Collection[WorkerState] = ()) -> list[WorkerState]:
        return [w for w in self.workers[role].values() if w.ready and w not in avoid]

    def no_worker(self, role: str) -> ApiError:
        pool = self.plan.pool(role)
        known = self.workers[role].values()
        why = "; ".join(f"{w.url}: {w.last_error}" for w in known if w.last_error)
        why = why or self.resolve_errors.get(role) or "none found"
        return ApiError(503, f"no {role} worker is ready (pool {pool.url}): {why}")

    def choose(
        self,
        role: str,
        tokens: Sequence[int],
        keys: Sequence[bytes],
        avoid: Collection[WorkerState] = (),
    ) -> PrefixChoice:
        """The ready worker whose cache most likely holds the prompt's start (its `keys`:
        `reusable_keys`), unless it is much busier (`routing.choose_by_prefix`); the index
        then counts the prompt as sent there."""
        ready = self.ready_workers(role, avoid)
        if not ready:
            raise self.no_worker(role)
        index = self.prefixes[role]
        choice = choose_by_prefix(
            ready,
            tokens,
            block_size=self.options.block_size,
            imbalance=self.options.imbalance,
            index=index,
            keys=keys,
        )
        index.record(choice.worker.url, keys)
        return choice

    def record(self, worker: WorkerState, tokens: Sequence[int]) -> None:
        """`worker`'s cache now holds these tokens' blocks (prompt and answer)."""
        index = self.prefixes[worker.role]
        index.record(worker.url, index.keys(tokens))

    def release_later(self, worker: WorkerState, request_id: str) -> None:
        """Drop a prefix hold whose prefill failed, in the background (its ttl_s ends it
        anyway if the worker cannot be told)."""
        task = asyncio.get_running_loop().create_task(self._release(worker, request_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _release(self, worker: WorkerState, request_id: str) -> None:
        body = {"request_id": request_id}
        try:
            await post_json(self.session, worker, "/v1/kv/release", body, PROBE_TIMEOUT)
        except ApiError as error:
            log.info("could not release request %s's hold on %s: %s", request_id, worker.url, error)

    @contextlib.contextmanager
    def track(self, worker: WorkerState) -> Iterator[None]:
        """Count the request as in flight to `worker` for the router's load balancing."""
        gauge = self.metrics.outstanding.labels(self.plan.model, worker.role, worker.url)
        worker.outstanding += 1
        worker.served += 1
        gauge.inc()
        try:
            yield
        except ApiError as error:
            if error.status >= 500:
                failed = error.worker if isinstance(error, WorkerFailedError) else worker
                self.metrics.worker_errors.labels(self.plan.model, failed.role, failed.url).inc()
            raise
        finally:
            worker.outstanding -= 1
            gauge.dec()

    def not_ready(self) -> str | None:
        missing = [role for role in self.roles if not self.ready_workers(role)]
        if missing:
            return "; ".join(self.no_worker(role).message for role in missing)
        return None

    def info(self) -> dict[str, Any]:
        return {
            "role": "router",
            "model": self.plan.model,
            "topology": self.plan.topology,
            "revision": self.plan.revision,
            "pools": {
                role: [
                    {
                        "url": w.url,
                        "ready": w.ready,
                        "outstanding": w.outstanding,
                        "served": w.served,
                        "failures": w.failures,
                        "last_error": w.last_error,
                    }
                    for w in workers.values()
                ]
                for role, workers in self.workers.items()
            },
        }

    # ----- the OpenAI API ---------------------------------------------------------------------
    async def models(self, _: web.Request) -> web.Response:
        return web.json_response(openai_api.models_list(self.plan.model, self.created))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._endpoint(request, "completions")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._endpoint(request, "chat")

    async def _endpoint(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        status = 200
        try:
            body = await read_json(request)
            if endpoint == "chat":
                parsed = openai_api.parse_chat(
                    body,
                    served_model=self.plan.model,
                    tokenizer=self.tokenizer,
                    default_max_tokens=self.options.default_max_tokens,
                )
            else:
                parsed = openai_api.parse_completion(
                    body, served_model=self.plan.model, tokenizer=self.tokenizer
                )
            self._check_context(parsed)
            if parsed.stream:
                return await self._stream(request, parsed)
            return await self._complete(parsed)
        except ApiError as error:
            status = error.status
            raise
        finally:
            self.metrics.requests.labels(self.plan.model, endpoint, str(status)).inc()

    def _check_context(self, request: GenerationRequest) -> None:
        total = len(request.prompt_tokens) + request.params.max_tokens
        limit = self.plan.config.max_position
        if total > limit:
            raise ApiError(
                400,
                f"the prompt ({len(request.prompt_tokens)} tokens) plus max_tokens "
                f"({request.params.max_tokens}) is {total} tokens, over the model's context "
                f"of {limit}",
                "max_tokens",
            )

    async def _complete(self, request: GenerationRequest) -> web.Response:
        started = time.perf_counter()
        generation = Generation(self, request)
        decoder, matcher = IncrementalDecoder(), StopMatcher(request.stop)
        tokens: list[int] = []
        text: list[str] = []
        async with contextlib.aclosing(generation.tokens()) as stream:
            async for token in stream:
                if not tokens:
                    self.metrics.ttft.observe(time.perf_counter() - started)
                tokens.append(token)
                text.append(matcher.push(decoder.feed(token)))
                if matcher.stopped:
                    generation.finish_reason = "stop"
                    break
        text.append(matcher.push(decoder.flush()) + matcher.flush())
        self.metrics.e2e.observe(time.perf_counter() - started)
        body = openai_api.response(request, "".join(text), tokens, generation.finish_reason)
        return web.json_response(body)

    async def _stream(self, http: web.Request, request: GenerationRequest) -> web.StreamResponse:
        started = time.perf_counter()
        generation = Generation(self, request)
        async with contextlib.aclosing(generation.tokens()) as stream:
            iterator = aiter(stream)
            # Errors before the first token are still plain HTTP errors.
            first = await anext(iterator, None)
            self.metrics.ttft.observe(time.perf_counter() - started)
            response = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
            )
            await response.prepare(http)
            try:
                count = await self._send_chunks(response, request, generation, first, iterator)
            except ApiError as error:
                log.warning("request %s failed mid-stream: %s", request.id, error.message)
                await _sse(response, error_body(error.status, error.message, error.param))
                await response.write_eof()
                return response
        if request.include_usage:
            await _sse(response, openai_api.usage_chunk(request, count))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        self.metrics.e2e.observe(time.perf_counter() - started)
        return response

    async def _send_chunks(
        self,
        response: web.StreamResponse,
        request: GenerationRequest,
        generation: Generation,
        first: int | None,
        rest: AsyncIterator[int],
    ) -> int:
        """Send the tokens as chunks (text pieces, with their ids when asked); the count."""
        decoder, matcher = IncrementalDecoder(), StopMatcher(request.stop)
        if request.kind == "chat":
            await _sse(response, openai_api.chunk(request, "", first=True))
        count, ids = 0, []
        token = first
        while token is not None:
            count += 1
            ids.append(token)
            text = matcher.push(decoder.feed(token))
            if matcher.stopped:
                generation.finish_reason = "stop"
                tail = text  # the text before the stop string
                break
            if text:
                await _sse(response, openai_api.chunk(request, text, token_ids=ids))
                ids = []
            token = await anext(rest, None)
        else:
            tail = matcher.push(decoder.flush()) + matcher.flush()
        final = openai_api.chunk(
            request, tail, finish_reason=generation.finish_reason, token_ids=ids
        )
        await _sse(response, final)
        return count


async def _sse(response: web.StreamResponse, payload: dict[str, Any]) -> None:
    await response.write(f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode())
