"""The FFN worker (PDAF): serves every layer's FFN to the attention workers.

It holds no KV cache and sees no requests, only activations: ``FFNServer`` answers
``ffn(layer, h)`` on the activation port, and HTTP serves health, ``/v1/info`` (which carries
that port, so attention workers can find it) and metrics: how many layer calls and token rows
it computed and how long each took. It has no vLLM request metrics: the attention worker in
front of it counts the requests. With ``--expert-parallel N`` its experts are split over N
ranks, this process and N-1 it starts (``ep_ffn``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import time
from typing import Any

import torch
import torch.distributed as dist
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from kleave.devcluster.processes import free_ports
from kleave.workers.model import Decoder
from kleave.workers.serve.ep_ffn import (
    ExpertParallelFFN,
    build_rank,
    check_expert_parallel,
    start_expert_ranks,
)
from kleave.workers.serve.http import add_health_routes, errors_middleware
from kleave.workers.serve.metrics import TRANSFER_BUCKETS
from kleave.workers.serve.plan import ServingPlan
from kleave.workers.serve.ranks import reap
from kleave.workers.serve.runtime import (
    WorkerOptions,
    build_model,
    close_model,
    model_failure,
    plan_info,
    rank_args,
)
from kleave.workers.transport.af import FFNServer as ActivationServer

log = logging.getLogger(__name__)


class FFNMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self.calls = Counter(
            "kleave:ffn_calls", "FFN layer calls served.", labels, registry=self.registry
        ).labels(model_name)
        self.tokens = Counter(
            "kleave:ffn_tokens",
            "Token rows passed through the FFN.",
            labels,
            registry=self.registry,
        ).labels(model_name)
        self.compute_seconds = Histogram(
            "kleave:ffn_compute_seconds",
            "Seconds of one layer's FFN compute on this worker.",
            labels,
            registry=self.registry,
            buckets=TRANSFER_BUCKETS,
        ).labels(model_name)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class FFNWorker:
    def __init__(self, plan: ServingPlan, options: WorkerOptions) -> None:
        self.plan = plan
        self.options = options
        self.metrics = FFNMetrics(plan.model)
        self.model: Decoder | None = None
        self.server: ActivationServer | None = None
        self.load_error: str | None = None
        self._loading: asyncio.Task[None] | None = None
        self.ep: ExpertParallelFFN | None = None
        self._ranks: list[subprocess.Popen[bytes]] = []

    def app(self) -> web.Application:
        app = web.Application(middlewares=[errors_middleware])
        add_health_routes(
            app,
            render_metrics=self.metrics.render,
            ready=self.not_ready,
            info=self.info,
            alive=lambda: model_failure(self.model),
        )
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    def _ffn(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Runs on the activation server's compute thread."""
        assert self.model is not None
        started = time.perf_counter()
        out = self.ep.ffn(layer, h) if self.ep is not None else self.model.ffn(layer, h)
        self.metrics.compute_seconds.observe(time.perf_counter() - started)
        self.metrics.calls.inc()
        self.metrics.tokens.inc(h.shape[0])
        return out

    async def _on_startup(self, _: web.Application) -> None:
        self._loading = asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        try:
            if self.options.expert_parallel > 1:
                self.ep = await self._start_expert_parallel()
                self.model = self.ep.model
            else:
                self.model = await asyncio.to_thread(build_model, self.plan, self.options)
            self.server = ActivationServer(self._ffn, device=self.model.device)
            await self.server.start(self.options.host, self.options.af_port)
        except Exception as error:
            log.exception("the FFN worker failed to start")
            self.load_error = f"{type(error).__name__}: {error}"

    async def _start_expert_parallel(self) -> ExpertParallelFFN:
        world = self.options.expert_parallel
        check_expert_parallel(self.plan.config, world)
        args = rank_args(self.plan, self.options, world=world, port=free_ports(1)[0])
        self._ranks = start_expert_ranks(args)
        log.info("expert parallel over %d ranks (pids %s)", world, [p.pid for p in self._ranks])
        return await asyncio.to_thread(build_rank, args)

    async def _on_cleanup(self, _: web.Application) -> None:
        if self._loading is not None:
            self._loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loading
        if self.server is not None:
            await self.server.close()
        await asyncio.to_thread(self._stop_ranks)
        await asyncio.to_thread(close_model, self.model)

    def _stop_ranks(self) -> None:
        """Tell the other ranks to stop (no layer call runs now), then reap them."""
        if self.ep is not None:
            with contextlib.suppress(Exception):
                self.ep.stop()
        reap(self._ranks)
        if dist.is_initialized():
            dist.destroy_process_group()
        self.ep = None

    def not_ready(self) -> str | None:
        if self.load_error is not None:
            return f"the ffn worker failed to start: {self.load_error}"
        if self.server is None:
            return f"the ffn worker is loading model {self.plan.preset}"
        failure = model_failure(self.model)
        if failure is not None:
            return f"the ffn worker cannot compute: {failure}"
        return None

    def info(self) -> dict[str, Any]:
        return {
            "role": "ffn",
            **plan_info(self.plan, self.model),
            "af_port": self.server.port if self.server is not None else None,
            "expert_parallel": self.options.expert_parallel,
            "af_host": self.options.advertise_host,
        }
