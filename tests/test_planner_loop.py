"""The kleave planner step: forecast ahead, provision the upper bound, damp, react to queues."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kleave.planner.capacity import CapacityProfile, DecodeCurve, PrefillCurve
from kleave.planner.loop import Observation, Planner, PlannerSettings
from kleave.planner.solver import Load, PoolLimits, PoolState, ScalingPolicy, Slo

INTERVAL = 600.0
DAY = round(86_400 / INTERVAL)


def profile() -> CapacityProfile:
    """Prefill 0.1 s per request, decode steps of 10 ms + 0.5 ms per sequence."""
    return CapacityProfile(
        model="m",
        gpu_type="g",
        gpus=1,
        prefill=PrefillCurve(fixed_s=0.1, s_per_token=0.0, s_per_token2=0.0),
        decode=DecodeCurve(0.01, 0.0005, 0.0, 1e9, 256),
        kv_bytes_per_token=1.0,
    )


def settings(**overrides: object) -> PlannerSettings:
    base: dict[str, object] = {
        "topology": "PD",
        "profiles": {"prefill": profile(), "decode": profile()},
        "limits": {"prefill": PoolLimits(1, 64), "decode": PoolLimits(1, 64)},
        "slo": Slo(ttft_s=2.0, tpot_s=0.1),
        "interval_s": INTERVAL,
        "lead_time_s": 60.0,
        "reselect_every": 1000,
    }
    base.update(overrides)
    return PlannerSettings(**base)  # type: ignore[arg-type]


def daily(days: int, low: float = 20.0, high: float = 80.0) -> np.ndarray:
    """A load that is low at night and ramps up in the morning, every day the same."""
    t = np.arange(days * DAY) % DAY
    return low + (high - low) * (np.sin(2 * math.pi * (t / DAY - 0.25)) + 1) / 2


def observe(rate: np.ndarray, pools: dict[str, PoolState], **kw: object) -> Observation:
    n = len(rate)
    return Observation(
        now_s=n * INTERVAL,
        rate=rate,
        isl=np.full(n, 100.0),
        osl=np.full(n, 50.0),
        ttft_s=kw.pop("ttft_s", None),  # type: ignore[arg-type]
        tpot_s=kw.pop("tpot_s", None),  # type: ignore[arg-type]
        pools=pools,
        **kw,  # type: ignore[arg-type]
    )


def pools(p: int, d: int, **kw: float | None) -> dict[str, PoolState]:
    return {"prefill": PoolState(p, None, kw.get("waiting"), None), "decode": PoolState(d)}


def test_scales_up_ahead_of_a_known_daily_ramp() -> None:
    history = daily(3)
    # Stop on the third day half-way up the morning ramp: the next intervals are busier.
    cut = 2 * DAY + DAY // 2 - DAY // 8
    rate = history[:cut]
    planner = Planner(settings())
    now_need = planner.settings.profiles["prefill"]
    result = planner.plan(observe(rate, pools(20, 4)))
    assert result.provisioned.rate_rps > rate[-1]
    assert result.provisioned.rate_rps >= result.forecast.rate_rps
    # More prefill replicas than the load just seen needs.
    from kleave.planner.solver import required_replicas

    seen = required_replicas(
        Load(float(rate[-1]), 100, 50), {"prefill": now_need, "decode": now_need}, Slo(), "PD"
    )
    assert result.decisions["prefill"].replicas > math.ceil(seen["prefill"])


def test_holds_within_hysteresis_and_cooldown() -> None:
    planner = Planner(settings())
    rate = np.full(10, 40.0)
    need = planner.plan(observe(rate, pools(1, 1))).decisions["prefill"].required
    just_above = math.ceil(need)
    held = planner.plan(observe(rate, pools(just_above + 0, 1)))
    assert held.decisions["prefill"].replicas == just_above
    # Far above the need but changed a minute ago: the cooldown holds it.
    recent = {
        "prefill": PoolState(3 * just_above, last_change_s=10 * INTERVAL - 60),
        "decode": PoolState(4),
    }
    cooled = planner.plan(observe(rate, recent))
    assert cooled.decisions["prefill"].replicas == 3 * just_above
    assert cooled.decisions["prefill"].reason == "Cooldown"


def test_emergency_scale_up_on_queue_between_intervals() -> None:
    planner = Planner(settings())
    state = {"prefill": PoolState(4, None, waiting=100.0), "decode": PoolState(2)}
    out = planner.react(1000.0, state)
    assert out["prefill"].replicas > 4
    assert out["prefill"].reason == "EmergencyQueue"
    assert not out["decode"].changed
    # Pods asked for within the start-up time are still starting: no second bump.
    state = {"prefill": PoolState(6, 990.0, waiting=100.0), "decode": PoolState(2)}
    assert not planner.react(1000.0, state)["prefill"].changed


def test_no_history_provisions_for_the_last_value() -> None:
    planner = Planner(settings())
    result = planner.plan(observe(np.array([30.0]), pools(1, 1)))
    assert result.provisioned.rate_rps == pytest.approx(30.0)
    assert result.model == "last-value"
    empty = planner.plan(observe(np.array([math.nan]), pools(3, 3)))
    assert empty.provisioned.rate_rps == 0.0


def test_bursts_seen_recently_are_provisioned() -> None:
    rate = np.full(12, 10.0)
    smooth = Planner(settings()).plan(observe(rate, pools(1, 1)))
    peaks = np.full(12, 10.0)
    peaks[-2] = 60.0
    bursty = Planner(settings()).plan(observe(rate, pools(1, 1), peak_rate=peaks))
    assert bursty.provisioned.peak_rate_rps == pytest.approx(60.0)
    assert bursty.decisions["prefill"].replicas > smooth.decisions["prefill"].replicas


def test_latency_correction_follows_observed_over_expected() -> None:
    planner = Planner(settings())
    rate = np.full(12, 20.0)
    calm = planner.plan(observe(rate, pools(4, 2), ttft_s=None, latency_quantile=None))
    assert calm.corrections["prefill"] == pytest.approx(1.0)
    slow = planner.plan(observe(rate, pools(4, 2), ttft_s=2.0, latency_quantile=None))
    assert slow.corrections["prefill"] > 1.2
    assert slow.decisions["prefill"].required > calm.decisions["prefill"].required


def test_policy_limits_are_respected() -> None:
    tight = settings(limits={"prefill": PoolLimits(1, 3), "decode": PoolLimits(1, 2)})
    result = Planner(tight).plan(observe(np.full(6, 500.0), pools(1, 1)))
    assert result.decisions["prefill"].replicas <= 3
    assert result.decisions["decode"].replicas <= 2
    budget = settings(policy=ScalingPolicy(gpu_budget=4))
    capped = Planner(budget).plan(observe(np.full(6, 500.0), pools(1, 1)))
    assert sum(d.replicas for d in capped.decisions.values()) <= 4
