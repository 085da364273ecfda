"""The skeleton every kleave controller shares: watch events into caches, a work queue, workers
that reconcile keys, a periodic resync, and the write helpers that feed results back into the
caches. Subclasses say what they cache (`prime`, `observe`), what a full resync enqueues and how
a key is reconciled; the loop, retry and bookkeeping live here once.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Hashable, Mapping
from typing import Any

import aiohttp

from kleave.operator.kube import ApiError, KubeApi, ResourceType
from kleave.operator.metrics import (
    RECONCILE_DURATION,
    RECONCILE_TOTAL,
    RESULT_ERROR,
    RESULT_SUCCESS,
    RESULT_TEMPORARY_ERROR,
)
from kleave.operator.workqueue import WorkQueue, run_workers

logger = logging.getLogger("kleave.operator")

RESYNC_S = 300.0
PRIME_RETRY_S = 5.0


def contains(current: Any, desired: Any) -> bool:
    """Whether ``current`` already has every field of ``desired`` (an apply would be a no-op).

    Skipping such applies keeps a resync of hundreds of objects from costing hundreds of
    writes; server-side defaults in ``current`` do not matter.
    """
    if isinstance(desired, Mapping):
        return isinstance(current, Mapping) and all(
            contains(current.get(key), value) for key, value in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(current, list)
            and len(current) == len(desired)
            and all(contains(c, d) for c, d in zip(current, desired, strict=True))
        )
    if isinstance(desired, str) and isinstance(current, int | float):
        return str(current) == desired
    return bool(current == desired)


def _pruned(value: Any) -> Any:
    """A value as a merge patch leaves it: keys set to None are removed, at any depth."""
    if isinstance(value, Mapping):
        return {k: _pruned(v) for k, v in value.items() if v is not None}
    return value


def status_patch(current: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """The top-level status fields that differ (a None inside one deletes that key).

    Compared as a merge patch would apply them, so a desired ``{"claim": {"latencyMs":
    None}}`` matches a current claim without latencyMs: no write, and no watch event that
    would reconcile the object again.
    """
    return {
        key: value for key, value in desired.items() if _pruned(current.get(key)) != _pruned(value)
    }


def is_transient(error: BaseException) -> bool:
    if isinstance(error, ApiError):
        return error.transient
    return isinstance(error, aiohttp.ClientError | OSError | asyncio.TimeoutError)


_RESULTS = {"ok": RESULT_SUCCESS, "retry": RESULT_TEMPORARY_ERROR, "error": RESULT_ERROR}


def record_result(key: Hashable, result: str, seconds: float) -> None:
    """Reconcile metrics, by the key's kind (its first element)."""
    kind = key[0] if isinstance(key, tuple) else str(key)
    RECONCILE_TOTAL.labels(kind=kind, result=_RESULTS.get(result, result)).inc()
    RECONCILE_DURATION.labels(kind=kind).observe(seconds)


class CachedController(ABC):
    """Caches fed by watches, one de-duplicating queue, and workers reconciling its keys."""

    what = "objects"
    """Named in the log when listing fails."""
    log = logger

    def __init__(self, api: KubeApi, *, workers: int) -> None:
        self.api = api
        self.workers = workers
        self.queue: Any = None  # created inside the running loop

    @abstractmethod
    async def prime(self) -> None:
        """List everything once, so the first reconciles see complete caches."""

    @abstractmethod
    def observe(self, event_type: str, obj: Mapping[str, Any]) -> None:
        """Update the caches with one object and enqueue whoever must react."""

    @abstractmethod
    def _enqueue_all(self) -> None:
        """Enqueue every key a full resync reconciles."""

    @abstractmethod
    async def reconcile(self, key: Hashable) -> float | None:
        """Reconcile one key; a number asks for another reconcile that many seconds later."""

    def is_transient(self, error: BaseException) -> bool:
        """Errors retried with backoff rather than recorded as failures."""
        return is_transient(error)

    async def run(self) -> None:
        """Prime the caches, then reconcile until cancelled (with a periodic full resync)."""
        self.queue = WorkQueue()
        while True:
            try:
                await self.prime()
                break
            except (ApiError, aiohttp.ClientError, OSError) as error:
                self.log.warning(
                    "Listing %s failed, retrying in %gs: %s", self.what, PRIME_RETRY_S, error
                )
                await asyncio.sleep(PRIME_RETRY_S)
        self._enqueue_all()
        resync = asyncio.create_task(self._resync())
        try:
            await run_workers(
                self.queue,
                self.reconcile,
                workers=self.workers,
                is_transient=self.is_transient,
                on_result=record_result,
            )
        finally:
            resync.cancel()

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(RESYNC_S)
            self._enqueue_all()

    async def _apply(self, desired: dict[str, Any], current: Mapping[str, Any] | None) -> None:
        if current is not None and contains(current, desired):
            return
        applied = await self.api.apply(desired)
        unchanged = current is not None and (
            applied["metadata"].get("resourceVersion") == current["metadata"].get("resourceVersion")
        )
        if not unchanged:  # a no-op apply must not requeue its owner (a hot loop)
            self.observe("MODIFIED", applied)

    async def _write_status(
        self, rt: ResourceType, obj: Mapping[str, Any], desired: Mapping[str, Any]
    ) -> None:
        patch = status_patch(obj.get("status") or {}, desired)
        if not patch:
            return
        meta = obj["metadata"]
        try:
            updated = await self.api.patch_status(rt, meta["namespace"], meta["name"], patch)
        except ApiError as error:
            if error.not_found:
                return  # deleted meanwhile; its DELETED event clears the cache
            raise
        self.observe("MODIFIED", updated)
