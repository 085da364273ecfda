"""One small HTTP server for the kubelet's probes and Prometheus' scrapes.

It runs on the operator's own event loop, so an answer on ``/healthz`` is itself proof that the
loop is not blocked: a stuck loop answers nothing and the liveness probe times out.

* ``/healthz``: liveness. 200 while the operator runs; 503 once it is stopping.
* ``/readyz``: readiness. 200 once kopf has finished its startup handlers (its ``ready_flag``),
  503 before that and while stopping. A standby replica paused by peering is ready too: it is
  healthy and takes over when the active one goes away, so it must not be restarted or
  reported as broken.
* ``/metrics``: the operator's registry in Prometheus text format.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from kleave.operator.metrics import REGISTRY


class HealthState:
    """What the probes report: kopf's readiness flag plus our own stopping mark."""

    def __init__(self, ready_flag: asyncio.Event | None = None) -> None:
        self.ready_flag = ready_flag if ready_flag is not None else asyncio.Event()
        self.stopping = False

    def mark_stopping(self) -> None:
        """Fail both probes from now on; called when the operator begins to shut down."""
        self.stopping = True

    @property
    def alive(self) -> bool:
        return not self.stopping

    @property
    def ready(self) -> bool:
        return self.ready_flag.is_set() and not self.stopping


class HealthServer:
    """The aiohttp server; use ``async with`` or ``start()``/``stop()`` on the operator's loop."""

    def __init__(
        self,
        state: HealthState,
        *,
        host: str,
        port: int,
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self.state = state
        self.host = host
        self.requested_port = port
        self.registry = registry
        self._runner: web.AppRunner | None = None

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def start(self) -> None:
        """Bind and serve; raises OSError when the address is taken."""
        # No access log: probes every few seconds would drown the operator's own messages.
        runner = web.AppRunner(self.make_app(), access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.requested_port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    @property
    def port(self) -> int:
        """The bound port, which differs from the requested one when that was 0."""
        if self._runner is None:
            raise RuntimeError("the health server is not running")
        return int(self._runner.addresses[0][1])

    async def __aenter__(self) -> HealthServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _healthz(self, _: web.Request) -> web.Response:
        if self.state.alive:
            return web.Response(text="ok\n")
        return web.Response(status=503, text="stopping\n")

    async def _readyz(self, _: web.Request) -> web.Response:
        if self.state.ready:
            return web.Response(text="ready\n")
        reason = "stopping" if self.state.stopping else "starting"
        return web.Response(status=503, text=f"{reason}\n")

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )
