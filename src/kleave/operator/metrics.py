"""Prometheus metrics of the operator itself, on a registry of their own.

A dedicated ``CollectorRegistry`` (not prometheus_client's global one) keeps ``/metrics`` to the
operator's series and lets tests read values without picking up other libraries' collectors.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, ParamSpec, TypeVar

import kopf
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kleave import __version__

REGISTRY = CollectorRegistry(auto_describe=True)

RECONCILE_TOTAL = Counter(
    "kleave_reconcile_total",
    "Reconcile handler runs, by kind and result "
    "(success, permanent_error, temporary_error, error).",
    labelnames=("kind", "result"),
    registry=REGISTRY,
)
RECONCILE_DURATION = Histogram(
    "kleave_reconcile_duration_seconds",
    "Wall time of one reconcile handler run, by kind.",
    labelnames=("kind",),
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
    registry=REGISTRY,
)
OPERATOR_INFO = Gauge(
    "kleave_operator_info",
    "Always 1; the labels say which kleave version is running.",
    labelnames=("version",),
    registry=REGISTRY,
)
OPERATOR_INFO.labels(version=__version__).set(1)
# With --leader-elect, sum(kleave_leader) over the replicas must be 1: 0 means nobody
# reconciles, 2 would be split brain. Without --leader-elect it stays 0.
LEADER = Gauge(
    "kleave_leader",
    "1 while this replica holds the leader-election Lease and runs the reconcilers, else 0.",
    registry=REGISTRY,
)

RESULT_SUCCESS = "success"
RESULT_PERMANENT_ERROR = "permanent_error"
RESULT_TEMPORARY_ERROR = "temporary_error"
RESULT_ERROR = "error"
RESULTS = (RESULT_SUCCESS, RESULT_PERMANENT_ERROR, RESULT_TEMPORARY_ERROR, RESULT_ERROR)


def declare_kind(kind: str) -> None:
    """Export zeros for every result of ``kind``, so rates and alerts work before the first run."""
    for result in RESULTS:
        RECONCILE_TOTAL.labels(kind=kind, result=result)
    RECONCILE_DURATION.labels(kind=kind)


def classify(error: BaseException | None) -> str:
    """Map a handler's outcome to the ``result`` label, as kopf will treat it."""
    if error is None:
        return RESULT_SUCCESS
    if isinstance(error, kopf.PermanentError):
        return RESULT_PERMANENT_ERROR
    if isinstance(error, kopf.TemporaryError):
        return RESULT_TEMPORARY_ERROR
    return RESULT_ERROR


@contextmanager
def track_reconcile(kind: str) -> Iterator[None]:
    """Count one reconcile of ``kind`` and time it; exceptions are recorded and re-raised.

    Cancellation (operator shutdown) is not an outcome of the reconcile, so it is not counted.
    """
    started = time.perf_counter()
    try:
        yield
    except Exception as error:
        _record(kind, classify(error), started)
        raise
    _record(kind, RESULT_SUCCESS, started)


def _record(kind: str, result: str, started: float) -> None:
    RECONCILE_DURATION.labels(kind=kind).observe(time.perf_counter() - started)
    RECONCILE_TOTAL.labels(kind=kind, result=result).inc()


P = ParamSpec("P")
R = TypeVar("R")


AsyncFn = Callable[P, Coroutine[Any, Any, R]]


def instrumented(kind: str) -> Callable[[AsyncFn[P, R]], AsyncFn[P, R]]:
    """Decorate an async kopf handler so every run is tracked as a reconcile of ``kind``."""

    declare_kind(kind)

    def decorate(fn: AsyncFn[P, R]) -> AsyncFn[P, R]:
        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            with track_reconcile(kind):
                return await fn(*args, **kwargs)

        return wrapper

    return decorate
