"""Per-tick fluid model of P/D serving, for traces too long for the discrete-event engine.

Within a tick the load is Poisson at the window's rate with lengths from a `LengthShape`
(quantile points of the length distribution). Each tick it computes, for the replicas ready:
- prefill as an M/G/c queue (the discrete-event engine's central FCFS queue): Erlang-C
  probability of waiting and an exponential waiting tail with Kingman's `(1 + cs^2) / 2`
  correction, plus a fluid backlog when arrivals outrun the replicas (carried across ticks);
- decode by Little's law: the batch per replica solves `b = rate x OSL x step(b) / replicas`;
  past the batch or KV limit the surplus waits in a fluid admission backlog, and near the limit
  admission waits like an Erlang-C queue over the pool's sequence slots;
- TTFT per length point = waits + prefill + KV transfer + one decode step, and the share of
  requests within the target from the waiting-time tail; TPOT = the step time at the batch,
  with the batch's Poisson spread.
Results for a (window, replicas) pair with no backlog are cached, so steady stretches cost a
dictionary lookup. `tests/test_sim.py` checks it against the discrete-event engine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import numpy.typing as npt

from kleave.planner.capacity import CapacityProfile
from kleave.planner.solver import Slo
from kleave.sim.cluster import ClusterView, Policy, Pool, RoleView, TickStats
from kleave.sim.engine import KV_WATERMARK
from kleave.sim.metrics import FloatArray, SimResult, Timeline
from kleave.sim.requests import LengthShape
from kleave.traces import RateSeries

LENGTH_SMOOTHING_S = 60.0
"""Mean lengths are averaged over about this long: a second's few requests say little about
the distribution the next ones come from, and decode batches live for many seconds."""
PREFILL_MEMORY = 10.0
"""The prefill queue's stationary tail uses the arrival rate averaged over this many mean
service times: at one-second steps a count of a few requests is noise, not a rate."""
RHO_CAP = 0.98
"""Utilization at which the stationary waiting tail is frozen: beyond it the backlog rules."""
_PHI = NormalDist().cdf


def _smoothed(
    values: FloatArray, rates: FloatArray, widths: FloatArray, smooth_s: float
) -> FloatArray:
    """Arrival-weighted exponential moving average of per-window means (causal)."""
    out = np.empty(len(values))
    num = den = 0.0
    for i in range(len(values)):
        decay = math.exp(-float(widths[i]) / smooth_s)
        n = float(rates[i] * widths[i])
        num = num * decay + n * float(values[i])
        den = den * decay + n
        out[i] = num / den if den > 0 else float(values[i])
    return out


def erlang_c(servers: int, offered: float) -> float:
    """Probability an arrival waits in M/M/c (Erlang B recursion, then C)."""
    if servers <= 0:
        return 1.0
    rho = offered / servers
    if rho >= 1:
        return 1.0
    b = 1.0
    for k in range(1, servers + 1):
        b = offered * b / (k + offered * b)
    return b / (1 - rho * (1 - b))


@dataclass(frozen=True)
class _Window:
    rate: float
    service: FloatArray
    """Prefill + transfer time at each length point."""
    mean_service: float
    cs2: float
    osl: float
    ctx: float
    weight: FloatArray


@dataclass(frozen=True)
class State:
    """What carries over between steps: backlogs, the smoothed prefill arrival rate and the
    number of sequences decoding."""

    prefill_backlog: float = 0.0
    prefill_rate: float = 0.0
    decoding: float = 0.0
    decode_backlog: float = 0.0

    @property
    def calm(self) -> bool:
        return self.prefill_backlog <= 0 and self.decode_backlog <= 0


@dataclass(frozen=True)
class _Tick:
    ttft_ok: float
    tpot_ok: float
    both_ok: float
    wait_s: float
    """Mean wait before the first token beyond prefill and transfer (queues + first step)."""
    tpot_s: float
    state: State
    p_waiting: tuple[float, float, float]
    """Prefill queue: (fluid backlog, probability an arrival waits, mean queue when it does)."""
    d_waiting: tuple[float, float, float]
    kv_usage: float
    memoryless: bool
    """The step forgot the state it started from (so the result can be cached)."""


class FluidModel:
    def __init__(
        self,
        rates: RateSeries,
        shape: LengthShape,
        profiles: Mapping[str, CapacityProfile],
        slo: Slo,
        *,
        smooth_s: float = LENGTH_SMOOTHING_S,
    ) -> None:
        self.slo = slo
        pre, dec = profiles["prefill"], profiles["decode"]
        self.curve = dec.decode
        self.kv_limit = dec.decode.kv_capacity_tokens * (1 - KV_WATERMARK)
        self.windows: list[_Window] = []
        w = shape.weight
        osl_factor = shape.osl_second_moment
        isl_means = _smoothed(rates.mean_input_tokens, rates.request_rate, rates.window_s, smooth_s)
        osl_means = _smoothed(
            rates.mean_output_tokens, rates.request_rate, rates.window_s, smooth_s
        )
        for i in range(len(rates)):
            isl = float(isl_means[i]) * shape.isl
            service = np.asarray(
                pre.prefill.fixed_s
                + pre.prefill.s_per_token * isl
                + pre.prefill.s_per_token2 * isl**2
            )
            transfer = isl * pre.kv_bytes_per_token / (pre.kv_link_gbytes_per_s * 1e9)
            mean_s = float(np.sum(w * service))
            cs2 = float(np.sum(w * service**2)) / mean_s**2 - 1
            osl = float(osl_means[i])
            self.windows.append(
                _Window(
                    rate=float(rates.request_rate[i]),
                    service=service + transfer,
                    mean_service=mean_s,
                    cs2=cs2,
                    osl=osl,
                    ctx=float(isl_means[i]) + osl * osl_factor / 2,
                    weight=w,
                )
            )
        self.cache: dict[tuple[int, int, int], _Tick] = {}

    def tick(self, i: int, c_p: int, c_d: int, state: State, dt: float) -> _Tick:
        key = (i, c_p, c_d)
        if state.calm:
            hit = self.cache.get(key)
            if hit is not None:
                return hit
        out = self._tick(self.windows[i], c_p, c_d, state, dt)
        if state.calm and out.state.calm and out.memoryless:
            self.cache[key] = out
        return out

    def _tick(self, w: _Window, c_p: int, c_d: int, state: State, dt: float) -> _Tick:
        lam = w.rate
        curve = self.curve
        # ----- prefill: M/G/c tail at the smoothed rate + fluid backlog at the raw rate -------
        mu = 1.0 / w.mean_service
        cap_p = c_p * mu
        bp = state.prefill_backlog
        bp1 = max(0.0, bp + (lam - cap_p) * dt)
        served_p = lam if bp1 <= 0 and bp <= 0 else min(cap_p, lam + bp / dt)
        tau_p = PREFILL_MEMORY * w.mean_service
        keep_p = math.exp(-dt / tau_p) if tau_p > 0 else 0.0
        lam_s = lam + (state.prefill_rate - lam) * keep_p
        offered = min(lam_s / mu, RHO_CAP * c_p) if c_p > 0 else 0.0
        p_wait = erlang_c(c_p, offered) if c_p > 0 else 1.0
        theta = 2 * (c_p - offered) * mu / (1 + w.cs2) if c_p > 0 else 0.0
        fluid_waits = (
            [0.0]
            if bp <= 0 and bp1 <= 0
            else [
                (bp + (bp1 - bp) * f) / cap_p if cap_p > 0 else math.inf
                for f in (0.125, 0.375, 0.625, 0.875)
            ]
        )
        # ----- decode: sequences relax to Little's law; past the slots, a fluid backlog -------
        per_seq = curve.step_per_seq_s + w.ctx * curve.step_per_ctx_token_s
        b_max = max(1.0, min(float(curve.max_batch), self.kv_limit / max(w.ctx, 1.0)))
        slots = c_d * b_max
        bd = state.decode_backlog
        n0 = state.decoding
        if c_d > 0:
            k = served_p * w.osl * per_seq / c_d
            n_eq = served_p * w.osl * curve.step_fixed_s / (1 - k) if k < 1 else math.inf
        else:
            n_eq = math.inf
        full_duration = w.osl * (curve.step_fixed_s + b_max * per_seq)
        cap_d = slots / full_duration if c_d > 0 else 0.0
        keep_d = 0.0
        n1: float
        n_avg: float
        if bd > 0:
            n1 = n_avg = slots
            bd1 = max(0.0, bd + (served_p - cap_d) * dt)
        else:
            if math.isfinite(n_eq):
                tau_d = w.osl * (curve.step_fixed_s + n_eq / c_d * per_seq)
                keep_d = math.exp(-dt / tau_d) if tau_d > 0 else 0.0
                n1 = n_eq + (n0 - n_eq) * keep_d
                n_avg = n_eq + (n0 - n_eq) * (tau_d / dt) * (1 - keep_d) if dt > 0 else n1
            else:
                d0 = w.osl * (curve.step_fixed_s + n0 / max(c_d, 1) * per_seq)
                n1 = n0 + (served_p - (n0 / d0 if c_d > 0 else 0.0)) * dt
                n_avg, keep_d = (n0 + n1) / 2, 1.0
            bd1 = max(0.0, n1 - slots)
            n1, n_avg = min(n1, slots), min(n_avg, slots)
        b = n_avg / c_d if c_d > 0 else 0.0
        step = curve.step_fixed_s + b * per_seq
        duration = w.osl * step
        d_wait_mean = d_wait_p = 0.0
        whole_slots = int(slots)
        a_d = min(n_avg, RHO_CAP * whole_slots)
        if whole_slots > 0 and a_d > 0:
            d_wait_p = erlang_c(whole_slots, a_d)
            d_wait_mean = d_wait_p * duration / (whole_slots - a_d)
        d_fluid = 0.0
        if bd > 0 or bd1 > 0:
            d_fluid = (bd + bd1) / 2 / cap_d if cap_d > 0 else math.inf
        step1 = curve.step_fixed_s + min(b + 1, b_max) * per_seq
        # ----- TTFT attainment per length point -----------------------------------------------
        budget = self.slo.ttft_s - step1 - d_wait_mean - d_fluid
        ttft_ok = 0.0
        for fw in fluid_waits:
            u = budget - fw - w.service
            ok = np.where(u >= 0, 1 - p_wait * np.exp(-theta * np.maximum(u, 0.0)), 0.0)
            ttft_ok += float(np.sum(w.weight * ok))
        ttft_ok /= len(fluid_waits)
        # ----- TPOT: step time at the batch, the batch Poisson-spread -------------------------
        b_slo = (self.slo.tpot_s - curve.step_fixed_s) / per_seq if per_seq > 0 else math.inf
        tpot_ok = 1.0 if b <= 0 else _PHI((b_slo - b) / math.sqrt(max(b, 1.0)))
        stationary_wait = p_wait / theta if theta > 0 else 0.0
        wait = sum(fluid_waits) / len(fluid_waits) + stationary_wait + d_wait_mean + d_fluid + step1
        return _Tick(
            ttft_ok=ttft_ok,
            tpot_ok=tpot_ok,
            both_ok=ttft_ok * tpot_ok,
            wait_s=wait,
            tpot_s=step,
            state=State(bp1, lam_s, n1, bd1),
            p_waiting=(bp1, p_wait, lam_s * stationary_wait / p_wait if p_wait > 0 else 0.0),
            d_waiting=(bd1, d_wait_p, served_p * d_wait_mean / d_wait_p if d_wait_p > 0 else 0.0),
            kv_usage=b * w.ctx / curve.kv_capacity_tokens,
            memoryless=keep_p < 1e-3 and keep_d < 1e-3,
        )


def _step_edges(rates: RateSeries, horizon: float, tick_s: float) -> FloatArray:
    """Step boundaries: every tick and every window boundary (windows finer than a tick are
    stepped one by one, so a burst within a tick still builds a queue)."""
    starts = rates.window_start_s - rates.window_start_s[0]
    ticks = np.arange(1, math.floor(horizon / tick_s + 1e-9) + 1) * tick_s
    edges = np.unique(np.round(np.concatenate([[0.0], starts, ticks]), 9))
    return np.asarray(edges[edges <= ticks[-1] + 1e-9], dtype=np.float64)


def simulate(
    rates: RateSeries,
    shape: LengthShape,
    profiles: Mapping[str, CapacityProfile],
    slo: Slo,
    policy: Policy,
    *,
    startup_s: float,
    tick_s: float = 10.0,
    seed: int = 0,
) -> SimResult:
    """Run `policy` over `rates` in the fluid model (same view and pools as the engine).

    Queue gauges are drawn from the queue-length distribution at the scrape (empty with the
    probability of not waiting, else geometric around the conditional mean): a threshold
    policy reacts to the queue it sees, not to the queue's mean."""
    model = FluidModel(rates, shape, profiles, slo)
    rng = np.random.default_rng(seed)
    pools = {role: Pool(role, profiles[role].gpus, startup_s) for role in ("prefill", "decode")}
    for role, n in policy.initial().items():
        for _ in range(n):
            pools[role].add(0.0, ready_now=True)
    horizon = max(rates.duration_s, tick_s)
    starts = rates.window_start_s - rates.window_start_s[0]
    edges = _step_edges(rates, horizon, tick_s)
    steps = len(edges) - 1
    n_s = np.zeros(steps)
    cols = {k: np.zeros(steps) for k in ("ttft", "tpot", "both", "wait", "tpot_s", "win")}
    ticks = math.floor(horizon / tick_s + 1e-9)
    replicas = {r: np.zeros(ticks) for r in pools}
    ready = {r: np.zeros(ticks) for r in pools}
    tick_of = np.zeros(steps, dtype=np.int64)
    window_of = np.clip(np.searchsorted(starts, (edges[:-1] + edges[1:]) / 2, "right") - 1, 0, None)
    state = State()
    acc = np.zeros(8)
    k = 0
    for j in range(steps):
        t0, t1 = float(edges[j]), float(edges[j + 1])
        dt = t1 - t0
        i = int(window_of[j])
        mid = (t0 + t1) / 2
        c_p = pools["prefill"].ready_count(mid)
        c_d = pools["decode"].ready_count(mid)
        out = model.tick(i, c_p, c_d, state, dt)
        state = out.state
        w = model.windows[i]
        arriving = w.rate * dt
        n_s[j] = arriving
        tick_of[j] = k
        cols["ttft"][j], cols["tpot"][j], cols["both"][j] = out.ttft_ok, out.tpot_ok, out.both_ok
        cols["wait"][j], cols["tpot_s"][j], cols["win"][j] = out.wait_s, out.tpot_s, i
        ttft_mean = out.wait_s + float(np.sum(w.weight * w.service))
        osl = float(rates.mean_output_tokens[i])
        acc += arriving * np.array(
            [
                1.0,
                float(rates.mean_input_tokens[i]),
                osl,
                ttft_mean,
                1.0,
                out.tpot_s,
                1.0,
                ttft_mean + max(osl - 1, 0) * out.tpot_s,
            ]
        )
        if t1 + 1e-9 < (k + 1) * tick_s:
            continue
        view = ClusterView(
            now_s=t1,
            tick_s=tick_s,
            roles={
                "prefill": RoleView(
                    pools["prefill"].count(),
                    pools["prefill"].ready_count(t1),
                    _gauge(rng, *out.p_waiting),
                    None,
                    pools["prefill"].last_change_s,
                ),
                "decode": RoleView(
                    pools["decode"].count(),
                    pools["decode"].ready_count(t1),
                    _gauge(rng, *out.d_waiting),
                    out.kv_usage,
                    pools["decode"].last_change_s,
                ),
            },
            last=TickStats(*(float(v) for v in acc)),
        )
        acc = np.zeros(8)
        targets = policy.decide(view) or {}
        for role, target in targets.items():
            _scale(pools[role], max(0, target), t1, w, out)
        for role, pool in pools.items():
            replicas[role][k] = pool.count()
            ready[role][k] = pool.ready_count(t1)
        k += 1
    return _result(
        name=policy.name,
        model=model,
        pools=pools,
        horizon=horizon,
        tick_s=tick_s,
        steps=(n_s, tick_of),
        cols=cols,
        replicas=replicas,
        ready=ready,
    )


def _gauge(rng: np.random.Generator, backlog: float, p_wait: float, mean: float) -> float:
    if p_wait <= 0 or mean <= 0 or rng.random() >= p_wait:
        return backlog
    return backlog + float(rng.geometric(1.0 / (1.0 + mean)))


def _scale(pool: Pool, target: int, now: float, w: _Window, out: _Tick) -> None:
    if target > pool.count():
        pool.scale_up(target, now)
        return
    excess = pool.cancel_starting(target, now)
    if excess <= 0:
        return
    drain = w.mean_service if pool.role == "prefill" else w.osl * out.tpot_s
    ready = sorted((r for r in pool.active() if r.ready_s <= now), key=lambda r: -r.ready_s)
    for r in ready[:excess]:
        pool.release(r, now + drain)


def _result(
    *,
    name: str,
    model: FluidModel,
    pools: dict[str, Pool],
    horizon: float,
    tick_s: float,
    steps: tuple[FloatArray, npt.NDArray[np.int64]],
    cols: dict[str, FloatArray],
    replicas: dict[str, FloatArray],
    ready: dict[str, FloatArray],
) -> SimResult:
    n_t, tick_of = steps
    ticks = len(next(iter(replicas.values())))
    win = cols["win"].astype(np.int64)
    base = np.stack([w.service for w in model.windows])
    weights = np.stack([w.weight for w in model.windows])
    ttft = (cols["wait"][:, None] + base[win]).ravel()
    weight = (n_t[:, None] * weights[win]).ravel()
    tpot = np.repeat(cols["tpot_s"], base.shape[1])
    total = float(np.sum(n_t))
    slo = model.slo
    ceiling_ok = (base + model.curve.step_s(1, 0.0) <= slo.ttft_s).astype(np.float64)
    ceiling = float(np.sum(weights[win] * ceiling_ok[win] * n_t[:, None])) / max(total, 1e-12)
    return SimResult(
        policy=name,
        engine="fluid",
        duration_s=horizon,
        gpu_seconds={r: p.gpu_seconds(horizon) for r, p in pools.items()},
        actions={r: p.actions for r, p in pools.items()},
        timeline=Timeline(
            t_s=np.arange(1, ticks + 1, dtype=np.float64) * tick_s,
            arrivals=np.asarray(
                np.bincount(tick_of, weights=n_t, minlength=ticks)[:ticks], dtype=np.float64
            ),
            replicas=replicas,
            ready=ready,
            met=np.asarray(
                np.bincount(tick_of, weights=n_t * cols["both"], minlength=ticks)[:ticks],
                dtype=np.float64,
            ),
        ),
        ttft_s=ttft,
        tpot_s=tpot,
        weight=weight,
        requests=total,
        ttft_ok=float(np.sum(n_t * cols["ttft"])),
        tpot_ok=float(np.sum(n_t * cols["tpot"])),
        both_ok=float(np.sum(n_t * cols["both"])),
        ceiling=ceiling,
    )
