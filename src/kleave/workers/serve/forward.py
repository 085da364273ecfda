"""Where a worker's forward passes run: the model thread, and (PDAF) the remote FFN workers.

The model runs on one dedicated thread, never on the event loop: torch releases the GIL in its
kernels, so the aiohttp loop keeps answering health checks, accepting requests and streaming
tokens while a step computes. One thread, not a pool, because the KV cache and the model are
not safe to use from two threads at once and a second thread would not make a step faster.

A `Forward` is the engine's view of "run the model": `LocalForward` runs whole passes
(`prefill`, `decode_step`) in one hop to the model thread; `RemoteFFNForward` (the PDAF
attention worker) runs each layer's attention locally and sends the activations to an FFN
worker, layer by layer, composing the same pieces `MoEDecoder.prefill`/`decode_step` use.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

import torch

from kleave.workers.kv_cache import PagedKVCache
from kleave.workers.model import Decoder

T = TypeVar("T")
KVLayers = list[tuple[torch.Tensor, torch.Tensor]]


class ModelThread:
    """A single worker thread that every torch call of one process goes through."""

    def __init__(self, name: str = "model") -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class Forward(Protocol):
    """Prefill one sequence / decode one token for a batch, wherever the layers run."""

    async def prefill(
        self, tokens: list[int], past: KVLayers | None = None
    ) -> tuple[torch.Tensor, KVLayers]:
        """The last position's float32 logits `[vocab]` and every layer's (K, V) of the whole
        sequence; with `past` (the K/V of the positions before `tokens`) only `tokens` run."""
        ...

    async def decode(
        self, tokens: list[int], positions: list[int], cache: PagedKVCache, seq_ids: list[int]
    ) -> torch.Tensor:
        """float32 logits `[B, vocab]`; writes each sequence's new K/V into `cache`."""
        ...


class LocalForward:
    """The whole model in this process."""

    def __init__(self, model: Decoder, thread: ModelThread) -> None:
        self.model = model
        self.thread = thread

    async def prefill(
        self, tokens: list[int], past: KVLayers | None = None
    ) -> tuple[torch.Tensor, KVLayers]:
        ids = torch.tensor(tokens, dtype=torch.long)
        return await self.thread.run(self.model.prefill, ids, past)

    async def decode(
        self, tokens: list[int], positions: list[int], cache: PagedKVCache, seq_ids: list[int]
    ) -> torch.Tensor:
        return await self.thread.run(
            self.model.decode_step,
            torch.tensor(tokens, dtype=torch.long),
            torch.tensor(positions, dtype=torch.long),
            cache,
            seq_ids,
        )


RemoteFFN = Callable[[int, torch.Tensor], Awaitable[torch.Tensor]]
"""`await ffn(layer, h)`: h + FFN(norm(h)) computed by an FFN worker."""


class RemoteFFNForward:
    """Attention here, every layer's FFN on an FFN worker (attention-FFN disaggregation).

    The composition is exactly `MoEDecoder.prefill`/`decode_step` with `model.ffn` replaced by
    the remote call, so with the same weights the tokens are the same as a local pass.
    `on_exchange` gets the seconds of each layer's round trip (the af_exchange histogram).
    """

    def __init__(
        self,
        model: Decoder,
        thread: ModelThread,
        ffn: RemoteFFN,
        on_exchange: Callable[[float], None] | None = None,
    ) -> None:
        self.model = model
        self.thread = thread
        self.ffn = ffn
        self.on_exchange = on_exchange

    async def _remote_ffn(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        out = await self.ffn(layer, h)
        if self.on_exchange is not None:
            self.on_exchange(time.perf_counter() - started)
        return out

    async def prefill(
        self, tokens: list[int], past: KVLayers | None = None
    ) -> tuple[torch.Tensor, KVLayers]:
        model = self.model
        ids = torch.tensor(tokens, dtype=torch.long)
        positions = model.prefill_positions(len(tokens), past)
        h = await self.thread.run(model.embed, ids)
        kv: KVLayers = []
        for layer in range(model.config.num_layers):
            before = None if past is None else past[layer]
            h, k, v = await self.thread.run(model.attention_prefill, layer, h, positions, before)
            kv.append((k, v))
            h = await self._remote_ffn(layer, h)
        logits = await self.thread.run(model.logits, h[-1:])
        return logits[0], kv

    async def decode(
        self, tokens: list[int], positions: list[int], cache: PagedKVCache, seq_ids: list[int]
    ) -> torch.Tensor:
        model = self.model
        where = torch.tensor(positions, dtype=torch.long)
        h = await self.thread.run(model.embed, torch.tensor(tokens, dtype=torch.long))
        for layer in range(model.config.num_layers):
            h = await self.thread.run(model.attention_decode, layer, h, where, cache, seq_ids)
            h = await self._remote_ffn(layer, h)
        return await self.thread.run(model.logits, h)
