"""Operator logging: JSON lines carry kopf's object context; nothing is written twice."""

from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Iterator
from typing import Any, cast

import kopf
import pytest

from kleave.operator.logging_setup import configure_kopf_posting, configure_logging

BODY = cast(
    kopf.RawBody,
    {
        "apiVersion": "kleave.dev/v1alpha1",
        "kind": "InferenceDeployment",
        "metadata": {"name": "demo", "namespace": "ml", "uid": "u-1"},
    },
)


@pytest.fixture(autouse=True)
def restore_loggers() -> Iterator[None]:
    """configure_logging (and kopf.configure) change process-wide loggers; undo that."""
    touched = [logging.getLogger(name) for name in ("", "asyncio", "urllib3", "kubernetes")]
    saved = [(lg, list(lg.handlers), lg.level, lg.propagate) for lg in touched]
    kopf_objects = logging.getLogger("kopf.objects")
    kopf_level = kopf_objects.level
    kopf_objects.setLevel(logging.NOTSET)  # runtime.run quiets it; these tests read its lines
    yield
    kopf_objects.setLevel(kopf_level)
    logging.captureWarnings(False)
    for lg, handlers, level, propagate in saved:
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate


def object_logger() -> kopf.ObjectLogger:
    """The logger kopf hands to handlers: it puts ``k8s_ref`` on every record."""
    settings = kopf.OperatorSettings()
    configure_kopf_posting(settings)
    return kopf.ObjectLogger(body=kopf.Body(BODY), settings=settings)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_the_object_context() -> None:
    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)
    object_logger().info("reconciled %s", "ok")
    [record] = lines(stream)
    assert record["message"] == "reconciled ok"
    assert record["level"] == "INFO"
    assert record["logger"] == "kopf.objects"
    assert record["namespace"] == "ml"
    assert record["name"] == "demo"
    assert record["kind"] == "InferenceDeployment"
    assert record["ts"].endswith("Z")
    assert "T" in record["ts"]


def test_json_lines_without_an_object_have_no_object_keys() -> None:
    stream = io.StringIO()
    configure_logging("json", "debug", stream=stream)
    logging.getLogger("kleave.operator").debug('quote " and newline\nstay one line')
    output = stream.getvalue()
    assert output.count("\n") == 1
    [record] = lines(stream)
    assert record["message"] == 'quote " and newline\nstay one line'
    assert not {"namespace", "name", "kind"} & set(record)


def test_json_lines_include_exceptions() -> None:
    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("kleave.operator").exception("failed")
    [record] = lines(stream)
    assert record["level"] == "ERROR"
    assert "RuntimeError: boom" in record["exception"]


def test_text_lines_prefix_the_object() -> None:
    stream = io.StringIO()
    configure_logging("text", "info", stream=stream)
    object_logger().warning("spec is invalid")
    logging.getLogger("kleave.operator").info("plain")
    first, second = stream.getvalue().splitlines()
    assert "WARNING" in first
    assert first.endswith("kopf.objects: [ml/demo] spec is invalid")
    assert second.endswith("kleave.operator: plain")


def test_python_warnings_become_json_lines() -> None:
    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("old API", DeprecationWarning, stacklevel=1)
    [record] = lines(stream)
    assert record["logger"] == "py.warnings"
    assert "DeprecationWarning: old API" in record["message"]


def test_level_filters() -> None:
    stream = io.StringIO()
    configure_logging("json", "warning", stream=stream)
    logging.getLogger("kleave.operator").info("hidden")
    logging.getLogger("kleave.operator").warning("shown")
    assert [r["message"] for r in lines(stream)] == ["shown"]


def test_configuring_twice_and_after_kopf_logs_each_line_once() -> None:
    kopf.configure(verbose=False)  # what `kopf run` does: installs kopf's own root handler
    configure_logging("text", "info", stream=io.StringIO())
    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)
    object_logger().info("once")
    assert len(lines(stream)) == 1
    ours = [h for h in logging.getLogger().handlers if type(h).__name__ == "_KleaveStreamHandler"]
    kopfs = [h for h in logging.getLogger().handlers if type(h).__name__ == "_KopfStreamHandler"]
    assert len(ours) == 1
    assert kopfs == []


def test_log_lines_are_not_posted_as_events() -> None:
    settings = kopf.OperatorSettings()
    configure_kopf_posting(settings)
    assert settings.posting.loggers is False
    assert settings.posting.level == logging.INFO


@pytest.mark.parametrize(("fmt", "level"), [("xml", "info"), ("json", "verbose")])
def test_bad_settings_are_rejected(fmt: Any, level: str) -> None:
    with pytest.raises(ValueError, match="unknown log"):
        configure_logging(fmt, level, stream=io.StringIO())
