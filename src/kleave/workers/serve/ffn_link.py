"""The attention worker's link to the FFN pool: discover, connect, fail over.

An FFN call is a pure function of (layer, activations), so a call that fails because its FFN
worker died can be sent again to another FFN worker without changing the result: the link
retries once on a fresh connection before the step (and its requests) fail. The FFN workers'
activation ports are not in the plan; each FFN worker reports its own on ``GET /v1/info``.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from urllib.parse import urlsplit

import aiohttp
import torch

from kleave.workers.serve.plan import ServingPlan
from kleave.workers.serve.runtime import WorkerOptions
from kleave.workers.transport.af import FFNClient
from kleave.workers.transport.framing import TransportError

log = logging.getLogger(__name__)

INFO_TIMEOUT_S = 5.0
CALL_TIMEOUT_S = 30.0


class FFNUnavailableError(RuntimeError):
    """No FFN worker of the plan answers; the message lists what was tried."""


async def fetch_info(session: aiohttp.ClientSession, url: str) -> dict[str, object]:
    async with session.get(
        f"{url}/v1/info", timeout=aiohttp.ClientTimeout(total=INFO_TIMEOUT_S)
    ) as response:
        response.raise_for_status()
        info: dict[str, object] = await response.json()
        return info


class FFNLink:
    """One FFN client at a time, chosen stably per attention worker so load spreads."""

    def __init__(self, plan: ServingPlan, options: WorkerOptions) -> None:
        self.plan = plan
        self.options = options
        self.client: FFNClient | None = None
        self.peer: str | None = None
        self.last_error: str | None = None
        self._lock = asyncio.Lock()
        # The same attention worker prefers the same FFN worker; different ones spread out.
        self._preference = zlib.crc32(f"{options.advertise_host}:{options.port}".encode())

    def not_ready(self) -> str | None:
        if self.client is None:
            return f"no FFN worker connected ({self.last_error or 'connecting'})"
        return None

    async def connect(self, *, avoid: str | None = None) -> FFNClient:
        """Connect to an FFN worker of the plan (another than `avoid` when there is one)."""
        async with self._lock:
            if self.client is not None and self.peer != avoid:
                return self.client
            urls = await self.plan.pool("ffn").resolve()
            if not urls:
                raise FFNUnavailableError("the plan's ffn pool resolves to no worker")
            start = self._preference % len(urls)
            ordered = urls[start:] + urls[:start]
            if avoid is not None and len(ordered) > 1:
                ordered = [u for u in ordered if u != avoid] + [u for u in ordered if u == avoid]
            failures = []
            async with aiohttp.ClientSession() as session:
                for url in ordered:
                    try:
                        info = await fetch_info(session, url)
                        port = info.get("af_port")
                        if not isinstance(port, int):
                            raise FFNUnavailableError(
                                f"{url} reports no af_port (is it an ffn worker?)"
                            )
                        host = str(info.get("af_host") or urlsplit(url).hostname)
                        client = await FFNClient.connect(host, port)
                    except (
                        aiohttp.ClientError,
                        TimeoutError,
                        TransportError,
                        FFNUnavailableError,
                    ) as error:
                        failures.append(f"{url}: {error}")
                        continue
                    if self.client is not None:
                        await self.client.close()
                    self.client, self.peer, self.last_error = client, url, None
                    log.info("connected to FFN worker %s (activations on %s:%d)", url, host, port)
                    return client
            self.client, self.peer = None, None
            self.last_error = "; ".join(failures)
            raise FFNUnavailableError(f"no FFN worker answers: {self.last_error}")

    async def keep_connected(self, interval_s: float = 0.5) -> None:
        """Dial until connected, and again whenever the link lost its FFN worker.

        FFN workers may start after their attention workers (pods start in any order), so a
        refused first dial is not an error, only a reason /readyz gives.
        """
        while True:
            if self.client is None:
                try:
                    await self.connect()
                except FFNUnavailableError as error:
                    log.debug("FFN link: %s", error)
            await asyncio.sleep(interval_s)

    async def ffn(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """`h + FFN(norm(h))` of `layer` on an FFN worker; one retry on another connection."""
        client = self.client or await self.connect()
        try:
            return await client.ffn(layer, h, timeout=CALL_TIMEOUT_S)
        except TransportError as error:
            failed = self.peer
            log.warning("FFN worker %s failed (%s); reconnecting", failed, error)
            self.last_error = f"{failed}: {error}"
            try:
                client = await self.connect(avoid=failed)
            except FFNUnavailableError as again:
                raise FFNUnavailableError(
                    f"FFN worker {failed} failed ({error}) and {again}"
                ) from error
            return await client.ffn(layer, h, timeout=CALL_TIMEOUT_S)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None
