"""Sizes SandboxWarmPools with ``spec.autoscaling`` from their claim rate (the I/O side).

The sandbox controllers feed it every AgentSandbox they see (a claim on the pool it names, dated
by its creationTimestamp, so a claim is counted once however many events it has) and every pool
pod that turns Ready (its start-up time). Once per interval, a reconcile of the pool's
autoscale key closes the claim windows, forecasts (in a thread: a model re-selection is seconds
of CPU, and the pool's own reconciles, which refill it, must not wait), sizes the pool with
:mod:`warm_pool_sizing`, writes ``replicas`` through ``/scale`` and the decision plus the history
to ``status.autoscaling``. That is the only status key it writes, so it and the pool reconciler
never overwrite each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Gauge
from pydantic import ValidationError

from kleave.api.sandbox_warm_pool import (
    MAX_HISTORY_WINDOWS,
    MAX_REPLICAS,
    SandboxWarmPoolSpec,
    WarmPoolAutoscaling,
)
from kleave.operator.events import EventRecorder
from kleave.operator.kube import SANDBOX_WARM_POOL, ApiError, KubeApi
from kleave.operator.metrics import REGISTRY
from kleave.operator.naming import LABEL_WARM_POOL
from kleave.operator.store import Store
from kleave.operator.warm_pool_sizing import (
    ClaimHistory,
    PoolBounds,
    Recommendations,
    Sizing,
    close_windows,
    epoch_s,
    format_epoch,
    ready_after_s,
    size_pool,
    startup_s,
)
from kleave.planner.window_forecast import WindowForecaster, WindowPrediction

logger = logging.getLogger("kleave.operator.sandbox.autoscaler")

STARTUPS_KEPT = 64
"""Start-up times remembered per pool (the newest), for the measured quantile."""
WATCH_SETTLE_S = 2.0
"""A window is closed this long after it ends (at most a fifth of the interval): an
AgentSandbox's watch event arrives after its creationTimestamp, and a claim that reaches a closed
window is not counted."""


def settle_s(interval_s: float) -> float:
    return min(WATCH_SETTLE_S, 0.2 * interval_s)


WARM_POOL_REPLICAS = Gauge(
    "kleave_warm_pool_autoscaler_replicas",
    "Replicas the warm-pool autoscaler chose.",
    labelnames=("namespace", "pool"),
    registry=REGISTRY,
)
WARM_POOL_CLAIM_RATE = Gauge(
    "kleave_warm_pool_claims_per_minute",
    "Claim rate of a warm pool: kind observed (last window), forecast (mean), provisioned.",
    labelnames=("namespace", "pool", "kind"),
    registry=REGISTRY,
)

Key = tuple[str, str]


@dataclass
class _PoolState:
    """What the autoscaler keeps per pool between decisions (all of it rebuildable)."""

    settings: WarmPoolAutoscaling
    history: ClaimHistory
    forecaster: WindowForecaster
    recommendations: Recommendations = field(default_factory=Recommendations)
    decided: bool = False


def _forecaster(spec: WarmPoolAutoscaling) -> WindowForecaster:
    return WindowForecaster(
        interval_s=spec.interval_seconds,
        level=spec.forecast_level,
        history_s=spec.history_s,
    )


class WarmPoolAutoscaler:
    """Claim history, start-up times and decisions for the autoscaled warm pools."""

    def __init__(
        self,
        api: KubeApi,
        pools: Store,
        recorder: EventRecorder,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._api = api
        self._pools = pools
        self._recorder = recorder
        self._clock = clock
        self.watching_since_s = clock()
        self._claims: dict[Key, dict[str, float]] = {}  # pool -> sandbox uid -> created
        self._startups: dict[Key, deque[float]] = {}
        self._counted_pods: dict[Key, set[str]] = {}
        self._states: dict[Key, _PoolState] = {}
        self._since: dict[Key, float] = {}  # pool -> when this process began counting its claims

    # -- what the controllers feed in -------------------------------------------------------

    def _autoscaled(self, namespace: str, pool: str) -> WarmPoolAutoscaling | None:
        """The pool's autoscaling settings, if on; the first time, its claims start counting."""
        obj = self._pools.get(namespace, pool)
        spec = ((obj or {}).get("spec") or {}).get("autoscaling") or {}
        if spec.get("mode") not in ("reactive", "forecast"):
            return None
        try:
            settings = WarmPoolAutoscaling.model_validate(spec)
        except ValidationError:
            return None
        self._start_counting((namespace, pool))
        return settings

    def _start_counting(self, key: Key) -> None:
        self._since.setdefault(key, max(self.watching_since_s, self._clock()))

    def _counting_since(self, key: Key) -> float:
        """Windows before this were not watched for this pool (before this process started, or
        before the pool existed or had autoscaling on here): missing, never zero."""
        return self._since.get(key, self.watching_since_s)

    def record_claim(self, sandbox: Mapping[str, Any]) -> None:
        """Count an AgentSandbox as a claim on the pool it names (once, by uid)."""
        meta = sandbox.get("metadata") or {}
        pool = ((sandbox.get("spec") or {}).get("warmPoolRef") or {}).get("name")
        created = epoch_s(meta.get("creationTimestamp"))
        if not pool or created is None:
            return
        key = (str(meta.get("namespace") or ""), str(pool))
        if self._autoscaled(*key) is None or created < self._counting_since(key) - 1.0:
            return  # before the pool's claims were counted: its window is recorded as missing
        state = self._states.get(key)
        if state is not None and state.history.end_s is not None and created < state.history.end_s:
            return  # its window is closed and counted
        self._claims.setdefault(key, {})[str(meta.get("uid"))] = created

    def observe_pod(self, pod: Mapping[str, Any]) -> None:
        """Remember how long a pool pod took from creation to Ready (once per pod)."""
        meta = pod.get("metadata") or {}
        pool = (meta.get("labels") or {}).get(LABEL_WARM_POOL)
        if not pool:
            return
        key = (str(meta.get("namespace") or ""), str(pool))
        uid = str(meta.get("uid"))
        counted = self._counted_pods.setdefault(key, set())
        if uid in counted or self._autoscaled(*key) is None:
            return
        seconds = ready_after_s(pod)
        if seconds is None:
            return
        counted.add(uid)
        if len(counted) > 4 * STARTUPS_KEPT:  # bounded; an old uid counted twice is harmless
            counted.clear()
            counted.add(uid)
        self._startups.setdefault(key, deque(maxlen=STARTUPS_KEPT)).append(seconds)

    def forget(self, namespace: str, pool: str) -> None:
        key = (namespace, pool)
        self._claims.pop(key, None)
        self._startups.pop(key, None)
        self._counted_pods.pop(key, None)
        self._states.pop(key, None)
        self._since.pop(key, None)
        for kind in ("observed", "forecast", "provisioned"):
            _remove(WARM_POOL_CLAIM_RATE, namespace, pool, kind)
        _remove(WARM_POOL_REPLICAS, namespace, pool)

    # -- the decision -----------------------------------------------------------------------

    async def reconcile(self, namespace: str, name: str) -> float | None:
        """Decide for one pool if a window has ended; returns when to come back."""
        pool = self._pools.get(namespace, name)
        if pool is None or pool["metadata"].get("deletionTimestamp"):
            self.forget(namespace, name)
            return None
        try:
            spec = SandboxWarmPoolSpec.model_validate(pool.get("spec") or {})
        except ValidationError:
            self.forget(namespace, name)  # the pool reconciler reports it
            return None
        scaling = spec.autoscaling
        key = (namespace, name)
        if scaling is None or scaling.mode == "off":
            self.forget(namespace, name)
            if (pool.get("status") or {}).get("autoscaling") is not None:
                await self._write_status(pool, None)
            return None
        self._start_counting(key)
        state = self._state(key, pool, scaling)
        step = scaling.interval_seconds
        settle = settle_s(step)
        now = self._clock()
        closing = now - settle  # windows that ended before this have all their events
        boundary = math.floor(closing / step) * step
        if state.decided and state.history.end_s is not None and boundary <= state.history.end_s:
            # At most one interval: a clock behind the last writer's catches up meanwhile.
            return min(state.history.end_s + step + settle - now, step + settle)
        startup = startup_s(scaling, list(self._startups.get(key, ())))
        pending = self._claims.get(key, {})
        state.history = close_windows(
            state.history,
            pending.values(),
            now_s=closing,
            watching_since_s=self._counting_since(key),
            span_s=startup,
            max_windows=min(MAX_HISTORY_WINDOWS, math.ceil(scaling.history_s / step)),
            pool_created_s=epoch_s(pool["metadata"].get("creationTimestamp")),
        )
        end = state.history.end_s if state.history.end_s is not None else boundary
        # Claims of closed windows are counted; those within one start-up of the newest end
        # stay for the next window's peak (a burst across the boundary).
        self._claims[key] = {uid: t for uid, t in pending.items() if t > end - startup}
        prediction: WindowPrediction | None = None
        if scaling.mode == "forecast":
            prediction = await asyncio.to_thread(
                state.forecaster.predict, state.history.rates_per_s(), startup
            )
        current = int(spec.replicas)
        bounds = PoolBounds(
            current=current,
            low=spec.min_replicas or 0,
            high=MAX_REPLICAS if spec.max_replicas is None else spec.max_replicas,
        )
        sizing = size_pool(
            scaling,
            state.history,
            prediction,
            startup_seconds=startup,
            bounds=bounds,
            recommendations=state.recommendations,
            now_s=now,
        )
        state.recommendations.add(now, sizing.recommended, scaling.scale_down_delay_seconds)
        state.decided = True
        if sizing.replicas != current:
            await self._scale(pool, sizing, current)
        await self._write_status(pool, self._status(scaling, state, sizing, now))
        self._export(namespace, name, sizing)
        return end + step + settle - now

    def _state(self, key: Key, pool: Mapping[str, Any], scaling: WarmPoolAutoscaling) -> _PoolState:
        state = self._states.get(key)
        if state is not None and state.settings == scaling:
            return state
        previous = (pool.get("status") or {}).get("autoscaling") or {}
        history = ClaimHistory.from_status(previous.get("history"), scaling.interval_seconds)
        if state is not None and state.history.interval_s == scaling.interval_seconds:
            history = state.history  # the settings changed, not the windows
        elif state is not None:  # new windows: the claims of the old ones are not kept here
            self._since[key] = self._clock()
        fresh = _PoolState(scaling, history, _forecaster(scaling))
        if state is not None:
            fresh.recommendations = state.recommendations
        else:  # a restart: hold today's size for one scale-down delay, as after a change
            replicas = int((pool.get("spec") or {}).get("replicas") or 0)
            fresh.recommendations.add(self._clock(), replicas, scaling.scale_down_delay_seconds)
        self._states[key] = fresh
        return fresh

    async def _scale(self, pool: Mapping[str, Any], sizing: Sizing, current: int) -> None:
        meta = pool["metadata"]
        try:
            await self._api.merge_patch(
                SANDBOX_WARM_POOL,
                meta["namespace"],
                meta["name"],
                {"spec": {"replicas": sizing.replicas}},
                subresource="scale",
            )
        except ApiError as error:
            if error.not_found:
                return
            raise
        verb = "up" if sizing.replicas > current else "down"
        await self._recorder.post(
            pool,
            "Normal",
            "WarmPoolScaled",
            f"scaled {verb} from {current} to {sizing.replicas} ({sizing.reason}): "
            f"{sizing.message}",
        )

    def _status(
        self, scaling: WarmPoolAutoscaling, state: _PoolState, sizing: Sizing, now: float
    ) -> dict[str, Any]:
        def per_min(rate: float | None) -> float | None:
            return None if rate is None else round(rate * 60.0, 3)

        return {
            "mode": scaling.mode,
            "lastDecisionTime": format_epoch(now),
            "replicas": sizing.replicas,
            "recommended": sizing.recommended,
            "reason": sizing.reason,
            "message": sizing.message,
            "forecaster": sizing.model,
            "startupSeconds": round(sizing.startup_s, 3),
            "observedClaimsPerMinute": per_min(sizing.observed_per_s),
            "forecastClaimsPerMinute": per_min(sizing.forecast_per_s),
            "provisionedClaimsPerMinute": per_min(sizing.provisioned_per_s),
            "burstClaims": sizing.burst,
            "history": state.history.to_status(),
        }

    async def _write_status(self, pool: Mapping[str, Any], status: dict[str, Any] | None) -> None:
        meta = pool["metadata"]
        try:
            updated = await self._api.patch_status(
                SANDBOX_WARM_POOL, meta["namespace"], meta["name"], {"autoscaling": status}
            )
        except ApiError as error:
            if error.not_found:
                return
            raise
        self._pools.upsert(updated)

    @staticmethod
    def _export(namespace: str, name: str, sizing: Sizing) -> None:
        WARM_POOL_REPLICAS.labels(namespace, name).set(sizing.replicas)
        for kind, rate in (
            ("observed", sizing.observed_per_s),
            ("forecast", sizing.forecast_per_s),
            ("provisioned", sizing.provisioned_per_s),
        ):
            if rate is None:
                _remove(WARM_POOL_CLAIM_RATE, namespace, name, kind)
            else:
                WARM_POOL_CLAIM_RATE.labels(namespace, name, kind).set(rate * 60.0)


def _remove(gauge: Gauge, *labels: str) -> None:
    with contextlib.suppress(KeyError):
        gauge.remove(*labels)
