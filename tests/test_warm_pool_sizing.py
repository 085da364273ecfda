"""The warm-pool sizing math and claim history (pure)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from kleave.api.sandbox_warm_pool import SandboxWarmPoolSpec, WarmPoolAutoscaling
from kleave.operator.warm_pool_sizing import (
    ClaimHistory,
    PoolBounds,
    Recommendations,
    close_windows,
    decode_counts,
    encode_counts,
    most_within,
    ready_after_s,
    size_pool,
    startup_s,
    warm_for_rate,
)
from kleave.planner.window_forecast import WindowPrediction


def _poisson_cdf(k: int, mu: float) -> float:
    return sum(math.exp(-mu) * mu**i / math.factorial(i) for i in range(k + 1))


def test_counts_round_trip_with_missing_windows() -> None:
    text = encode_counts([3.0, math.nan, 0.0, 12.0])
    assert text == "3,,0,12"
    back = decode_counts(text)
    assert back[0] == 3 and math.isnan(back[1]) and back[2:] == [0, 12]
    assert decode_counts("") == []
    for bad in ("1,x", "1,-2", "1.5"):
        with pytest.raises(ValueError):
            decode_counts(bad)


def test_most_within_a_span() -> None:
    assert most_within([], 5) == 0
    assert most_within([0, 0, 0, 5, 5, 9], 1) == 3
    assert most_within([0, 0, 0, 5, 5, 9], 6) == 5
    assert most_within([0, 1, 2, 3], 3) == 3  # half-open: [0, 3) holds 0, 1, 2


@pytest.mark.parametrize(
    ("rate", "startup", "share"), [(0.05, 1.0, 0.99), (2.0, 5.0, 0.99), (0.5, 30.0, 0.9)]
)
def test_warm_for_rate_is_the_smallest_pool_meeting_the_share(
    rate: float, startup: float, share: float
) -> None:
    n = warm_for_rate(rate, startup, share)
    mu = rate * startup
    # A claim finds a ready sandbox when fewer than n replacements are in flight.
    assert _poisson_cdf(n - 1, mu) >= share
    assert n == 1 or _poisson_cdf(n - 2, mu) < share


def test_no_rate_needs_no_pool() -> None:
    assert warm_for_rate(0.0, 10.0, 0.99) == 0


def test_windows_close_aligned_and_count_claims_once() -> None:
    fresh = ClaimHistory(60)
    history = close_windows(
        fresh,
        [1030, 1031, 1100, 1145],
        now_s=1150,
        watching_since_s=1000.5,
        span_s=5,
        max_windows=100,
    )
    # Watching began inside [960, 1020), for a pool older than that: it is missing.
    assert history.end_s == 1140
    assert history.claims[1:] == (2, 1) and history.peaks[1:] == (2, 1)
    assert math.isnan(history.claims[0]) and math.isnan(history.peaks[0])
    new_pool = close_windows(
        fresh,
        [1030, 1031, 1100, 1145],
        now_s=1150,
        watching_since_s=1000.5,
        span_s=5,
        max_windows=100,
        pool_created_s=1000.0,
    )  # a pool created in that window: all its claims were seen
    assert new_pool.claims == (0, 2, 1)
    again = close_windows(
        history, [1145], now_s=1199, watching_since_s=1000.5, span_s=5, max_windows=100
    )
    assert again == history  # the window [1140, 1200) has not ended


def test_windows_not_watched_are_missing_not_zero() -> None:
    history = ClaimHistory(60, 1020.0, (1.0,), (1.0,))
    later = close_windows(
        history, [1210, 1270], now_s=1330, watching_since_s=1200, span_s=5, max_windows=100
    )
    assert later.end_s == 1320
    assert later.claims[0] == 1
    assert all(math.isnan(v) for v in later.claims[1:4])
    assert later.claims[4:] == (1, 1)


def test_history_is_bounded_and_survives_a_clock_step_back() -> None:
    history = close_windows(
        ClaimHistory(10, 0.0), [], now_s=1000, watching_since_s=0, span_s=1, max_windows=5
    )
    assert len(history.claims) == 5 and history.end_s == 1000
    # A clock behind the last writer's (a failover to a skewed node) keeps every window.
    back = close_windows(history, [], now_s=500, watching_since_s=400, span_s=1, max_windows=5)
    assert back == history


def test_a_burst_across_a_window_boundary_is_one_peak() -> None:
    times = [float(t) for t in range(1070, 1090)]  # 20 claims, one per second, 10 each side
    history = close_windows(
        ClaimHistory(60, 1020.0), times, now_s=1140, watching_since_s=0, span_s=30,
        max_windows=10,
    )  # fmt: skip
    assert history.claims == (10, 10) and history.peaks == (10, 20)


def test_history_round_trips_through_status_and_rejects_what_it_cannot_read() -> None:
    history = ClaimHistory(60, 1_800_000_000.0, (2.0, math.nan), (1.0, math.nan))
    status = history.to_status()
    assert status["end"] == "2027-01-15T08:00:00Z"
    again = ClaimHistory.from_status(status, 60)
    assert again.end_s == history.end_s and encode_counts(again.claims) == "2,"
    assert ClaimHistory.from_status(status, 30) == ClaimHistory(30)  # other windows
    assert ClaimHistory.from_status({**status, "claims": "2,x"}, 60) == ClaimHistory(60)
    assert ClaimHistory.from_status({**status, "peaks": "1"}, 60) == ClaimHistory(60)
    assert ClaimHistory.from_status(None, 60) == ClaimHistory(60)


def test_startup_time_set_measured_or_default() -> None:
    assert startup_s(WarmPoolAutoscaling.model_validate({"startupSeconds": 7}), [100.0]) == 7
    assert startup_s(WarmPoolAutoscaling(), []) == 30
    measured = [float(s) for s in range(1, 11)]  # 1..10 s: the 90th percentile is 9 s
    assert startup_s(WarmPoolAutoscaling(), measured) == 9
    assert startup_s(WarmPoolAutoscaling(), [0.0]) == 1.0  # one-second timestamps


def test_ready_after_reads_creation_to_ready() -> None:
    pod: dict[str, Any] = {
        "metadata": {"creationTimestamp": "2026-12-02T10:00:00Z"},
        "status": {
            "conditions": [
                {"type": "Ready", "status": "True", "lastTransitionTime": "2026-12-02T10:00:04Z"}
            ]
        },
    }
    assert ready_after_s(pod) == 4.0
    pod["status"]["conditions"].append(
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-12-02T10:00:03Z"}
    )
    assert ready_after_s(pod) == 1.0  # time Pending for a node is not start-up
    pod["status"]["containerStatuses"] = [{"name": "runtime", "restartCount": 1}]
    assert ready_after_s(pod) is None  # Ready again after a restart
    del pod["status"]["containerStatuses"]
    pod["status"]["conditions"][0]["status"] = "False"
    assert ready_after_s(pod) is None


def _spec(**fields: object) -> WarmPoolAutoscaling:
    return WarmPoolAutoscaling.model_validate({"mode": "reactive", **fields})


def _history(claims: list[float], peaks: list[float] | None = None) -> ClaimHistory:
    return ClaimHistory(60, 6000.0, tuple(claims), tuple(peaks or [0.0] * len(claims)))


def test_reactive_sizes_for_the_last_window() -> None:
    spec = _spec(burstMemorySeconds=0)
    sizing = size_pool(
        spec,
        _history([6, 30]),  # 0.5 claims/s; 10 s start-up: 5 in flight on average
        None,
        startup_seconds=10,
        bounds=PoolBounds(current=5, low=0, high=100),
        recommendations=Recommendations(),
        now_s=6000,
    )
    assert sizing.reason == "Reactive"
    assert sizing.replicas == warm_for_rate(0.5, 10, 0.99) == 12
    assert "30/min" in sizing.message and "-> 12 replicas" in sizing.message


def test_a_remembered_burst_sets_the_size_until_it_is_forgotten() -> None:
    claims, peaks = [40.0] + [0.0] * 10, [40.0] + [0.0] * 10
    kwargs = {
        "startup_seconds": 5.0,
        "bounds": PoolBounds(current=40, low=0, high=100),
        "recommendations": Recommendations(),
        "now_s": 6000.0,
    }
    held = size_pool(_spec(burstMemorySeconds=1800), _history(claims, peaks), None, **kwargs)  # type: ignore[arg-type]
    assert (held.reason, held.replicas, held.burst) == ("Burst", 40, 40)
    forgot = size_pool(
        _spec(burstMemorySeconds=300, scaleDownDelaySeconds=0),
        _history(claims, peaks),
        None,
        **kwargs,  # type: ignore[arg-type]
    )
    assert (forgot.replicas, forgot.burst) == (0, 0)


def test_bounds_and_the_scale_down_delay() -> None:
    spec = _spec(burstMemorySeconds=0, scaleDownDelaySeconds=300)
    busy = _history([600])  # 10/s
    capped = size_pool(
        spec, busy, None, startup_seconds=10, bounds=PoolBounds(5, 2, 50),
        recommendations=Recommendations(), now_s=0,
    )  # fmt: skip
    assert (capped.replicas, capped.reason) == (50, "AtMax")
    quiet = _history([0])
    recent = Recommendations()
    recent.add(1000, 20, 300)
    held = size_pool(
        spec, quiet, None, startup_seconds=10, bounds=PoolBounds(20, 2, 50),
        recommendations=recent, now_s=1200,
    )  # fmt: skip
    assert (held.replicas, held.recommended, held.reason) == (20, 2, "ScaleDownDelayed")
    released = size_pool(
        spec, quiet, None, startup_seconds=10, bounds=PoolBounds(20, 2, 50),
        recommendations=recent, now_s=1400,
    )  # fmt: skip
    assert (released.replicas, released.reason) == (2, "AtMin")


def test_forecast_mode_sizes_for_the_upper_bound() -> None:
    spec = WarmPoolAutoscaling.model_validate({"mode": "forecast", "burstMemorySeconds": 0})
    sizing = size_pool(
        spec,
        _history([6, 6, 6]),
        WindowPrediction(mean=0.1, upper=1.0, model="ses"),
        startup_seconds=10,
        bounds=PoolBounds(0, 0, 100),
        recommendations=Recommendations(),
        now_s=0,
    )
    assert (sizing.reason, sizing.model) == ("Forecast", "ses")
    assert sizing.replicas == warm_for_rate(1.0, 10, 0.99)
    assert sizing.forecast_per_s == 0.1 and sizing.provisioned_per_s == 1.0


def test_no_claims_yet() -> None:
    sizing = size_pool(
        _spec(), ClaimHistory(60), None, startup_seconds=30,
        bounds=PoolBounds(3, 0, 10), recommendations=Recommendations(), now_s=0,
    )  # fmt: skip
    assert sizing.reason == "NoClaims" and sizing.recommended == 0


def test_autoscaling_requires_max_and_a_history_that_fits() -> None:
    with pytest.raises(ValueError, match=r"spec.max is required"):
        SandboxWarmPoolSpec.model_validate(
            {"templateRef": {"name": "t"}, "autoscaling": {"mode": "forecast"}}
        )
    SandboxWarmPoolSpec.model_validate(
        {"templateRef": {"name": "t"}, "autoscaling": {"mode": "off"}}
    )
    with pytest.raises(ValueError, match=r"historySeconds must be at most"):
        WarmPoolAutoscaling.model_validate({"intervalSeconds": 5, "historySeconds": 604800})
