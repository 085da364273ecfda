"""Kubernetes events about kleave's objects, aggregated the way kubectl expects.

A repeated event (same object, reason and message) bumps ``count`` and ``lastTimestamp`` of
one Event instead of creating another, so ``kubectl describe`` stays readable under retries.
"""

from __future__ import annotations

import hashlib
import logging
import socket
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

from kleave.operator.conditions import format_time
from kleave.operator.kube import EVENT, ApiError, KubeApi

logger = logging.getLogger("kleave.operator.events")

EventType = Literal["Normal", "Warning"]
COMPONENT = "kleave-operator"
_MAX_MESSAGE = 1000


def event_name(obj: Mapping[str, Any], reason: str, message: str) -> str:
    """A stable name per (object, reason, message), so repeats land on one Event."""
    meta = obj["metadata"]
    digest = hashlib.sha256(f"{meta.get('uid')}/{reason}/{message}".encode()).hexdigest()[:16]
    return f"{meta['name'][:200]}.{digest}"


def build_event(
    obj: Mapping[str, Any], type_: EventType, reason: str, message: str, now: datetime
) -> dict[str, Any]:
    """A core/v1 Event about ``obj``."""
    meta = obj["metadata"]
    stamp = format_time(now)
    if len(message) > _MAX_MESSAGE:
        message = message[: _MAX_MESSAGE - 1] + "…"
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": event_name(obj, reason, message), "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": obj["apiVersion"],
            "kind": obj["kind"],
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"),
        },
        "type": type_,
        "reason": reason,
        "message": message,
        "source": {"component": COMPONENT, "host": socket.gethostname()},
        "reportingComponent": COMPONENT,
        "reportingInstance": socket.gethostname(),
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


class EventRecorder:
    """Posts events; a failure is logged, never raised (an event is not worth a retry loop)."""

    def __init__(self, api: KubeApi) -> None:
        self._api = api

    async def post(
        self, obj: Mapping[str, Any], type_: EventType, reason: str, message: str
    ) -> None:
        event = build_event(obj, type_, reason, message, datetime.now(UTC))
        namespace = event["metadata"]["namespace"]
        log = logger.warning if type_ == "Warning" else logger.info
        log("%s %s/%s: %s: %s", obj["kind"], namespace, obj["metadata"]["name"], reason, message)
        try:
            try:
                await self._api.create(EVENT, namespace, event)
            except ApiError as error:
                if not error.conflict:
                    raise
                current = await self._api.get(EVENT, namespace, event["metadata"]["name"])
                count = int((current or {}).get("count") or 1) + 1
                await self._api.merge_patch(
                    EVENT,
                    namespace,
                    event["metadata"]["name"],
                    {"count": count, "lastTimestamp": event["lastTimestamp"]},
                )
        except (ApiError, OSError) as error:
            logger.warning("Could not post event %s: %s", reason, error)
