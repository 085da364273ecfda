"""The prefill worker (PD, PDAF): computes a prompt's K/V and ships it to a decode worker.

``POST /v1/prefill {request_id, prompt_tokens, sampling, decode: "host:kvport",
decode_cached_tokens}`` runs the prompt through the model layer by layer and hands each layer's
K/V to ``KVSender.send_layer`` the moment it exists, so layer i is on the wire while layer i+1
computes (the sender's writer thread overlaps the two). The K/V of the first
``decode_cached_tokens`` positions are not sent: the decode worker holds that prefix already
(the router asked it, ``prefix_holds``); the transfer's meta says where the sent K/V start.
It answers with the first token once the last byte is written: the router then starts the
decode worker's stream, whose receiver already holds the K/V. A 502 that the decode worker
caused (its receiver refused the connection or went away mid-transfer) names ``decode`` as
its ``param``, so the router retries on another decode worker rather than blaming this one.

Prefills run first come first served, several prompts in one pass when several wait
(``prefill_batch``: up to ``--max-prefill-tokens`` prompt tokens and ``--max-num-seqs`` prompts
a batch), so a burst of short prompts shares the model's GEMMs instead of queueing one by
one. A prompt's longest cached prefix (the ``PrefixCache`` of recent prompts' full blocks) is
not recomputed, only sent. Connections to decode workers are kept and reused; one that failed
is dropped and dialled again on the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from aiohttp import web

from kleave.workers.model import Decoder
from kleave.workers.prefix_cache import PrefixCache
from kleave.workers.serve.decode_server import parse_sampling
from kleave.workers.serve.forward import ModelThread
from kleave.workers.serve.http import (
    ApiError,
    add_health_routes,
    errors_middleware,
    field,
    read_json,
    token_list,
)
from kleave.workers.serve.metrics import WorkerMetrics
from kleave.workers.serve.plan import ServingPlan
from kleave.workers.serve.prefill_batch import PrefillBatcher, PrefillJob, prefill_jobs
from kleave.workers.serve.runtime import (
    WorkerOptions,
    build_model,
    close_model,
    model_failure,
    plan_info,
)
from kleave.workers.serve.sampling import SamplingParams, sample
from kleave.workers.transport.kv_transfer import KVSender, KVTransferError

log = logging.getLogger(__name__)


def parse_peer(value: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) of a decode worker's KV receiver, or a 400."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ApiError(400, f"decode must be host:port of a KV receiver, not {value!r}", "decode")
    return host.strip("[]"), int(port)


class PrefillServer:
    def __init__(self, plan: ServingPlan, options: WorkerOptions) -> None:
        self.plan = plan
        self.options = options
        self.metrics = WorkerMetrics(plan.model, max_model_len=plan.config.max_position)
        self.thread = ModelThread()
        capacity = int(options.prefix_cache_mb * 2**20)
        self.prefix_cache = (
            PrefixCache(block_size=options.block_size, capacity_bytes=capacity)
            if capacity > 0
            else None
        )
        self.model: Decoder | None = None
        self.load_error: str | None = None
        self.batcher = PrefillBatcher(
            self.thread,
            self._compute,
            max_tokens=options.max_prefill_tokens,
            max_jobs=options.max_num_seqs,
            on_change=self._gauges,
        )
        self._senders: dict[tuple[str, int], KVSender] = {}
        self._dialing: dict[tuple[str, int], asyncio.Lock] = {}
        self._loading: asyncio.Task[None] | None = None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[errors_middleware], client_max_size=16 * 2**20)
        add_health_routes(
            app,
            render_metrics=self.metrics.render,
            ready=self.not_ready,
            info=self.info,
            alive=lambda: model_failure(self.model),
        )
        app.router.add_post("/v1/prefill", self.prefill)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, _: web.Application) -> None:
        self._gauges()
        self.batcher.start()
        self._loading = asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        try:
            self.model = await self.thread.run(build_model, self.plan, self.options)
        except Exception as error:
            log.exception("the prefill worker failed to start")
            self.load_error = f"{type(error).__name__}: {error}"

    async def _on_cleanup(self, _: web.Application) -> None:
        if self._loading is not None:
            self._loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loading
        await self.batcher.stop()
        for sender in self._senders.values():
            with contextlib.suppress(Exception):
                await sender.close(linger=1.0)
        await asyncio.to_thread(close_model, self.model)
        self.thread.close()

    def not_ready(self) -> str | None:
        if self.load_error is not None:
            return f"the prefill worker failed to start: {self.load_error}"
        if self.model is None:
            return f"the prefill worker is loading model {self.plan.preset}"
        failure = model_failure(self.model)
        if failure is not None:
            return f"the prefill worker cannot compute: {failure}"
        return None

    def info(self) -> dict[str, Any]:
        return {
            "role": "prefill",
            **plan_info(self.plan, self.model),
            "running": self.batcher.running,
            "waiting": self.batcher.waiting,
            "batches": self.batcher.batches,
            "decode_peers": sorted(f"{h}:{p}" for h, p in self._senders),
            "kv_backend": self.options.kv_backend,
            "prefix_cache": None
            if self.prefix_cache is None
            else {
                "block_size": self.prefix_cache.block_size,
                "blocks": len(self.prefix_cache),
                "bytes": self.prefix_cache.nbytes,
                "capacity_bytes": self.prefix_cache.capacity_bytes,
                "evicted_blocks": self.prefix_cache.evicted_blocks,
            },
        }

    def _gauges(self) -> None:
        self.metrics.running.set(self.batcher.running)
        self.metrics.waiting.set(self.batcher.waiting)
        self.metrics.kv_usage.set(0.0)  # K/V leaves with the transfer; none is kept here

    async def _sender(self, peer: tuple[str, int]) -> KVSender:
        lock = self._dialing.setdefault(peer, asyncio.Lock())
        async with lock:
            sender = self._senders.get(peer)
            if sender is not None and sender.peer_closed():
                log.info(
                    "the KV connection to decode worker %s:%d is closed (the worker restarted "
                    "or went away); dialing again",
                    *peer,
                )
                await self._drop(peer, sender)
                sender = None
            if sender is None:
                try:
                    sender = await KVSender.connect(
                        *peer,
                        timeout=5.0,
                        backend=self.options.kv_backend,
                        arena_bytes=int(self.options.kv_arena_mb * 2**20),
                        device=self.options.device,
                    )
                except KVTransferError as error:
                    raise ApiError(
                        502, f"decode worker KV receiver {peer[0]}:{peer[1]}: {error}", "decode"
                    ) from None
                self._senders[peer] = sender
            return sender

    async def _drop(self, peer: tuple[str, int], sender: KVSender) -> None:
        if self._senders.get(peer) is sender:
            del self._senders[peer]
        with contextlib.suppress(Exception):
            await sender.close(linger=0.0)

    async def prefill(self, request: web.Request) -> web.Response:
        arrival = time.perf_counter()
        if self.model is None:
            raise ApiError(503, self.not_ready() or "not ready")
        model = self.model
        body = await read_json(request)
        request_id = field(body, "request_id", str)
        prompt = token_list(body, "prompt_tokens", self.plan.config.vocab_size)
        params = parse_sampling(body.get("sampling"))
        peer = parse_peer(field(body, "decode", str))
        skip = field(body, "decode_cached_tokens", int, 0)
        if not 0 <= skip < len(prompt):
            raise ApiError(
                400,
                f"decode_cached_tokens must be at least 0 and below the prompt's {len(prompt)} "
                f"tokens, not {skip}",
                "decode_cached_tokens",
            )
        if len(prompt) >= self.plan.config.max_position:
            raise ApiError(
                400,
                f"the prompt has {len(prompt)} tokens; this model's context is "
                f"{self.plan.config.max_position}",
                "prompt_tokens",
            )
        return await self._run(
            model,
            request_id=request_id,
            prompt=prompt,
            params=params,
            peer=peer,
            skip=skip,
            arrival=arrival,
        )

    def _compute(self, jobs: list[PrefillJob]) -> None:
        """On the model thread: one batch."""
        assert self.model is not None, "prefill jobs are queued only once the model is loaded"
        prefill_jobs(self.model, jobs, self.prefix_cache)

    async def _run(
        self,
        model: Decoder,
        *,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        peer: tuple[str, int],
        skip: int,
        arrival: float,
    ) -> web.Response:
        sender = await self._sender(peer)
        where = f"{peer[0]}:{peer[1]}"
        meta = {
            "num_layers": model.config.num_layers,
            "prompt_len": len(prompt),
            "start": skip,
            "model": self.plan.preset,
            "revision": self.plan.revision,
        }
        try:
            await sender.begin(request_id, meta)
            job = PrefillJob(request_id, prompt, sender, skip)
            await self.batcher.run(job)
            if job.error is not None:
                raise job.error
            assert job.logits is not None
            cached = job.cached
            token = await self.thread.run(sample, job.logits, params, 0)
            self.metrics.ttft.observe(time.perf_counter() - arrival)
            stats = await sender.end(request_id)
        except KVTransferError as error:
            await self._drop(peer, sender)
            raise ApiError(
                502, f"KV transfer to decode worker {where} failed: {error}", "decode"
            ) from None
        except BaseException:
            with contextlib.suppress(Exception):
                await sender.abort(request_id, "the prefill failed")
            raise
        self.metrics.prompt_tokens.inc(len(prompt))
        self.metrics.prefix_cache_queries.inc(len(prompt))
        self.metrics.prefix_cache_hits.inc(cached)
        self.metrics.generation_tokens.inc()
        self.metrics.kv_transfer_bytes.inc(stats.bytes)
        self.metrics.kv_transfer_seconds.observe(stats.seconds)
        self.metrics.request_finished(
            reason="stop" if token in params.stop_token_ids else "length",
            prompt_tokens=len(prompt),
            generation_tokens=1,
            e2e_s=time.perf_counter() - arrival,
        )
        return web.json_response(
            {
                "request_id": request_id,
                "first_token": token,
                "prompt_tokens": len(prompt),
                "cached_tokens": cached,
                "decode_cached_tokens": skip,
                "decode": where,
                "kv_bytes": stats.bytes,
                "kv_seconds": stats.seconds,
            }
        )
