"""A de-duplicating work queue with per-key backoff, as controller-runtime's workqueue.

Watch events only *enqueue* a key; workers reconcile the key from the current state. A key is
never processed by two workers at once, a key added while it is being processed runs once
more afterwards, and a burst of events for one key collapses into one reconcile. That makes
the controllers level-triggered and keeps hundreds of objects from piling up work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field

logger = logging.getLogger("kleave.operator.workqueue")


@dataclass
class Backoff:
    """Exponential backoff per key: ``base * 2**failures``, capped."""

    base_s: float = 0.2
    cap_s: float = 60.0
    failures: dict[Hashable, int] = field(default_factory=dict)

    def next_delay(self, key: Hashable) -> float:
        count = self.failures.get(key, 0)
        self.failures[key] = count + 1
        return float(min(self.cap_s, self.base_s * 2.0**count))

    def forget(self, key: Hashable) -> None:
        self.failures.pop(key, None)


class WorkQueue:
    """Keys waiting to be reconciled; see the module docstring for the guarantees."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Hashable] = asyncio.Queue()
        self._queued: set[Hashable] = set()
        self._active: set[Hashable] = set()
        self._dirty: set[Hashable] = set()
        self._timers: dict[Hashable, asyncio.TimerHandle] = {}
        self.backoff = Backoff()

    def add(self, key: Hashable) -> None:
        """Reconcile ``key`` soon; a no-op if it is already waiting."""
        if key in self._active:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._queue.put_nowait(key)

    def add_after(self, key: Hashable, delay_s: float) -> None:
        """Reconcile ``key`` after ``delay_s``, or earlier if a pending timer says so."""
        loop = asyncio.get_running_loop()
        pending = self._timers.get(key)
        if pending is not None:
            if pending.when() <= loop.time() + delay_s:
                return
            pending.cancel()  # the earlier time wins, as in client-go's AddAfter

        def fire() -> None:
            self._timers.pop(key, None)
            self.add(key)

        self._timers[key] = loop.call_later(delay_s, fire)

    def __len__(self) -> int:
        return len(self._queued)

    async def get(self) -> Hashable:
        key = await self._queue.get()
        self._queued.discard(key)
        self._active.add(key)
        return key

    def done(self, key: Hashable) -> None:
        self._active.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()


Reconciler = Callable[[Hashable], Awaitable[float | None]]
"""Reconciles one key; returns seconds until it wants another look, or None."""


async def run_workers(
    queue: WorkQueue,
    reconcile: Reconciler,
    *,
    workers: int,
    is_transient: Callable[[BaseException], bool],
    on_result: Callable[[Hashable, str, float], None] | None = None,
) -> None:
    """Run ``workers`` tasks reconciling keys until cancelled.

    A transient error retries the key with backoff; any other error is logged with its
    traceback and retried after the backoff cap, so a bug never becomes a hot loop.
    """

    async def worker() -> None:
        while True:
            key = await queue.get()
            started = time.perf_counter()
            result = "ok"
            try:
                requeue_after = await reconcile(key)
            except asyncio.CancelledError:
                queue.done(key)
                raise
            except Exception as error:
                if is_transient(error):
                    result = "retry"
                    delay = queue.backoff.next_delay(key)
                    logger.info("Reconcile of %s will be retried in %.1fs: %s", key, delay, error)
                else:
                    result = "error"
                    delay = queue.backoff.cap_s
                    logger.exception("Reconcile of %s failed; retrying in %.0fs", key, delay)
                queue.add_after(key, delay)
            else:
                queue.backoff.forget(key)
                if requeue_after is not None:
                    queue.add_after(key, requeue_after)
            finally:
                if on_result is not None:
                    on_result(key, result, time.perf_counter() - started)
            queue.done(key)

    tasks = [asyncio.create_task(worker(), name=f"kleave-worker-{n}") for n in range(workers)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        queue.close()
