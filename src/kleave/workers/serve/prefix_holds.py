"""Prefix holds: a decode worker pins the cached blocks of a prompt until its K/V tail arrives.

In PD with prefix caching, the router asks the decode worker how much of a prompt its paged
cache already holds before the prefill starts; the prefill worker then sends the K/V of the
rest only (vLLM's disaggregated decode does the same: its KV connector loads only the blocks
its local prefix cache misses). The blocks counted must still be there when the tail arrives,
so a hold pins them as a sequence of their own; the request's generate call takes the hold
over, and its sequence grows from there. A hold nobody takes is released when the router says
so (the prefill failed), at its deadline (the router went away), or when the engine needs its
blocks with nothing running (the engine then computes the prefix when the request comes).

Making a hold is done at once, not at the engine loop's next iteration, since the prefill
waits for its answer: it only references blocks that are cached already (no block is taken,
no running sequence's table changes), and the model thread, possibly mid-step, reads only the
tables of the sequences it runs. Freeing does change what is free, so `release` and
`free_later` only queue, and the loop frees between steps (`expire`, `drop_all`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from kleave.workers.kv_cache import PagedKVCache


@dataclass(frozen=True)
class Hold:
    """`tokens` cached prompt tokens pinned as sequence `seq_id` for one request; `prefix`
    is those tokens, so a request with another prompt cannot use them."""

    request_id: str
    seq_id: int
    tokens: int
    deadline: float
    prefix: tuple[int, ...]


class PrefixHolds:
    def __init__(self) -> None:
        self._held: dict[str, Hold] = {}
        self._to_free: list[int] = []

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._held

    def __len__(self) -> int:
        return len(self._held)

    @property
    def work(self) -> bool:
        """Whether the loop has blocks to free."""
        return bool(self._to_free)

    @property
    def droppable(self) -> bool:
        """Whether `drop_all` would free anything."""
        return bool(self._held or self._to_free)

    def make(
        self,
        cache: PagedKVCache,
        request_id: str,
        prompt: Sequence[int],
        *,
        seq_id: int,
        ttl_s: float,
        now: float | None = None,
    ) -> int:
        """Pin the longest cached run of `prompt`'s blocks as `seq_id`; -> its tokens (0:
        nothing cached, nothing held)."""
        if request_id in self._held:
            raise ValueError(f"request {request_id} already holds a prefix")
        cached = cache.allocate_prefix(seq_id, prompt, 0)  # takes no fresh block
        if not cached:
            cache.free(seq_id)
            return 0
        now = time.monotonic() if now is None else now
        self._held[request_id] = Hold(
            request_id, seq_id, cached, now + ttl_s, tuple(prompt[:cached])
        )
        return cached

    def take(self, request_id: str) -> Hold | None:
        """The request's hold, now the caller's: it no longer expires here (give it back with
        `free_later` if the request does not run)."""
        return self._held.pop(request_id, None)

    def release(self, request_id: str) -> bool:
        """Drop a hold nobody will take; False if there was none."""
        hold = self._held.pop(request_id, None)
        if hold is None:
            return False
        self._to_free.append(hold.seq_id)
        return True

    def free_later(self, seq_id: int) -> None:
        """Free a taken hold's sequence at the loop's next `expire`."""
        self._to_free.append(seq_id)

    def expire(self, cache: PagedKVCache, now: float | None = None) -> None:
        """On the engine loop: free released, given back and expired holds."""
        now = time.monotonic() if now is None else now
        for request_id, hold in list(self._held.items()):
            if hold.deadline <= now:
                del self._held[request_id]
                self._to_free.append(hold.seq_id)
        self._free_pending(cache)

    def drop_all(self, cache: PagedKVCache) -> None:
        """On the engine loop, when blocks are needed now: free every untaken hold (their
        requests then compute the prefix themselves) and everything queued to be freed."""
        self._to_free.extend(hold.seq_id for hold in self._held.values())
        self._held.clear()
        self._free_pending(cache)

    def _free_pending(self, cache: PagedKVCache) -> None:
        for seq_id in self._to_free:
            if seq_id in cache:
                cache.free(seq_id)
        self._to_free.clear()
