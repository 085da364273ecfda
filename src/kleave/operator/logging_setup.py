"""Logging for the operator: JSON lines for log shippers, or text for people.

kopf logs through the standard ``logging`` module and attaches the object a message is about as
``record.k8s_ref`` (apiVersion, kind, name, uid, namespace) on its per-object loggers. Both
formats surface that reference: JSON as top-level ``namespace``/``name``/``kind`` keys, text as
a ``[namespace/name]`` prefix.

kopf configures logging only in its own CLI (``kopf run`` calls ``kopf.configure``); kleave runs
kopf embedded, so this module is the one place that installs a handler. It replaces kopf's
handler if one was installed earlier in the process, so no line is written twice.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

import kopf

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error", "critical")

# Keys of kopf's object reference that are worth a top-level JSON field.
_REF_KEYS = ("namespace", "name", "kind")
# kopf's name for its CLI handler; matched by name to avoid importing kopf's private modules.
_KOPF_HANDLER_CLASS = "_KopfStreamHandler"
# Libraries that log request/response bodies (and so credentials) at DEBUG.
_CHATTY_LOGGERS = ("urllib3", "kubernetes")


def _object_ref(record: logging.LogRecord) -> Mapping[str, Any]:
    ref = getattr(record, "k8s_ref", None)
    return ref if isinstance(ref, Mapping) else {}


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, and the object when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        ref = _object_ref(record)
        for key in _REF_KEYS:
            value = ref.get(key)
            if value:
                payload[key] = value
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            payload["stack"] = self.formatStack(record.stack_info)
        return json.dumps(payload, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``ts level logger: [namespace/name] message``, the prefix only for per-object lines."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-8s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        ref = _object_ref(record)
        name = ref.get("name")
        if name:
            namespace = ref.get("namespace")
            prefix = f"[{namespace}/{name}]" if namespace else f"[{name}]"
            record = copy.copy(record)  # other handlers must see the unprefixed message
            record.message = f"{prefix} {record.message}"
        return super().formatMessage(record)


class _KleaveStreamHandler(logging.StreamHandler[TextIO]):
    """Marks the handler this module installs, so a second call replaces it."""


def parse_level(level: str) -> int:
    """Turn ``debug``/``INFO``/... into a logging level; reject anything else clearly."""
    if level.lower() not in LOG_LEVELS:
        raise ValueError(f"unknown log level {level!r}; use one of {', '.join(LOG_LEVELS)}")
    return logging.getLevelNamesMapping()[level.upper()]


def configure_logging(
    fmt: LogFormat,
    level: str,
    *,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Install the single root handler (idempotent) and return it.

    ``stream`` defaults to stderr, where container runtimes collect logs from.
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; use one of {', '.join(LOG_FORMATS)}")
    numeric_level = parse_level(level)

    handler = _KleaveStreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())

    root = logging.getLogger()
    root.handlers[:] = [
        h
        for h in root.handlers
        if not isinstance(h, _KleaveStreamHandler) and type(h).__name__ != _KOPF_HANDLER_CLASS
    ]
    root.addHandler(handler)
    root.setLevel(numeric_level)
    # Python warnings (deprecations, urllib3's TLS warnings) would otherwise be bare stderr
    # text that breaks a JSON log stream; as records they get the same format as the rest.
    logging.captureWarnings(True)

    # kopf hides asyncio's debug chatter unless debugging; so do we.
    logging.getLogger("asyncio").setLevel(
        numeric_level if numeric_level <= logging.DEBUG else logging.WARNING
    )
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(max(numeric_level, logging.INFO))
    return handler


def configure_kopf_posting(settings: kopf.OperatorSettings) -> None:
    """Keep log lines out of Kubernetes events: handlers post the events a human needs.

    kopf can turn every per-object log line into an Event; with that on, each line would be
    both logged and posted, and routine messages ("Handler succeeded") would flood
    ``kubectl describe``. Explicit ``kopf.info``/``kopf.warn`` calls still post at INFO and up.
    """
    settings.posting.loggers = False
    settings.posting.level = logging.INFO
