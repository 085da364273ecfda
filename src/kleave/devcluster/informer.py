"""List-then-watch loops that keep a handler level-triggered on a set of objects.

The local node and the volume provisioner react to pods, claims and volumes as a kubelet and a
provisioner do: list once, then watch from the list's resourceVersion. A watch can end at any
time (server timeout, expired resourceVersion, connection loss); a relist then hands the handler
every object again and reports the ones that vanished meanwhile, so nothing is missed. Handlers
are idempotent and are re-run for every object at each resync, which also retries whatever
failed on the previous round.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from kleave.operator.kube import ApiError, KubeApi, ResourceType

log = logging.getLogger(__name__)

Handler = Callable[[str, dict[str, Any]], Awaitable[None]]
"""Called with ("SYNC" | "ADDED" | "MODIFIED" | "DELETED", object)."""

_RETRY_S = (0.2, 0.5, 1.0, 2.0, 5.0)


def _uid(obj: dict[str, Any]) -> str:
    return str(obj.get("metadata", {}).get("uid", ""))


class Informer:
    """Feeds every change of one resource type (narrowed by selectors) to ``handler``."""

    def __init__(
        self,
        api: KubeApi,
        rt: ResourceType,
        handler: Handler,
        *,
        field_selector: str = "",
        label_selector: str = "",
        resync_seconds: int = 60,
    ) -> None:
        self.api = api
        self.rt = rt
        self.handler = handler
        self.field_selector = field_selector
        self.label_selector = label_selector
        self.resync_seconds = resync_seconds
        self.known: dict[str, dict[str, Any]] = {}
        self.synced = asyncio.Event()
        """Set once the first list has been handed to the handler."""

    async def run(self) -> None:
        """Forever: list, hand everything over, watch until it ends; back off on errors."""
        failures = 0
        while True:
            try:
                version = await self._relist()
                self.synced.set()
                failures = 0
                # One watch per resync period; when it ends cleanly, relist (level-triggered).
                await self._watch(version)
            except asyncio.CancelledError:
                raise
            except (ApiError, aiohttp.ClientError, TimeoutError, ValueError, OSError) as error:
                expired = isinstance(error, ApiError) and error.status == 410
                if not expired:
                    delay = _RETRY_S[min(failures, len(_RETRY_S) - 1)]
                    failures += 1
                    log.warning(
                        "%s watch failed (%s); relisting in %.1fs", self.rt.plural, error, delay
                    )
                    await asyncio.sleep(delay)

    async def _relist(self) -> str:
        items: dict[str, dict[str, Any]] = {}
        params = {"limit": "500"}
        if self.field_selector:
            params["fieldSelector"] = self.field_selector
        if self.label_selector:
            params["labelSelector"] = self.label_selector
        version = ""
        while True:
            page = await self.api.request("GET", self.rt.path(), params=params)
            for item in page.get("items", []):
                items[_uid(item)] = item
            meta = page.get("metadata", {})
            version = str(meta.get("resourceVersion", version))
            if not meta.get("continue"):
                break
            params["continue"] = meta["continue"]
        gone = [obj for uid, obj in self.known.items() if uid not in items]
        self.known = items
        for obj in gone:
            await self._handle("DELETED", obj)
        for obj in list(items.values()):
            await self._handle("SYNC", obj)
        return version

    async def _watch(self, version: str) -> None:
        async for event in self.api.watch(
            self.rt,
            resource_version=version,
            field_selector=self.field_selector,
            label_selector=self.label_selector,
            timeout_seconds=self.resync_seconds,
        ):
            kind = str(event.get("type", ""))
            obj = event.get("object") or {}
            if kind == "BOOKMARK" or not _uid(obj):
                continue
            if kind == "DELETED":
                self.known.pop(_uid(obj), None)
            else:
                self.known[_uid(obj)] = obj
            await self._handle(kind, obj)

    async def _handle(self, kind: str, obj: dict[str, Any]) -> None:
        """A failing handler is logged, not fatal: the next resync hands the object over again."""
        try:
            await self.handler(kind, obj)
        except asyncio.CancelledError:
            raise
        except Exception:
            meta = obj.get("metadata", {})
            log.exception(
                "handling %s %s/%s failed", self.rt.kind, meta.get("namespace"), meta.get("name")
            )
