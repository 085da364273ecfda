"""Turn a load forecast into replicas per pool: capacity math, then the scaling policy.

`required_replicas` answers "how many replicas carry this load within the SLOs" (fractional);
`decide` turns that into the integer replicas to write, with min/max, a GPU budget, hysteresis,
cooldown, a maximum step and an emergency scale-up on queue depth or KV usage. Both are pure:
the operator and the simulator call the same code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from kleave.planner.capacity import CapacityProfile

ROLE_ORDER = ("prefill", "decode", "attention", "ffn")

ISL_CV = 1.0
"""Coefficient of variation of input lengths assumed by the prefill queue model (traces: ~1)."""
TPOT_HEADROOM = 0.85
"""Decode batches are sized for this share of the TPOT SLO: step time varies with the batch mix."""
MAX_UTILIZATION = 0.95
DECODE_SLOT_USAGE = 0.85
"""Decode pools are sized so the mean batch fills at most this share of a replica's slots (KV
cache or batch limit): concurrency is Poisson and context lengths vary, so a pool sized to fill
its KV cache on average makes new requests wait for admission (the simulator shows TTFT misses
at 100%, none at 85%)."""


@dataclass(frozen=True)
class Load:
    rate_rps: float
    mean_isl: float
    mean_osl: float
    peak_rate_rps: float | None = None
    """Highest arrival rate over short sub-windows (a scrape interval); None: Poisson."""

    def sizing_rate(self) -> float:
        """The steady rate to size a pool for: the mean, or the short-window peak if higher.

        A burst longer than the TTFT target cannot wait in a queue for capacity, and the peak
        over a 10 s scrape is itself a floor (the Azure code trace's 1 s peaks are 2-3x its
        10 s peaks): the simulator shows pools sized on the mean miss a third of that trace's
        requests; sized on the burst spread over the TTFT budget, or on the peak less its
        Poisson noise, still 1.5-3%."""
        if self.peak_rate_rps is None:
            return self.rate_rps
        return max(self.rate_rps, self.peak_rate_rps)


@dataclass(frozen=True)
class Slo:
    ttft_s: float = 2.0
    tpot_s: float = 0.1
    attainment: float = 0.99


# ----- capacity math ---------------------------------------------------------------------------
def _wait_quantile_s(rho: float, mean_service_s: float, quantile: float) -> float:
    """Tail of the M/G/1 waiting time, P(W > t) ~ rho * exp(-t / tau) with
    tau = E[S^2] / (2 E[S] (1 - rho)) (Kingman's heavy-traffic exponential tail)."""
    if rho <= 1.0 - quantile:
        return 0.0
    tau = mean_service_s * (1.0 + ISL_CV**2) / (2.0 * (1.0 - rho))
    return tau * math.log(rho / (1.0 - quantile))


def _erlang_c(servers: int, offered: float) -> float:
    """Probability an arrival waits in an M/M/c queue (Erlang B recursion, then C)."""
    if servers <= 0 or offered >= servers:
        return 1.0
    b = 1.0
    for k in range(1, servers + 1):
        b = offered * b / (k + offered * b)
    return b / (1.0 - offered / servers * (1.0 - b))


def prefill_service_moments(profile: CapacityProfile, mean_isl: float) -> tuple[float, float]:
    """Mean prefill time and its squared CV when input lengths are log-normal with mean
    `mean_isl` and CV `ISL_CV`: attention is quadratic, so the mean time is more than the time
    of the mean prompt (the simulator's Mooncake replay showed 30% more), and long prompts
    make the time far more variable than the lengths."""
    p = profile.prefill
    g = 1.0 + ISL_CV**2
    moments = [mean_isl**k * g ** (k * (k - 1) / 2) for k in range(5)]
    mean = p.fixed_s + p.s_per_token * moments[1] + p.s_per_token2 * moments[2]
    second = (
        p.fixed_s**2
        + 2 * p.fixed_s * p.s_per_token * moments[1]
        + (p.s_per_token**2 + 2 * p.fixed_s * p.s_per_token2) * moments[2]
        + 2 * p.s_per_token * p.s_per_token2 * moments[3]
        + p.s_per_token2**2 * moments[4]
    )
    return mean, max(second / (mean * mean) - 1.0, 0.0)


def _pool_wait_quantile_s(
    servers: int, offered: float, mean_service_s: float, quantile: float, cs2: float = ISL_CV**2
) -> float:
    """Waiting-time quantile of M/G/c with one FCFS queue (the prefill queue, or routing to
    the replica with the least work): P(W > t) ~ C(c, a) * exp(-t / tau) with
    tau = E[S] (1 + cs^2) / (2 (c - a)) (Erlang C with Kingman's variability correction)."""
    if offered >= servers:
        return math.inf
    p_wait = _erlang_c(servers, offered)
    if p_wait <= 1.0 - quantile:
        return 0.0
    tau = mean_service_s * (1.0 + cs2) / (2.0 * (servers - offered))
    return tau * math.log(p_wait / (1.0 - quantile))


def prefill_pool_replicas(load: Load, profile: CapacityProfile, slo: Slo) -> float:
    """Prefill replicas for `load` fed by one queue (M/G/c), fractional between the last count
    that misses the TTFT quantile and the first that meets it; at most `MAX_UTILIZATION` busy.

    A pool shares its queue, so it carries far more per replica than `prefill_replicas` (one
    M/G/1 queue per replica with the rate split evenly) when service times are long against
    the SLO: the simulator's central-queue engine meets the SLO with 6 replicas where the split
    model asked for 20 (Mooncake conversation trace, 1.8 req/s)."""
    if load.rate_rps <= 0:
        return 0.0
    typical = profile.prefill.service_s(load.mean_isl)
    budget = slo.ttft_s - typical - profile.kv_transfer_s(load.mean_isl)
    if budget <= 0:
        return math.inf
    service, cs2 = prefill_service_moments(profile, load.mean_isl)
    offered = load.sizing_rate() * service
    floor = offered / MAX_UTILIZATION
    c = max(1, math.ceil(floor - 1e-9))
    while _pool_wait_quantile_s(c, offered, service, slo.attainment, cs2) > budget:
        c += 1
    if c - 1 < floor:
        return max(floor, 1e-9)
    above = _pool_wait_quantile_s(c - 1, offered, service, slo.attainment, cs2)
    below = _pool_wait_quantile_s(c, offered, service, slo.attainment, cs2)
    fraction = 1.0 if not math.isfinite(above) else (above - budget) / max(above - below, 1e-12)
    return max(floor, c - 1 + min(max(fraction, 1e-6), 1.0))


def prefill_utilization(profile: CapacityProfile, isl: float, slo: Slo) -> float:
    """Highest utilization of one prefill replica at which the TTFT quantile meets the SLO."""
    service = profile.prefill.service_s(isl)
    budget = slo.ttft_s - service - profile.kv_transfer_s(isl)
    if budget <= 0:
        return 0.0  # even an idle replica misses: report it, callers floor at one replica
    lo, hi = 0.0, MAX_UTILIZATION
    if _wait_quantile_s(hi, service, slo.attainment) <= budget:
        return hi
    for _ in range(40):
        mid = (lo + hi) / 2
        if _wait_quantile_s(mid, service, slo.attainment) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def prefill_rate_per_replica(profile: CapacityProfile, isl: float, slo: Slo) -> float:
    """Requests/s one prefill replica sustains within the TTFT SLO."""
    return prefill_utilization(profile, isl, slo) / profile.prefill.service_s(isl)


def decode_context(load: Load) -> float:
    """Mean KV context of a sequence being decoded: its prompt plus half its output."""
    return load.mean_isl + load.mean_osl / 2.0


def decode_batch_per_replica(profile: CapacityProfile, load: Load, slo: Slo) -> float:
    """Concurrent sequences one decode replica holds within TPOT and KV memory."""
    return profile.decode.max_batch_within(decode_context(load), slo.tpot_s * TPOT_HEADROOM)


def decode_tokens_per_replica(profile: CapacityProfile, load: Load, slo: Slo) -> float:
    """Tokens/s of one replica at its sizing batch: within TPOT, and within
    `DECODE_SLOT_USAGE` of its KV-cache and batch limits."""
    d = profile.decode
    slots = min(d.kv_capacity_tokens / max(decode_context(load), 1.0), float(d.max_batch))
    batch = min(decode_batch_per_replica(profile, load, slo), DECODE_SLOT_USAGE * slots)
    if batch <= 0:
        return 0.0
    return batch / profile.decode.step_s(batch, decode_context(load))


def prefill_replicas(load: Load, profile: CapacityProfile, slo: Slo) -> float:
    """Replicas if each had its own queue and an even share of the rate (M/G/1 each): an
    upper bound on `prefill_pool_replicas`, which `required_replicas` uses."""
    if load.rate_rps <= 0:
        return 0.0
    per_replica = prefill_rate_per_replica(profile, load.mean_isl, slo)
    return math.inf if per_replica <= 0 else load.rate_rps / per_replica


def decode_replicas(load: Load, profile: CapacityProfile, slo: Slo) -> float:
    """Little's law: concurrency = rate x OSL x step time; replicas = concurrency / batch.
    Bursts count as in prefill: admission may wait as long as the TTFT target allows."""
    if load.rate_rps <= 0:
        return 0.0
    tokens = decode_tokens_per_replica(profile, load, slo)
    rate = load.sizing_rate()
    return math.inf if tokens <= 0 else rate * load.mean_osl / tokens


def required_replicas(
    load: Load, profiles: Mapping[str, CapacityProfile], slo: Slo, topology: str
) -> dict[str, float]:
    """Fractional replicas per role for `load` (profiles keyed by role, each on its GPU type)."""
    if topology == "Colocated":
        pool = profiles["decode"]
        return {"decode": prefill_pool_replicas(load, pool, slo) + decode_replicas(load, pool, slo)}
    need = {"prefill": prefill_pool_replicas(load, profiles["prefill"], slo)}
    if topology == "PDAF":
        attention = decode_replicas(load, profiles["attention"], slo)
        need["attention"] = attention
        need["ffn"] = attention * profiles["ffn"].ffn_per_attention
    else:
        need["decode"] = decode_replicas(load, profiles["decode"], slo)
    return need


def expected_ttft_s(load: Load, profile: CapacityProfile, replicas: float, slo: Slo) -> float:
    """Model TTFT quantile at `replicas` prefill replicas sharing one queue (for the
    observed/expected correction)."""
    service, cs2 = prefill_service_moments(profile, load.mean_isl)
    servers = max(1, round(replicas))
    offered = min(load.rate_rps * service, 0.999 * servers)
    return (
        profile.prefill.service_s(load.mean_isl)
        + profile.kv_transfer_s(load.mean_isl)
        + _pool_wait_quantile_s(servers, offered, service, slo.attainment, cs2)
    )


def expected_ttft_mean_s(load: Load, profile: CapacityProfile, replicas: float) -> float:
    """Model mean TTFT (prefill and transfer; the caller adds the first decode step) at
    `replicas` prefill replicas sharing one queue, to compare with the mean a metrics backend
    reports (rate of the histogram's sum over rate of its count)."""
    service, cs2 = prefill_service_moments(profile, load.mean_isl)
    servers = max(1, round(replicas))
    offered = min(load.rate_rps * service, 0.999 * servers)
    wait = _erlang_c(servers, offered) * service * (1.0 + cs2) / (2.0 * (servers - offered))
    return service + profile.kv_transfer_s(load.mean_isl) + wait


def expected_tpot_s(load: Load, profile: CapacityProfile, replicas: float) -> float:
    """Model TPOT at `replicas` decode replicas: step time at the Little's-law batch."""
    ctx = decode_context(load)
    # Solve batch = rate * osl * step(batch) / replicas for batch (linear in batch).
    d = profile.decode
    per_seq = d.step_per_seq_s + ctx * d.step_per_ctx_token_s
    k = load.rate_rps * load.mean_osl / max(replicas, 1e-9)
    batch = k * d.step_fixed_s / (1 - k * per_seq) if k * per_seq < 1 else float(d.max_batch)
    return d.step_s(min(batch, float(d.max_batch)), ctx)


def latency_correction(
    observed_s: float | None,
    expected_s: float,
    previous: float = 1.0,
    *,
    smoothing: float = 0.5,
    low: float = 0.8,
    high: float = 2.0,
) -> float:
    """Observed/expected latency ratio, smoothed and clamped: the capacity model's error.

    Dynamo applies the raw ratio; smoothing stops one noisy interval from doubling a pool and
    the clamp stops a broken metric from scaling to the maximum."""
    if observed_s is None or expected_s <= 0 or not math.isfinite(observed_s):
        return previous
    ratio = min(max(observed_s / expected_s, low), high)
    return smoothing * ratio + (1 - smoothing) * previous


# ----- scaling policy --------------------------------------------------------------------------
@dataclass(frozen=True)
class PoolLimits:
    min_replicas: int = 1
    max_replicas: int = 64
    gpus_per_replica: int = 1


@dataclass(frozen=True)
class ScalingPolicy:
    scale_down_margin: float = 0.1
    """Hysteresis: scale down only to ceil(required x (1 + margin)), and only when below current."""
    cooldown_down_s: float = 300.0
    """No scale-down for this long after any change of the pool: start-up costs are paid once."""
    max_step_up: float = 1.0
    """At most this fraction of the current replicas added per decision (at least 2)."""
    max_step_down: float = 0.25
    """At most this fraction removed per decision (at least 1)."""
    gpu_budget: int | None = None
    queue_per_replica: float = 5.0
    """Waiting requests per replica that trigger an immediate scale-up (Dynamo's load planner)."""
    kv_usage_threshold: float = 0.9


@dataclass(frozen=True)
class PoolState:
    replicas: int
    last_change_s: float | None = None
    waiting: float | None = None
    kv_usage: float | None = None


@dataclass(frozen=True)
class PoolDecision:
    role: str
    replicas: int
    previous: int
    required: float
    reason: str
    message: str

    @property
    def changed(self) -> bool:
        return self.replicas != self.previous


@dataclass
class _Work:
    role: str
    state: PoolState
    limits: PoolLimits
    required: float
    target: int = 0
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _emergency(work: _Work, policy: ScalingPolicy) -> None:
    state = work.state
    current = max(state.replicas, 1)
    if state.waiting is not None and state.waiting / current > policy.queue_per_replica:
        bump = current + max(1, math.ceil(current * 0.5))
        if bump > work.target:
            work.target = bump
            work.reasons.append("EmergencyQueue")
            work.notes.append(f"{state.waiting:.0f} waiting on {state.replicas} replicas")
    if state.kv_usage is not None and state.kv_usage > policy.kv_usage_threshold:
        bump = current + max(1, math.ceil(current * 0.25))
        if bump > work.target:
            work.target = bump
            work.reasons.append("EmergencyKVCache")
            work.notes.append(f"KV cache {state.kv_usage:.0%} used")


def _policy_limits(work: _Work, policy: ScalingPolicy, now_s: float) -> None:
    current = work.state.replicas
    if work.target < current:
        with_margin = math.ceil(work.required * (1 + policy.scale_down_margin) - 1e-9)
        held = max(work.target, with_margin)
        last = work.state.last_change_s
        if held >= current:
            work.target = current
            work.reasons.append("Hysteresis")
            work.notes.append(f"within the {policy.scale_down_margin:.0%} scale-down margin")
            return
        if last is not None and now_s - last < policy.cooldown_down_s:
            work.target = current
            work.reasons.append("Cooldown")
            work.notes.append(
                f"last change {now_s - last:.0f}s ago < {policy.cooldown_down_s:.0f}s"
            )
            return
        floor = current - max(1, math.floor(current * policy.max_step_down))
        work.target = max(held, floor)
        if work.target == floor and held < floor:
            work.reasons.append("MaxStep")
    elif work.target > current:
        ceiling = current + max(2, math.ceil(current * policy.max_step_up))
        if work.target > ceiling:
            work.target = ceiling
            work.reasons.append("MaxStep")


def _apply_budget(works: list[_Work], policy: ScalingPolicy) -> None:
    """Over the GPU budget, shrink every pool by the same factor (the P/D ratio is kept)."""
    if policy.gpu_budget is None:
        return
    used = sum(w.target * w.limits.gpus_per_replica for w in works)
    if used <= policy.gpu_budget:
        return
    floor = sum(w.limits.min_replicas * w.limits.gpus_per_replica for w in works)
    factor = max(0.0, (policy.gpu_budget - floor) / max(used - floor, 1))
    for w in works:
        w.target = w.limits.min_replicas + math.floor((w.target - w.limits.min_replicas) * factor)
        w.reasons.append("GPUBudget")
    w_used = sum(w.target * w.limits.gpus_per_replica for w in works)
    works[0].notes.append(f"{used} GPUs wanted, budget {policy.gpu_budget}, using {w_used}")


def decide(
    required: Mapping[str, float],
    states: Mapping[str, PoolState],
    limits: Mapping[str, PoolLimits],
    policy: ScalingPolicy,
    now_s: float,
) -> dict[str, PoolDecision]:
    """Integer replicas per role, each with the reason a human reads in status and events."""
    works: list[_Work] = []
    for role in (r for r in ROLE_ORDER if r in required):
        lim = limits.get(role, PoolLimits())
        work = _Work(role, states[role], lim, required[role])
        work.target = (
            lim.max_replicas
            if not math.isfinite(required[role])
            else math.ceil(required[role] - 1e-9)
        )
        work.reasons.append("Forecast")
        _emergency(work, policy)
        _policy_limits(work, policy, now_s)
        if work.target < lim.min_replicas:
            work.target = lim.min_replicas
            work.reasons.append("MinReplicas")
        if work.target > lim.max_replicas:
            work.target = lim.max_replicas
            work.reasons.append("MaxReplicas")
        works.append(work)
    _apply_budget(works, policy)
    decisions: dict[str, PoolDecision] = {}
    for w in works:
        reason = w.reasons[-1]
        note = "; ".join(w.notes)
        message = (
            f"{w.role}: {w.state.replicas} -> {w.target} replicas (need {w.required:.2f}: {reason}"
            + (f", {note})" if note else ")")
        )
        decisions[w.role] = PoolDecision(
            w.role, w.target, w.state.replicas, w.required, reason, message
        )
    return decisions


def with_replicas(state: PoolState, replicas: int, now_s: float) -> PoolState:
    """The pool state after a decision was applied (the cooldown clock restarts on change)."""
    if replicas == state.replicas:
        return state
    return replace(state, replicas=replicas, last_change_s=now_s)
