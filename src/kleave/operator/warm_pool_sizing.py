"""How many warm sandboxes a pool needs: the claim history, and the sizing decision.

A claim takes a ready sandbox and the pool starts a replacement, which is ready a start-up
time later. With claims arriving at random at rate r, the replacements in flight are
Poisson(r x startup) (an M/D/inf queue), and a claim finds a ready sandbox exactly when fewer
than `replicas` are in flight: the pool holds that Poisson's `warmPercent` quantile plus one.
Claims from agents come in bursts too (a batch job starting 100 agents), which no rate model
sees coming twice; the pool also keeps enough for the most claims seen within one start-up time
over `burstMemorySeconds`. Scale-up is immediate, scale-down waits (`scaleDownDelaySeconds`).

The history is kept in the pool's status as per-window counts, so a restarted operator resumes
with it; windows it did not watch are recorded as missing, never as zero. Pure: no I/O.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from scipy.stats import poisson

from kleave.api.sandbox_warm_pool import DEFAULT_STARTUP_S, WarmPoolAutoscaling
from kleave.operator.conditions import format_time
from kleave.operator.sandbox_decisions import parse_time
from kleave.planner.window_forecast import WindowPrediction, last_finite

STARTUP_QUANTILE = 0.9
MIN_STARTUP_S = 1.0
"""Timestamps have one-second resolution: a start-up under a second reads as 0 or 1."""


# ----- the history ----------------------------------------------------------------------------
def encode_counts(values: Iterable[float]) -> str:
    return ",".join("" if not math.isfinite(v) else str(round(v)) for v in values)


def decode_counts(text: str) -> list[float]:
    """The inverse of `encode_counts`; ValueError on anything but integers and blanks."""
    if not text:
        return []
    out = []
    for item in text.split(","):
        if item == "":
            out.append(math.nan)
            continue
        value = int(item)
        if value < 0:
            raise ValueError(f"negative count {value}")
        out.append(float(value))
    return out


def format_epoch(seconds: float) -> str:
    return format_time(datetime.fromtimestamp(seconds, UTC))


def epoch_s(text: Any) -> float | None:
    moment = parse_time(str(text)) if text else None
    return None if moment is None else moment.timestamp()


@dataclass(frozen=True)
class ClaimHistory:
    """Claims per window (NaN: not observed), oldest first, ending at `end_s`."""

    interval_s: int
    end_s: float | None = None
    claims: tuple[float, ...] = ()
    peaks: tuple[float, ...] = ()
    """Per window, the most claims created within one start-up time."""

    @classmethod
    def from_status(cls, status: Mapping[str, Any] | None, interval_s: int) -> ClaimHistory:
        """The history written in status; an empty one if it is absent, unreadable or kept
        for another window length (counts of other windows cannot be mixed in)."""
        if not status or int(status.get("intervalSeconds") or 0) != interval_s:
            return cls(interval_s)
        end_s = epoch_s(status.get("end"))
        try:
            claims = decode_counts(str(status.get("claims") or ""))
            peaks = decode_counts(str(status.get("peaks") or ""))
        except ValueError:
            return cls(interval_s)
        if len(peaks) != len(claims) or end_s is None or end_s % interval_s:
            return cls(interval_s)
        return cls(interval_s, end_s, tuple(claims), tuple(peaks))

    def to_status(self) -> dict[str, Any]:
        return {
            "intervalSeconds": self.interval_s,
            "end": None if self.end_s is None else format_epoch(self.end_s),
            "claims": encode_counts(self.claims),
            "peaks": encode_counts(self.peaks),
        }

    def rates_per_s(self) -> np.ndarray:
        return np.asarray(self.claims, dtype=np.float64) / self.interval_s


def most_within(times: Sequence[float], span_s: float) -> int:
    """The most of the sorted `times` inside any half-open span of `span_s` seconds."""
    best, first = 0, 0
    for last, t in enumerate(times):
        while t - times[first] >= span_s:
            first += 1
        best = max(best, last - first + 1)
    return best


def close_windows(
    history: ClaimHistory,
    claim_times: Iterable[float],
    *,
    now_s: float,
    watching_since_s: float,
    span_s: float,
    max_windows: int,
    pool_created_s: float | None = None,
) -> ClaimHistory:
    """Append every window that has ended by `now_s`. A window that ended by
    `watching_since_s` was not watched: it is recorded as missing, and so is the one in which
    the watch began, unless the pool was created in it (then every claim of it was seen).
    Windows are aligned to multiples of the interval, so they line up across operator
    restarts. A window's peak also counts claims up to `span_s` before it (a burst across a
    boundary is one burst), so `claim_times` should reach back that far."""
    step = history.interval_s
    boundary = math.floor(now_s / step) * step
    end = history.end_s
    if end is None:
        end = math.floor(watching_since_s / step) * step
        history = ClaimHistory(step, end)
    windows = round((boundary - end) / step)
    if windows <= 0:  # none ended, or this clock is behind the last writer's: keep it all
        return history
    times = sorted(t for t in claim_times if end - span_s < t < boundary)
    skip = max(0, windows - max_windows)  # older than what is kept anyway
    claims, peaks = list(history.claims), list(history.peaks)
    if skip:
        claims, peaks = [], []
    created_in_first = (
        pool_created_s is not None
        and pool_created_s >= math.floor(watching_since_s / step) * step - 1.0
    )  # creationTimestamps have one-second resolution
    for j in range(skip, windows):
        start = end + j * step
        unwatched = start + step <= watching_since_s or (
            start < watching_since_s and not created_in_first
        )
        if unwatched:
            claims.append(math.nan)
            peaks.append(math.nan)
            continue
        lo = bisect.bisect_left(times, start)
        hi = bisect.bisect_left(times, start + step)
        reach = bisect.bisect_right(times, start - span_s)
        claims.append(float(hi - lo))
        peaks.append(float(most_within(times[reach:hi], span_s)) if hi > lo else 0.0)
    return ClaimHistory(
        step, float(boundary), tuple(claims[-max_windows:]), tuple(peaks[-max_windows:])
    )


# ----- start-up time --------------------------------------------------------------------------
def ready_after_s(pod: Mapping[str, Any]) -> float | None:
    """Seconds from a pod's scheduling (else creation) to its Ready condition turning True, if
    it is Ready and never restarted. Time spent Pending for lack of a node is left out: more
    warm pods would not shorten it, and sizing for it would only add Pending pods. A pod
    whose containers restarted (its Ready time is the last restart's) is not a start-up."""
    status = pod.get("status") or {}
    if any((c.get("restartCount") or 0) > 0 for c in status.get("containerStatuses") or []):
        return None
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    ready = conditions.get("Ready") or {}
    if ready.get("status") != "True":
        return None
    scheduled = conditions.get("PodScheduled") or {}
    begin = (
        scheduled.get("lastTransitionTime")
        if scheduled.get("status") == "True"
        else (pod.get("metadata") or {}).get("creationTimestamp")
    ) or (pod.get("metadata") or {}).get("creationTimestamp")
    ready_at, born = epoch_s(ready.get("lastTransitionTime")), epoch_s(begin)
    if ready_at is None or born is None:
        return None
    return max(0.0, ready_at - born)


def startup_s(spec: WarmPoolAutoscaling, measured: Sequence[float]) -> float:
    """The start-up time to size for: the spec's, else the measured quantile, else a default."""
    if spec.startup_seconds is not None:
        return float(spec.startup_seconds)
    if not measured:
        return float(DEFAULT_STARTUP_S)
    ordered = sorted(measured)
    rank = max(0, math.ceil(STARTUP_QUANTILE * len(ordered)) - 1)
    return max(MIN_STARTUP_S, ordered[rank])


# ----- the decision ---------------------------------------------------------------------------
def warm_for_rate(rate_per_s: float, startup_seconds: float, warm_share: float) -> int:
    """Fewest ready sandboxes so a random claim finds one with probability `warm_share`."""
    mean_in_flight = rate_per_s * startup_seconds
    if mean_in_flight <= 0:
        return 0
    return int(poisson.ppf(warm_share, mean_in_flight)) + 1


@dataclass(frozen=True)
class PoolBounds:
    current: int
    low: int
    high: int


@dataclass(frozen=True)
class Sizing:
    replicas: int
    recommended: int
    reason: str
    message: str
    startup_s: float
    observed_per_s: float | None
    forecast_per_s: float | None
    provisioned_per_s: float
    burst: int
    model: str | None


@dataclass
class Recommendations:
    """What was recommended when, for the scale-down delay (kept in memory, like an HPA's)."""

    entries: list[tuple[float, int]] = field(default_factory=list)

    def add(self, now_s: float, replicas: int, keep_s: float) -> None:
        self.entries.append((now_s, replicas))
        self.entries = [(t, n) for t, n in self.entries if now_s - t <= keep_s]

    def highest(self, now_s: float, within_s: float) -> int | None:
        recent = [n for t, n in self.entries if now_s - t <= within_s]
        return max(recent) if recent else None


def _per_min(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate * 60:.3g}/min"


def size_pool(
    spec: WarmPoolAutoscaling,
    history: ClaimHistory,
    prediction: WindowPrediction | None,
    *,
    startup_seconds: float,
    bounds: PoolBounds,
    recommendations: Recommendations,
    now_s: float,
) -> Sizing:
    """The replicas for the next interval, and why (see the module docstring)."""
    rates = history.rates_per_s()
    observed = last_finite(rates)
    forecast = None
    model = None
    if spec.mode == "forecast" and prediction is not None and prediction.model != "none":
        forecast, provisioned, model = prediction.mean, prediction.upper, prediction.model
        basis = f"forecast {_per_min(forecast)} (upper {_per_min(provisioned)}, {model})"
    else:
        provisioned = observed or 0.0
        basis = f"last {history.interval_s}s {_per_min(observed)}"
    share = spec.warm_percent / 100.0
    for_rate = warm_for_rate(provisioned, startup_seconds, share)
    memory = max(1, math.ceil(spec.burst_memory_seconds / history.interval_s))
    recent_peaks = np.asarray(history.peaks[-memory:], dtype=np.float64)
    burst = 0
    if spec.burst_memory_seconds > 0 and np.isfinite(recent_peaks).any():
        burst = int(np.nanmax(recent_peaks))
    need = max(for_rate, burst)
    reason = "Burst" if burst > for_rate else ("Forecast" if forecast is not None else "Reactive")
    if observed is None and not burst:
        reason = "NoClaims"
    recommended = min(max(need, bounds.low), bounds.high)
    if need > bounds.high:
        reason = "AtMax"
    elif need < bounds.low and reason != "NoClaims":
        reason = "AtMin"
    replicas = recommended
    if recommended < bounds.current:
        held = recommendations.highest(now_s, spec.scale_down_delay_seconds)
        replicas = min(bounds.current, max(recommended, held if held is not None else 0))
        if replicas > recommended:
            reason = "ScaleDownDelayed"
    words = [
        f"{basis} x start-up {startup_seconds:.3g}s: {for_rate} ready keep "
        f"{spec.warm_percent:g}% of claims warm"
    ]
    if spec.burst_memory_seconds > 0:
        words.append(
            f"most claims within one start-up in the last {spec.burst_memory_seconds}s: {burst}"
        )
    if reason == "AtMax":
        words.append(f"capped at max {bounds.high}")
    elif need < bounds.low:
        words.append(f"raised to min {bounds.low}")
    elif reason == "ScaleDownDelayed":
        words.append(
            f"holding {replicas} (recommended within the last {spec.scale_down_delay_seconds}s)"
        )
    message = "; ".join(words) + f" -> {replicas} replicas"
    return Sizing(
        replicas=replicas,
        recommended=recommended,
        reason=reason,
        message=message,
        startup_s=startup_seconds,
        observed_per_s=observed,
        forecast_per_s=forecast,
        provisioned_per_s=provisioned,
        burst=burst,
        model=model,
    )
