"""The planner's loop inside the operator: one task per InferenceDeployment with Planner pools.

Every interval it reads Prometheus (in a thread: the client is blocking), plans, writes pool
replicas through `/scale`, posts an event per change and exports metrics. It never writes the
deployment's status itself: it leaves a report and enqueues the deployment, so the reconciler
stays the only writer of that status and the two never overwrite each other's conditions.
Missing Prometheus or series: the report says PlannerDegraded, replicas are held, and the
task retries with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from prometheus_client import Counter, Gauge
from pydantic import ValidationError

from kleave.api.inference_deployment import InferenceDeploymentSpec
from kleave.operator.conditions import set_condition
from kleave.operator.events import EventRecorder
from kleave.operator.kube import CONFIGMAP, INFERENCE_POOL, ApiError, KubeApi
from kleave.operator.metrics import REGISTRY
from kleave.operator.naming import pool_name
from kleave.operator.store import Store
from kleave.planner.capacity import ProfileError, ProfileTable, parse_profiles
from kleave.planner.from_spec import (
    PlannerReport,
    default_selector,
    observed_load,
    planner_roles,
    reactive_decisions,
    report_from_plan,
    settings_from_spec,
)
from kleave.planner.loop import Observation, Planner, PlannerSettings
from kleave.planner.metrics import MetricsUnavailable, ObservedLoad, PrometheusReader
from kleave.planner.solver import Load, PoolState

logger = logging.getLogger("kleave.planner")

PROFILES_KEY = "profiles.yaml"
MAX_BACKOFF_S = 300.0

PLANNER_REPLICAS = Gauge(
    "kleave_planner_replicas",
    "Replicas the planner chose for a pool.",
    labelnames=("namespace", "deployment", "role"),
    registry=REGISTRY,
)
PLANNER_REQUIRED = Gauge(
    "kleave_planner_required_replicas",
    "Fractional replicas the capacity model needs for the provisioned load.",
    labelnames=("namespace", "deployment", "role"),
    registry=REGISTRY,
)
PLANNER_LOAD = Gauge(
    "kleave_planner_load",
    "Load seen and planned for: kind observed|forecast|provisioned, quantity rate|isl|osl.",
    labelnames=("namespace", "deployment", "kind", "quantity"),
    registry=REGISTRY,
)
PLANNER_DECISIONS = Counter(
    "kleave_planner_decisions_total",
    "Planner decisions per pool, by reason (Forecast, EmergencyQueue, Cooldown, ...).",
    labelnames=("namespace", "deployment", "role", "reason"),
    registry=REGISTRY,
)
PLANNER_DEGRADED = Gauge(
    "kleave_planner_degraded",
    "1 while the planner cannot plan (metrics or profiles missing) and holds replicas.",
    labelnames=("namespace", "deployment"),
    registry=REGISTRY,
)


@dataclass(frozen=True)
class Degradation:
    reason: str
    message: str


@dataclass
class _Tracker:
    """What one deployment's planner remembers between intervals."""

    task: asyncio.Task[None] | None = None
    planner: Planner | None = None
    planner_key: Any = None
    last_change: dict[str, float] = field(default_factory=dict)
    last_load: Load | None = None
    report: PlannerReport | None = None
    degraded: Degradation | None = None
    failures: int = 0


class PlannerRunner:
    """Starts, runs and stops the per-deployment planner tasks."""

    def __init__(
        self,
        api: KubeApi,
        deployments: Store,
        pools: Store,
        recorder: EventRecorder,
        enqueue: Callable[[str, str], None],
        *,
        reader_factory: Callable[[str, str, str], PrometheusReader] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._api = api
        self._deployments = deployments
        self._pools = pools
        self._recorder = recorder
        self._enqueue = enqueue
        self._reader_factory = reader_factory or _prometheus_reader
        self._clock = clock
        self._trackers: dict[tuple[str, str], _Tracker] = {}

    # -- called by the reconciler -------------------------------------------------------------

    def sync(self, namespace: str, name: str, spec: InferenceDeploymentSpec | None) -> None:
        """Run a task while the deployment wants the planner; stop it otherwise."""
        key = (namespace, name)
        wanted = spec is not None and spec.autoscaling.mode != "off" and bool(planner_roles(spec))
        tracker = self._trackers.get(key)
        if wanted and (tracker is None or tracker.task is None or tracker.task.done()):
            tracker = tracker or _Tracker()
            tracker.task = asyncio.create_task(self._run(key), name=f"planner-{namespace}/{name}")
            self._trackers[key] = tracker
        elif not wanted and tracker is not None:
            if tracker.task is not None:
                tracker.task.cancel()
            del self._trackers[key]
            with contextlib.suppress(KeyError):
                PLANNER_DEGRADED.remove(namespace, name)

    def status(self, namespace: str, name: str) -> tuple[dict[str, Any] | None, Degradation | None]:
        """The planner status block and the degradation (None: healthy) for the reconciler."""
        tracker = self._trackers.get((namespace, name))
        if tracker is None:
            return None, None
        return (tracker.report.status() if tracker.report else None), tracker.degraded

    def active(self, namespace: str, name: str) -> bool:
        return (namespace, name) in self._trackers

    def stop(self) -> None:
        for tracker in self._trackers.values():
            if tracker.task is not None:
                tracker.task.cancel()
        self._trackers.clear()

    # -- the loop -----------------------------------------------------------------------------

    async def _run(self, key: tuple[str, str]) -> None:
        while True:
            delay = await self.run_once(key)
            if delay is None:
                return
            await asyncio.sleep(delay)

    async def run_once(self, key: tuple[str, str]) -> float | None:
        """One planning round; returns seconds until the next (None: stop)."""
        namespace, name = key
        tracker = self._trackers.get(key)
        owner = self._deployments.get(namespace, name)
        if tracker is None or owner is None or owner["metadata"].get("deletionTimestamp"):
            return None
        try:
            spec = InferenceDeploymentSpec.model_validate(owner.get("spec") or {})
        except ValidationError:
            return None  # the reconciler reports the invalid spec
        interval = float(spec.autoscaling.interval_seconds)
        before = tracker.degraded
        try:
            await self._plan(namespace, name, spec, tracker)
        except (MetricsUnavailable, ProfileError) as error:
            reason = error.reason if isinstance(error, MetricsUnavailable) else "NoCapacityProfile"
            message = error.message if isinstance(error, MetricsUnavailable) else str(error)
            tracker.degraded = Degradation(reason, f"{message}; replicas are held")
            tracker.failures += 1
            PLANNER_DEGRADED.labels(namespace, name).set(1)
            if before != tracker.degraded:
                logger.warning("planner %s/%s degraded: %s", namespace, name, message)
                await self._recorder.post(owner, "Warning", "PlannerDegraded", message)
                self._enqueue(namespace, name)
            return float(min(MAX_BACKOFF_S, max(5.0, interval / 4) * 2 ** (tracker.failures - 1)))
        if before is not None:
            await self._recorder.post(
                owner, "Normal", "PlannerRecovered", "the planner reads metrics and plans again"
            )
        tracker.degraded = None
        tracker.failures = 0
        PLANNER_DEGRADED.labels(namespace, name).set(0)
        self._enqueue(namespace, name)
        return interval

    async def _plan(
        self, namespace: str, name: str, spec: InferenceDeploymentSpec, tracker: _Tracker
    ) -> None:
        auto = spec.autoscaling
        assert auto.prometheus is not None  # the CRD requires it unless mode is off
        settings = settings_from_spec(spec, await self._profiles(namespace, spec))
        prometheus = auto.prometheus
        reader = self._reader_factory(
            prometheus.url,
            prometheus.selector or default_selector(namespace, name),
            prometheus.role_label,
        )
        roles = planner_roles(spec)
        now = self._clock()
        observed, history = await asyncio.to_thread(
            _read,
            reader,
            auto.mode,
            settings.interval_s,
            float(auto.history_seconds),
            # A burst window longer than the interval is cut to it (documented on the field).
            min(float(auto.burst_window_seconds), settings.interval_s),
        )
        load = observed_load(observed, tracker.last_load)
        tracker.last_load = load
        states = self._pool_states(namespace, name, spec, observed, tracker)
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        if auto.mode == "reactive":
            decisions = reactive_decisions(settings, load, states, now)
            report = PlannerReport("reactive", stamp, decisions, observed=load, provisioned=load)
        else:
            planner = self._planner_for(tracker, settings)
            assert history is not None
            rate, isl, osl, peak = history
            obs = Observation(
                now_s=now,
                rate=rate,
                isl=isl,
                osl=osl,
                ttft_s=observed.ttft_p90_s,
                tpot_s=observed.tpot_p90_s,
                pools=states,
                peak_rate=peak,
                latency_quantile=0.9,
            )
            result = await asyncio.to_thread(planner.plan, obs)
            report = report_from_plan(result, load, "forecast", stamp, roles)
        await self._apply(namespace, name, report, tracker, now)
        tracker.report = report
        _export(namespace, name, report)

    def _planner_for(self, tracker: _Tracker, settings: PlannerSettings) -> Planner:
        """One stateful Planner per deployment, rebuilt when its settings change."""
        if tracker.planner is None or tracker.planner_key != settings:
            tracker.planner = Planner(settings)
            tracker.planner_key = settings
        return tracker.planner

    async def _profiles(self, namespace: str, spec: InferenceDeploymentSpec) -> ProfileTable:
        name = spec.autoscaling.profiles_config_map
        if name is None:
            return ProfileTable()
        try:
            cm = await self._api.get(CONFIGMAP, namespace, name)
        except ApiError as error:
            if error.not_found:
                raise ProfileError(f"profiles ConfigMap {namespace}/{name} not found") from None
            raise
        text = ((cm or {}).get("data") or {}).get(PROFILES_KEY)
        if not text:
            raise ProfileError(f"ConfigMap {namespace}/{name} has no {PROFILES_KEY!r} key")
        return ProfileTable(parse_profiles(text, f"ConfigMap {namespace}/{name}"))

    def _pool_states(
        self,
        namespace: str,
        name: str,
        spec: InferenceDeploymentSpec,
        observed: ObservedLoad,
        tracker: _Tracker,
    ) -> dict[str, PoolState]:
        states: dict[str, PoolState] = {}
        for role, template in spec.pools.defined().items():
            pool = self._pools.get(namespace, pool_name(name, role))
            replicas = int(((pool or {}).get("spec") or {}).get("replicas", template.replicas))
            states[role] = PoolState(
                replicas=replicas,
                last_change_s=tracker.last_change.get(role),
                waiting=observed.waiting.get(role),
                kv_usage=observed.kv_usage.get(role),
            )
        return states

    async def _apply(
        self,
        namespace: str,
        name: str,
        report: PlannerReport,
        tracker: _Tracker,
        now: float,
    ) -> None:
        owner = self._deployments.get(namespace, name)
        for role, decision in report.decisions.items():
            PLANNER_DECISIONS.labels(namespace, name, role, decision.reason).inc()
            if not decision.changed:
                continue
            pool = pool_name(name, role)
            await self._api.merge_patch(
                INFERENCE_POOL,
                namespace,
                pool,
                {"spec": {"replicas": decision.replicas}},
                subresource="scale",
            )
            tracker.last_change[role] = now
            logger.info("planner %s/%s: %s", namespace, name, decision.message)
            if owner is not None:
                await self._recorder.post(owner, "Normal", "PlannerScaled", decision.message)


def _prometheus_reader(url: str, selector: str, role_label: str) -> PrometheusReader:
    return PrometheusReader(url, selector, role_label=role_label)


History = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""Rate, mean input length, mean output length and peak burst rate per interval."""


def _read(
    reader: PrometheusReader, mode: str, interval_s: float, history_s: float, burst_s: float
) -> tuple[ObservedLoad, History | None]:
    observed = reader.observe(interval_s)
    if mode != "forecast":
        return observed, None
    rate, isl, osl = (
        reader.history(quantity, duration_s=history_s, step_s=interval_s)
        for quantity in ("rate", "isl", "osl")
    )
    peak = reader.peak_history(duration_s=history_s, step_s=interval_s, burst_s=burst_s)
    return observed, (rate, isl, osl, peak)


def _export(namespace: str, name: str, report: PlannerReport) -> None:
    for role, decision in report.decisions.items():
        PLANNER_REPLICAS.labels(namespace, name, role).set(decision.replicas)
        PLANNER_REQUIRED.labels(namespace, name, role).set(decision.required)
    loads: Mapping[str, Load | None] = {
        "observed": report.observed,
        "forecast": report.forecast,
        "provisioned": report.provisioned,
    }
    for kind, load in loads.items():
        if load is None:
            continue
        for quantity, value in (
            ("rate", load.rate_rps),
            ("isl", load.mean_isl),
            ("osl", load.mean_osl),
        ):
            PLANNER_LOAD.labels(namespace, name, kind, quantity).set(value)


def merge_planner_status(
    status: dict[str, Any],
    *,
    active: bool,
    planner: dict[str, Any] | None,
    degraded: Degradation | None,
    generation: int | None,
    now: datetime,
) -> dict[str, Any]:
    """The reconciler's desired status plus the planner's block and PlannerDegraded condition;
    without a planner both are removed (None deletes in a merge patch)."""
    merged = dict(status)
    conditions = list(merged.get("conditions") or [])
    if not active:
        merged["planner"] = None
        merged["conditions"] = [c for c in conditions if c.get("type") != "PlannerDegraded"]
        return merged
    if planner is not None:
        merged["planner"] = planner
    if degraded is not None:
        merged["conditions"] = set_condition(
            conditions, type="PlannerDegraded", status="True", reason=degraded.reason,
            message=degraded.message[:1000], generation=generation, now=now,
        )  # fmt: skip
    elif planner is not None:
        merged["conditions"] = set_condition(
            conditions, type="PlannerDegraded", status="False", reason="Planning",
            message=f"the planner decides every interval ({planner.get('mode')})",
            generation=generation, now=now,
        )  # fmt: skip
    return merged
