"""Between an InferenceDeployment and the planner: settings from the spec, status from a plan.

Pure, so the operator's planner task stays a thin loop of read metrics -> plan -> write.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kleave.api.inference_deployment import InferenceDeploymentSpec
from kleave.planner.capacity import CapacityProfile, ProfileTable
from kleave.planner.loop import PlannerSettings, PlanResult
from kleave.planner.metrics import ObservedLoad
from kleave.planner.solver import (
    Load,
    PoolDecision,
    PoolLimits,
    PoolState,
    ScalingPolicy,
    Slo,
    decide,
    required_replicas,
)

DEFAULT_MAX_REPLICAS = 64
"""Ceiling for a Planner pool without maxReplicas: a runaway metric must not buy a cluster."""


def default_selector(namespace: str, name: str) -> str:
    """Series of this deployment's workers, with the pod labels Prometheus' Kubernetes SD maps."""
    return f'namespace="{namespace}",kleave_dev_inference_deployment="{name}"'


def planner_roles(spec: InferenceDeploymentSpec) -> list[str]:
    """Roles whose replicas the planner owns."""
    return [role for role, pool in spec.pools.defined().items() if pool.scaling == "Planner"]


def settings_from_spec(spec: InferenceDeploymentSpec, table: ProfileTable) -> PlannerSettings:
    """PlannerSettings for every pool of `spec` (raises ProfileError for unknown model/GPU)."""
    auto = spec.autoscaling
    profiles: dict[str, CapacityProfile] = {}
    limits: dict[str, PoolLimits] = {}
    for role, pool in spec.pools.defined().items():
        profiles[role] = table.lookup(spec.model, pool.gpu_type, pool.gpus_per_replica, role)
        fixed = pool.scaling != "Planner"
        limits[role] = PoolLimits(
            # A pool at zero would take the router out of service: the planner keeps one.
            min_replicas=pool.replicas if fixed else max(pool.min_replicas, 1),
            max_replicas=pool.replicas if fixed else (pool.max_replicas or DEFAULT_MAX_REPLICAS),
            gpus_per_replica=pool.gpus_per_replica,
        )
    return PlannerSettings(
        topology=spec.topology,
        profiles=profiles,
        limits=limits,
        slo=Slo(
            ttft_s=spec.slo.ttft_ms / 1000.0,
            tpot_s=spec.slo.tpot_ms / 1000.0,
            attainment=spec.slo.attainment_percent / 100.0,
        ),
        interval_s=float(auto.interval_seconds),
        lead_time_s=float(auto.startup_seconds),
        level=auto.forecast_level,
        burst_memory_s=float(auto.burst_memory_seconds),
        policy=ScalingPolicy(
            scale_down_margin=auto.scale_down_margin_percent / 100.0,
            cooldown_down_s=float(auto.cooldown_seconds),
            max_step_up=auto.max_step_percent / 100.0,
            gpu_budget=auto.gpu_budget,
            queue_per_replica=auto.queue_per_replica,
            kv_usage_threshold=auto.kv_usage_percent / 100.0,
        ),
    )


def observed_load(observed: ObservedLoad, fallback: Load | None) -> Load:
    """The load of the last interval; lengths fall back to the previous estimate at zero rate."""
    isl = observed.mean_isl if observed.mean_isl else (fallback.mean_isl if fallback else 1.0)
    osl = observed.mean_osl if observed.mean_osl else (fallback.mean_osl if fallback else 1.0)
    return Load(max(observed.rate_rps, 0.0), isl, osl)


def reactive_decisions(
    settings: PlannerSettings,
    load: Load,
    pools: Mapping[str, PoolState],
    now_s: float,
) -> dict[str, PoolDecision]:
    """`mode: reactive`: size for the load just observed (no forecast, no lead time)."""
    need = required_replicas(load, settings.profiles, settings.slo, settings.topology)
    return decide(need, pools, settings.limits, settings.policy, now_s)


def _load_status(load: Load | None) -> dict[str, float] | None:
    if load is None:
        return None
    return {
        "rateRps": _round(load.rate_rps),
        "inputTokens": _round(load.mean_isl),
        "outputTokens": _round(load.mean_osl),
    }


def _round(value: float) -> float:
    return round(value, 3) if math.isfinite(value) else 0.0


@dataclass(frozen=True)
class PlannerReport:
    """What one planner run leaves for the InferenceDeployment's status."""

    mode: str
    time: str
    decisions: Mapping[str, PoolDecision]
    observed: Load | None = None
    forecast: Load | None = None
    provisioned: Load | None = None
    forecaster: str | None = None

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            "mode": self.mode,
            "lastDecisionTime": self.time,
            "pools": {
                role: {
                    "replicas": d.replicas,
                    "required": _round(d.required) if math.isfinite(d.required) else -1.0,
                    "reason": d.reason,
                    "message": d.message[:500],
                }
                for role, d in self.decisions.items()
            },
        }
        for key, load in (
            ("observed", self.observed),
            ("forecast", self.forecast),
            ("provisionedFor", self.provisioned),
        ):
            value = _load_status(load)
            if value is not None:
                status[key] = value
        if self.forecaster:
            status["forecaster"] = self.forecaster
        return status


def report_from_plan(
    result: PlanResult, observed: Load, mode: str, time: str, roles: list[str]
) -> PlannerReport:
    return PlannerReport(
        mode=mode,
        time=time,
        decisions={r: d for r, d in result.decisions.items() if r in roles},
        observed=observed,
        forecast=result.forecast,
        provisioned=result.provisioned,
        forecaster=result.model,
    )
