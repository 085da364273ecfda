"""The kleave planner step (DOPD), pure and stateful: the operator and the simulator both run it.

Every interval, `Planner.plan`:
1. forecasts the request rate over the next interval plus the pod start-up lead time
   (`AutoForecaster`) and provisions for the forecast's upper bound (the load a new pod will
   meet when it is ready, not the load just seen), with the lengths of the last half hour (or
   of the last interval, if longer) and the highest short-window peak of the last half hour;
2. turns that load into fractional replicas per role with the capacity model
   (`solver.required_replicas`), scaled by latency corrections (observed over expected TTFT
   and TPOT at the load and replicas of the interval just finished: the model's error);
3. rounds, bounds and damps them with `solver.decide` (hysteresis, cooldown, max step, GPU
   budget, emergency scale-up on queue depth or KV usage).

Between intervals `Planner.react` runs only the emergency part, so a burst that fills queues
gets replicas within one metrics scrape rather than one interval. It does not fire again for a
pool whose last change is younger than the start-up time: pods asked for are still starting.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from kleave.planner.capacity import CapacityProfile
from kleave.planner.solver import (
    Load,
    PoolDecision,
    PoolLimits,
    PoolState,
    ScalingPolicy,
    Slo,
    decide,
    expected_tpot_s,
    expected_ttft_mean_s,
    expected_ttft_s,
    latency_correction,
    required_replicas,
)
from kleave.planner.window_forecast import WindowForecaster, horizon_steps, last_finite

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class PlannerSettings:
    topology: str
    """"PD" | "Colocated" | "PDAF"."""
    profiles: Mapping[str, CapacityProfile]
    """By role, each on its pool's GPU type."""
    limits: Mapping[str, PoolLimits]
    slo: Slo
    interval_s: float
    """Decision interval, and the step of the load history."""
    lead_time_s: float
    """Pod start-up: the planner provisions for the load at now + lead + interval."""
    level: float = 0.8
    """Forecast interval level; its upper bound is provisioned."""
    policy: ScalingPolicy = field(default_factory=ScalingPolicy)
    season_s: float | None = 86_400.0
    history_s: float | None = 7 * 86_400.0
    """The forecasters read at most this much history (the API's history window)."""
    reselect_every: int = 36
    """Forecast model choice (a rolling backtest, seconds of CPU) every this many intervals."""
    burst_memory_s: float = 1800.0
    """Bursts seen within this long are expected again: the highest short-window rate over it
    is provisioned for (0: bursts are not provisioned for)."""


@dataclass(frozen=True)
class Observation:
    now_s: float
    rate: FloatArray
    """Request rate (req/s) per interval, oldest first; the last is the interval just
    finished. NaN = missing."""
    isl: FloatArray
    osl: FloatArray
    ttft_s: float | None
    """TTFT of the requests of the last interval, the statistic `latency_quantile` names."""
    tpot_s: float | None
    """Time per output token of the requests of the last interval, likewise."""
    pools: Mapping[str, PoolState]
    peak_rate: FloatArray | None = None
    """Per interval, the highest rate over short sub-windows (a scrape interval): how bursty
    the load is within an interval. None: assume Poisson arrivals."""
    latency_quantile: float | None = 0.9
    """Which statistic `ttft_s` and `tpot_s` are: a quantile (0.9: the p90 the operator reads
    from the histograms) or None for the mean (rate of sum over rate of count)."""


@dataclass(frozen=True)
class PlanResult:
    decisions: dict[str, PoolDecision]
    forecast: Load
    """Mean forecast for the provisioning horizon."""
    provisioned: Load
    """What was provisioned for (upper bound of the rate forecast)."""
    model: str
    """The forecaster chosen."""
    corrections: dict[str, float]


LENGTH_MEMORY_S = 1800.0
NEAR_SLO = 0.25
"""A latency at or above this share of its target counts as near the SLO (see
`Planner._corrected_need`)."""


class Planner:
    """One InferenceDeployment's planner: keeps the forecasters and latency corrections."""

    def __init__(self, settings: PlannerSettings) -> None:
        self.settings = settings
        self._rate = WindowForecaster(
            interval_s=settings.interval_s,
            level=settings.level,
            season_s=settings.season_s,
            history_s=settings.history_s,
            reselect_every=settings.reselect_every,
        )
        self.corrections: dict[str, float] = {role: 1.0 for role in settings.profiles}

    @property
    def horizon(self) -> int:
        """Forecast steps covering the next interval after a pod asked for now is ready."""
        return horizon_steps(self.settings.interval_s, self.settings.lead_time_s)

    def _update_corrections(self, obs: Observation) -> None:
        """Observed over expected latency at the last interval's load and replicas, the
        expectation being the same statistic (mean or quantile) the observation is."""
        s = self.settings
        rate = last_finite(obs.rate[-1:])
        isl, osl = last_finite(obs.isl[-1:]), last_finite(obs.osl[-1:])
        if not rate or isl is None or osl is None:
            return
        load = Load(rate, isl, osl)
        decode_role = "decode" if "decode" in s.profiles else "attention"
        first_step = 0.0
        if decode_role in s.profiles and decode_role in obs.pools:
            replicas = max(obs.pools[decode_role].replicas, 1)
            first_step = expected_tpot_s(load, s.profiles[decode_role], replicas)
            self.corrections[decode_role] = latency_correction(
                obs.tpot_s, first_step, self.corrections[decode_role]
            )
        if "prefill" in s.profiles and "prefill" in obs.pools:
            replicas = max(obs.pools["prefill"].replicas, 1)
            profile = s.profiles["prefill"]
            if obs.latency_quantile is None:
                expected = expected_ttft_mean_s(load, profile, replicas)
            else:
                q = Slo(s.slo.ttft_s, s.slo.tpot_s, obs.latency_quantile)
                expected = expected_ttft_s(load, profile, replicas, q)
            # The first token comes out of one decode step after the KV transfer.
            self.corrections["prefill"] = latency_correction(
                obs.ttft_s, expected + first_step, self.corrections["prefill"]
            )
        if "attention" in self.corrections and "ffn" in self.corrections:
            self.corrections["ffn"] = self.corrections["attention"]

    def plan(self, obs: Observation) -> PlanResult:
        s = self.settings
        self._update_corrections(obs)
        predicted = self._rate.predict(obs.rate, s.lead_time_s)
        rate_mean, rate_upper, model = predicted.mean, predicted.upper, predicted.model
        isl_mean = self._length(np.asarray(obs.isl, np.float64), np.asarray(obs.rate, np.float64))
        osl_mean = self._length(np.asarray(obs.osl, np.float64), np.asarray(obs.rate, np.float64))
        forecast = Load(rate_mean, isl_mean, osl_mean)
        provisioned = Load(rate_upper, isl_mean, osl_mean, self._recent_peak(obs))
        need = self._corrected_need(provisioned, obs)
        states = {role: obs.pools.get(role, PoolState(0)) for role in need}
        decisions = decide(need, states, s.limits, s.policy, obs.now_s)
        return PlanResult(decisions, forecast, provisioned, model, dict(self.corrections))

    def _corrected_need(self, load: Load, obs: Observation) -> dict[str, float]:
        """Replicas once the model's latency is scaled by the observed corrections.

        Far from the SLO (the latency just seen under `NEAR_SLO` of the target) the pools are
        sized for the target over the correction (Dynamo corrects its ITL target the same
        way): a model that underestimates a latency well inside the SLO costs nothing. Near
        the SLO, or where the corrected target cannot be met at any size, the need itself is
        scaled by the correction: the latency seen says the pools are short by that much
        (bursts shorter than the interval show up only this way)."""
        s = self.settings
        decode_role = "decode" if "decode" in s.profiles else "attention"
        prefill_corr = self.corrections.get("prefill", 1.0)
        decode_corr = self.corrections.get(decode_role, 1.0)
        tight = Slo(s.slo.ttft_s / prefill_corr, s.slo.tpot_s / decode_corr, s.slo.attainment)
        plain = required_replicas(load, s.profiles, s.slo, s.topology)
        corrected = required_replicas(load, s.profiles, tight, s.topology)
        near = {
            "prefill": (obs.ttft_s or 0.0) >= NEAR_SLO * s.slo.ttft_s,
            decode_role: (obs.tpot_s or 0.0) >= NEAR_SLO * s.slo.tpot_s,
        }
        near["ffn"] = near.get("attention", False)
        return {
            role: n
            if math.isfinite(n) and not near.get(role, False)
            else plain[role] * self.corrections.get(role, 1.0)
            for role, n in corrected.items()
        }

    def _length(self, lengths: FloatArray, rate: FloatArray) -> float:
        """Mean length to provision for: the larger of the last interval's and the
        rate-weighted mean of the last `LENGTH_MEMORY_S` (a longer prompt costs at once; a
        shorter one is believed once it persists).

        Lengths drift slowly or jump (the ServeGen means change 6-hourly), so a per-interval
        model choice buys little, and the statsmodels candidates can stall on such a
        piecewise-constant series with gaps (over 100 s in one ARIMA covariance, seen on the
        ServeGen output lengths): a robust average is used instead."""
        n = max(1, round(LENGTH_MEMORY_S / self.settings.interval_s))
        x, w = lengths[-n:], rate[-n:]
        ok = np.isfinite(x) & np.isfinite(w) & (w > 0)
        last = last_finite(lengths)
        if last is None:
            return 1.0
        if not np.any(ok):
            return last
        return max(last if np.isfinite(x[-1]) else 0.0, float(np.average(x[ok], weights=w[ok])))

    def _recent_peak(self, obs: Observation) -> float | None:
        """The highest short-window rate of the recent intervals (None when unknown)."""
        memory = self.settings.burst_memory_s
        if obs.peak_rate is None or memory <= 0:
            return None
        n = max(1, round(memory / self.settings.interval_s))
        peak = np.asarray(obs.peak_rate, np.float64)[-n:]
        peak = peak[np.isfinite(peak)]
        return float(np.max(peak)) if len(peak) else None

    def react(self, now_s: float, pools: Mapping[str, PoolState]) -> dict[str, PoolDecision]:
        """The emergency check alone: hold every pool unless its queue or KV usage crossed the
        thresholds and it has not changed within the start-up time."""
        s = self.settings
        states = {}
        for role, state in pools.items():
            recent = state.last_change_s is not None and now_s - state.last_change_s < (
                s.lead_time_s
            )
            states[role] = (
                PoolState(state.replicas, state.last_change_s, None, None) if recent else state
            )
        hold = {role: float(state.replicas) for role, state in states.items()}
        return decide(hold, states, s.limits, s.policy, now_s)
