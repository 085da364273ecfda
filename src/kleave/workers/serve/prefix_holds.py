"""Prefix holds: a decode worker pins the cached blocks of a prompt until its K/V tail arrives.

In PD with prefix caching, the router asks the decode worker how much of a prompt its paged
cache already holds before the prefill starts; the prefill worker then sends the K/V of the
rest only (vLLM's disaggregated decode does the same: its KV connector loads only the blocks
its local prefix cache misses). The blocks counted must still be there when the tail arrives,
so a hold pins them as a sequence of their own; the request's generate call takes the hold
over, and its sequence grows from there. A hold nobody takes is released when the router says
so (the prefill failed), at its deadline (the router went away), or when the engine needs
its blocks with nothing running (the engine then computes the prefix when the request comes).

Holds change the paged cache, which only the engine loop may touch (the model thread reads
it during a step), so `ask` and `free_later` only queue; the loop calls `apply` between steps.
This module is the bookkeeping; the engine owns the cache and the loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from kleave.workers.kv_cache import PagedKVCache


@dataclass(frozen=True)
class Hold:
    """`tokens` cached prompt tokens pinned as sequence `seq_id` for one request."""

    request_id: str
    seq_id: int
    tokens: int
    deadline: float


@dataclass
class _Ask:
    request_id: str
    prompt: list[int]
    ttl_s: float
    answer: asyncio.Future[int]


@dataclass(frozen=True)
class Applied:
    """One hold made by `apply`: the prefix-cache lookup it was (for the metrics)."""

    prompt_tokens: int
    cached_tokens: int


class PrefixHolds:
    def __init__(self) -> None:
        self._asks: list[_Ask] = []
        self._to_free: list[int] = []
        self._held: dict[str, Hold] = {}
        self._released: set[str] = set()  # released before the loop made them

    @property
    def work(self) -> bool:
        """Whether the loop has something to apply."""
        return bool(self._asks or self._to_free)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._held or any(a.request_id == request_id for a in self._asks)

    def __len__(self) -> int:
        return len(self._held)

    def ask(self, request_id: str, prompt: list[int], ttl_s: float) -> asyncio.Future[int]:
        """Queue a hold; the future gets the cached tokens pinned (0: none, nothing held)."""
        ask = _Ask(request_id, prompt, ttl_s, asyncio.get_running_loop().create_future())
        self._asks.append(ask)
        return ask.answer

    def take(self, request_id: str) -> Hold | None:
        """The request's hold, now the caller's: it no longer expires here (give it back with
        `free_later` if the request does not run)."""
        return self._held.pop(request_id, None)

    def release(self, request_id: str) -> bool:
        """Drop a hold nobody will take; False if there was none."""
        hold = self._held.pop(request_id, None)
        if hold is not None:
            self._to_free.append(hold.seq_id)
            return True
        if any(a.request_id == request_id for a in self._asks):
            self._released.add(request_id)
            return True
        return False

    def free_later(self, seq_id: int) -> None:
        """Free a taken hold's sequence at the next `apply`."""
        self._to_free.append(seq_id)

    def apply(
        self, cache: PagedKVCache, new_seq_id: Callable[[], int], now: float | None = None
    ) -> list[Applied]:
        """On the engine loop: free released and expired holds, then make the asked ones."""
        now = time.monotonic() if now is None else now
        for request_id, hold in list(self._held.items()):
            if hold.deadline <= now:
                del self._held[request_id]
                self._to_free.append(hold.seq_id)
        self._free_pending(cache)
        made: list[Applied] = []
        asks, self._asks = self._asks, []
        for ask in asks:
            if ask.answer.done():  # its caller was cancelled
                continue
            if ask.request_id in self._released:
                self._released.discard(ask.request_id)
                ask.answer.set_result(0)
                continue
            seq_id = new_seq_id()
            cached = cache.allocate_prefix(seq_id, ask.prompt, 0)  # takes no fresh block
            if cached:
                self._held[ask.request_id] = Hold(ask.request_id, seq_id, cached, now + ask.ttl_s)
            else:
                cache.free(seq_id)
            made.append(Applied(len(ask.prompt), cached))
            ask.answer.set_result(cached)
        return made

    def drop_all(self, cache: PagedKVCache) -> None:
        """On the engine loop, when blocks are needed now: free every untaken hold (their
        requests then compute the prefix themselves) and every freed-later sequence."""
        self._to_free.extend(hold.seq_id for hold in self._held.values())
        self._held.clear()
        self._free_pending(cache)

    def _free_pending(self, cache: PagedKVCache) -> None:
        for seq_id in self._to_free:
            if seq_id in cache:
                cache.free(seq_id)
        self._to_free.clear()

    def fail(self, error: BaseException) -> None:
        """The engine stopped: every waiting ask fails (the cache goes with the engine)."""
        for ask in self._asks:
            if not ask.answer.done():
                ask.answer.set_exception(error)
        self._asks.clear()
