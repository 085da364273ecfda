"""The scaling policies the simulator scores, each as published (defaults included).

- `static`: the best fixed P/D for the trace: per role, the most replicas any planner-interval
  window needs by kleave's capacity model (perfect knowledge of the peak, no scaling).
- `reactive`: Dynamo's load-based planner: every 10 s, prefill queue per prefill replica above
  5.0 adds one prefill replica, below 0.2 removes one; mean decode KV usage above 0.9 adds a
  decode replica, below 0.5 removes one. It does nothing while pods are starting, keeps decode
  three intervals after adding one, and skips a prefill scale-up when the queue's trend would
  bring it under the threshold within three intervals.
- `dynamo-sla`, `dynamo-sla-arima`: Dynamo's SLA planner every 180 s with the constant or the
  ARIMA predictor (see `DynamoSla`).
- `kleave`: `kleave.planner.loop.Planner` every planner interval, its emergency check every tick.

Every dynamic policy starts where `static` stays: the deployment was sized for its peak before
autoscaling was switched on at the trace's start (the usual way a planner is adopted), and no
policy starts under-provisioned for lack of history. All share the pools' min/max limits.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from kleave.planner.capacity import CapacityProfile
from kleave.planner.loop import Observation, Planner, PlannerSettings
from kleave.planner.solver import PoolLimits, PoolState, ScalingPolicy, Slo
from kleave.sim.arima import ArimaPredictor
from kleave.sim.cluster import ClusterView, Policy, TickStats
from kleave.sim.scenario import Scenario

POLICIES = ("static", "reactive", "dynamo-sla", "dynamo-sla-arima", "kleave")


class Static:
    name = "static"

    def __init__(self, scenario: Scenario) -> None:
        self.replicas = scenario.peak_sized()

    def initial(self) -> dict[str, int]:
        return dict(self.replicas)

    def decide(self, view: ClusterView) -> dict[str, int] | None:
        return None


class _Dynamic:
    """Initial replicas from the first window, and the shared pool limits."""

    name = ""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.limits = {r: scenario.limits.get(r, PoolLimits()) for r in scenario.profiles}

    def initial(self) -> dict[str, int]:
        return self.scenario.peak_sized()

    def clamp(self, role: str, n: int) -> int:
        lim = self.limits[role]
        return min(max(n, lim.min_replicas), lim.max_replicas)


class Reactive(_Dynamic):
    """Dynamo's load-based planner with its published thresholds, plus a decode queue
    threshold (the prefill one's values) so a batch-limited decode pool also scales."""

    name = "reactive"
    interval_s = 10.0
    queue_up, queue_down = 5.0, 0.2
    kv_up, kv_down = 0.9, 0.5
    decode_grace_intervals = 3
    queue_buffer_intervals = 3

    def __init__(self, scenario: Scenario) -> None:
        super().__init__(scenario)
        self.next_s = self.interval_s
        self.last_queue: float | None = None
        self.decode_added_s = -math.inf

    def decide(self, view: ClusterView) -> dict[str, int] | None:
        if view.now_s + 1e-9 < self.next_s:
            return None
        self.next_s = view.now_s + self.interval_s
        p, d = view.roles["prefill"], view.roles["decode"]
        queue = p.waiting
        trend = 0.0 if self.last_queue is None else queue - self.last_queue
        self.last_queue = queue
        if p.replicas > p.ready or d.replicas > d.ready:
            return None  # Dynamo blocks adjustment while workers are being added
        targets = {"prefill": p.replicas, "decode": d.replicas}
        per_replica = queue / max(p.ready, 1)
        if per_replica > self.queue_up:
            future = queue + self.queue_buffer_intervals * trend
            if future / max(p.ready, 1) >= self.queue_up:
                targets["prefill"] = p.replicas + 1
        elif per_replica < self.queue_down:
            targets["prefill"] = p.replicas - 1
        kv = d.kv_usage or 0.0
        # Requests waiting for a decode slot are the saturation signal KV usage misses when
        # the batch limit fills first (short contexts): a queue threshold as for prefill.
        decode_queue = d.waiting / max(d.ready, 1)
        if kv > self.kv_up or decode_queue > self.queue_up:
            targets["decode"] = d.replicas + 1
            self.decode_added_s = view.now_s
        elif (
            kv < self.kv_down
            and decode_queue < self.queue_down
            and (view.now_s - self.decode_added_s > self.decode_grace_intervals * self.interval_s)
        ):
            targets["decode"] = d.replicas - 1
        return {role: self.clamp(role, n) for role, n in targets.items()}


class _Interval:
    """Tick counters summed over a planner interval."""

    def __init__(self) -> None:
        self.sums = np.zeros(8)

    def add(self, stats: TickStats) -> None:
        self.sums += np.array(
            [
                stats.arrivals,
                stats.isl_sum,
                stats.osl_sum,
                stats.ttft_sum,
                stats.ttft_n,
                stats.tpot_sum,
                stats.tpot_n,
                stats.duration_sum,
            ]
        )

    def take(self) -> TickStats:
        out = TickStats(*(float(v) for v in self.sums))
        self.sums = np.zeros(8)
        return out


class _Constant:
    def __init__(self) -> None:
        self.last = 0.0

    def add(self, value: float) -> None:
        self.last = 0.0 if math.isnan(value) else value

    def predict(self) -> float:
        return self.last


class DynamoSla(_Dynamic):
    """Dynamo's SLA planner (`planner_core.py`), on profiles read from the capacity model:

    every 180 s, with averages over the interval, `p_corr = TTFT / ttft_profile(ISL)` and
    `d_corr = ITL / itl_profile(concurrency per decode replica, ISL + OSL/2)`; then
    `num_p = ceil(req * ISL / interval * min(1, p_corr) / prefill_tokens_per_s_per_gpu(ISL)
    / gpus)` and `num_d = ceil(req * OSL / interval / decode_tokens_per_s_per_gpu(ITL / d_corr,
    ISL + OSL/2) / gpus)`, floored at one. The profile's TTFT is one request alone; its decode
    throughput is the largest batch whose step time stays within the corrected ITL and whose
    context fits the KV cache (and the engine's batch limit). It skips intervals without traffic.
    """

    name = "dynamo-sla"
    interval_s = 180.0

    def __init__(
        self,
        scenario: Scenario,
        predictor: Callable[[], object] | None = None,
        *,
        headroom: float = 1.0,
    ) -> None:
        super().__init__(scenario)
        self.headroom = headroom
        """Load multiplier before rounding (1.0 is Dynamo's formula): the knob for comparing
        at equal GPU-hours."""
        make = predictor or _Constant
        self.predictors = {k: make() for k in ("num_req", "isl", "osl")}
        self.window = _Interval()
        self.next_s = self.interval_s
        self.prefill: CapacityProfile = scenario.profiles["prefill"]
        self.decode: CapacityProfile = scenario.profiles["decode"]

    def decide(self, view: ClusterView) -> dict[str, int] | None:
        self.window.add(view.last)
        if view.now_s + 1e-9 < self.next_s:
            return None
        self.next_s = view.now_s + self.interval_s
        m = self.window.take()
        isl = m.isl_sum / m.arrivals if m.arrivals else math.nan
        osl = m.osl_sum / m.arrivals if m.arrivals else math.nan
        for key, value in (("num_req", m.arrivals), ("isl", isl), ("osl", osl)):
            self.predictors[key].add(value)  # type: ignore[attr-defined]
        if not m.arrivals or not m.ttft_n or not m.tpot_n:
            return None
        ttft, itl = m.ttft_sum / m.ttft_n, m.tpot_sum / m.tpot_n
        duration = m.duration_sum / m.tpot_n
        p_corr = ttft / self.prefill.prefill.service_s(isl)
        ready_d = max(view.roles["decode"].ready, 1)
        concurrency = m.arrivals / ready_d * duration / self.interval_s
        expect_itl = self.decode.decode.step_s(concurrency, isl + osl / 2)
        d_corr = itl / expect_itl if expect_itl > 0 else 1.0
        num_req = float(self.predictors["num_req"].predict())  # type: ignore[attr-defined]
        n_isl = float(self.predictors["isl"].predict())  # type: ignore[attr-defined]
        n_osl = float(self.predictors["osl"].predict())  # type: ignore[attr-defined]
        n_isl, n_osl = max(n_isl, 1.0), max(n_osl, 1.0)
        thpt_p = n_isl / self.prefill.prefill.service_s(n_isl) / self.prefill.gpus
        num_req *= self.headroom
        load_p = num_req * n_isl / self.interval_s * min(1.0, p_corr)
        num_p = math.ceil(load_p / thpt_p / self.prefill.gpus)
        itl_target = self.scenario.slo.tpot_s / d_corr if d_corr > 0 else self.scenario.slo.tpot_s
        thpt_d = self._decode_tokens_per_gpu(itl_target, n_isl + n_osl / 2)
        num_d = math.ceil(num_req * n_osl / self.interval_s / thpt_d / self.decode.gpus)
        return {"prefill": self.clamp("prefill", num_p), "decode": self.clamp("decode", num_d)}

    def _decode_tokens_per_gpu(self, itl: float, ctx: float) -> float:
        curve = self.decode.decode
        batch = max(1.0, curve.max_batch_within(ctx, itl))
        return batch / curve.step_s(batch, ctx) / self.decode.gpus


class DynamoSlaArima(DynamoSla):
    name = "dynamo-sla-arima"

    def __init__(self, scenario: Scenario) -> None:
        super().__init__(scenario, predictor=ArimaPredictor)


class Kleave(_Dynamic):
    """The DOPD planner step (`kleave.planner.loop`) fed with interval history."""

    name = "kleave"

    def __init__(
        self,
        scenario: Scenario,
        *,
        level: float = 0.8,
        reselect_every: int = 36,
        sizing_attainment: float | None = None,
    ) -> None:
        """`sizing_attainment`: the share of requests the pools are sized to serve within the
        SLO (default: the SLO's own), the knob for comparing at equal GPU-hours."""
        super().__init__(scenario)
        self.interval_s = scenario.interval_s
        slo = scenario.slo
        if sizing_attainment is not None:
            slo = Slo(slo.ttft_s, slo.tpot_s, sizing_attainment)
        self.planner = Planner(
            PlannerSettings(
                topology=scenario.topology,
                profiles=scenario.profiles,
                limits=self.limits,
                slo=slo,
                interval_s=scenario.interval_s,
                lead_time_s=scenario.startup_s,
                level=level,
                policy=ScalingPolicy(),
                season_s=86_400.0,
                reselect_every=reselect_every,
            )
        )
        self.window = _Interval()
        self.next_s = self.interval_s
        self.rate: list[float] = []
        self.peak: list[float] = []
        self.tick_peak = 0.0
        self.isl: list[float] = []
        self.osl: list[float] = []
        self.history_limit = 0

    def _pools(self, view: ClusterView) -> dict[str, PoolState]:
        return {
            role: PoolState(v.replicas, v.last_change_s, v.waiting, v.kv_usage)
            for role, v in view.roles.items()
        }

    def decide(self, view: ClusterView) -> dict[str, int] | None:
        self.window.add(view.last)
        self.tick_peak = max(self.tick_peak, view.last.arrivals / view.tick_s)
        pools = self._pools(view)
        if view.now_s + 1e-9 < self.next_s:
            react = self.planner.react(view.now_s, pools)
            return {r: d.replicas for r, d in react.items() if d.changed} or None
        self.next_s = view.now_s + self.interval_s
        m = self.window.take()
        self.rate.append(m.arrivals / self.interval_s)
        self.peak.append(self.tick_peak)
        self.tick_peak = 0.0
        self.isl.append(m.isl_sum / m.arrivals if m.arrivals else math.nan)
        self.osl.append(m.osl_sum / m.arrivals if m.arrivals else math.nan)
        obs = Observation(
            now_s=view.now_s,
            rate=np.asarray(self.rate),
            isl=np.asarray(self.isl),
            osl=np.asarray(self.osl),
            ttft_s=m.ttft_sum / m.ttft_n if m.ttft_n else None,
            tpot_s=m.tpot_sum / m.tpot_n if m.tpot_n else None,
            pools=pools,
            peak_rate=np.asarray(self.peak),
            latency_quantile=None,
        )
        result = self.planner.plan(obs)
        return {r: d.replicas for r, d in result.decisions.items()}


def make_policy(name: str, scenario: Scenario) -> Policy:
    makers: dict[str, Callable[[Scenario], Policy]] = {
        "static": Static,
        "reactive": Reactive,
        "dynamo-sla": DynamoSla,
        "dynamo-sla-arima": DynamoSlaArima,
        "kleave": Kleave,
    }
    if name not in makers:
        raise ValueError(f"unknown policy {name!r}: choose from {', '.join(POLICIES)}, or all")
    return makers[name](scenario)
