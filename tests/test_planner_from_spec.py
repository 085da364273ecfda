"""From an InferenceDeployment spec to planner settings, and from decisions to status."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from kleave.api.inference_deployment import InferenceDeploymentSpec
from kleave.operator.planner_runner import Degradation, merge_planner_status
from kleave.planner.capacity import ProfileError, ProfileTable
from kleave.planner.from_spec import (
    DEFAULT_MAX_REPLICAS,
    PlannerReport,
    default_selector,
    planner_roles,
    settings_from_spec,
)
from kleave.planner.solver import Load, PoolDecision

NOW = datetime(2026, 11, 23, tzinfo=UTC)


def spec(**autoscaling: object) -> InferenceDeploymentSpec:
    return InferenceDeploymentSpec.model_validate(
        {
            "model": "meta-llama/Llama-3.1-8B-Instruct",
            "topology": "PD",
            "slo": {"ttftMs": 1500, "tpotMs": 50, "attainmentPercent": 95},
            "autoscaling": {
                "mode": "forecast",
                "prometheus": {"url": "http://prom:9090"},
                "cooldownSeconds": 60,
                "gpuBudget": 40,
                **autoscaling,
            },
            "pools": {
                "prefill": {"gpuType": "H100-SXM", "scaling": "Planner", "maxReplicas": 10},
                "decode": {"gpuType": "H20", "gpusPerReplica": 2, "replicas": 3},
            },
        }
    )


def test_settings_follow_the_spec() -> None:
    s = settings_from_spec(spec(), ProfileTable())
    assert (s.slo.ttft_s, s.slo.tpot_s, s.slo.attainment) == (1.5, 0.05, 0.95)
    assert s.interval_s == 60 and s.lead_time_s == 120 and s.level == 0.8
    assert s.policy.cooldown_down_s == 60 and s.policy.gpu_budget == 40
    # The Planner pool keeps at least one replica; the Static pool is pinned to its replicas.
    assert (s.limits["prefill"].min_replicas, s.limits["prefill"].max_replicas) == (1, 10)
    assert (s.limits["decode"].min_replicas, s.limits["decode"].max_replicas) == (3, 3)
    assert s.profiles["decode"].gpu_type == "H20" and s.profiles["decode"].gpus == 2
    assert planner_roles(spec()) == ["prefill"]


def test_planner_pool_without_max_is_capped() -> None:
    s = spec()
    assert s.pools.prefill is not None
    s.pools.prefill.max_replicas = None
    assert settings_from_spec(s, ProfileTable()).limits["prefill"].max_replicas == (
        DEFAULT_MAX_REPLICAS
    )


def test_unknown_gpu_is_a_profile_error() -> None:
    s = spec()
    assert s.pools.prefill is not None
    s.pools.prefill.gpu_type = "MI300X"
    with pytest.raises(ProfileError, match="MI300X"):
        settings_from_spec(s, ProfileTable())


def test_default_selector() -> None:
    assert default_selector("prod", "llama") == (
        'namespace="prod",kleave_dev_inference_deployment="llama"'
    )


def _report() -> PlannerReport:
    decision = PoolDecision("prefill", 4, 2, 3.25, "Forecast", "prefill: 2 -> 4 replicas")
    return PlannerReport(
        "forecast",
        "2026-11-23T00:00:00Z",
        {"prefill": decision},
        observed=Load(10, 500, 100),
        forecast=Load(12, 500, 100),
        provisioned=Load(15.123456, 500, 100),
        forecaster="ets-damped",
    )


def test_report_status_explains_the_decision() -> None:
    status = _report().status()
    assert status["pools"]["prefill"] == {
        "replicas": 4,
        "required": 3.25,
        "reason": "Forecast",
        "message": "prefill: 2 -> 4 replicas",
    }
    assert status["provisionedFor"]["rateRps"] == 15.123
    assert status["forecaster"] == "ets-damped"


def test_merge_adds_condition_and_block_and_removes_them_when_off() -> None:
    base = {"conditions": [{"type": "Ready", "status": "True"}]}
    merged = merge_planner_status(
        base, active=True, planner=_report().status(), degraded=None, generation=3, now=NOW
    )
    planner = {c["type"]: c for c in merged["conditions"]}["PlannerDegraded"]
    assert (planner["status"], planner["reason"]) == ("False", "Planning")
    assert merged["planner"]["mode"] == "forecast"

    degraded = merge_planner_status(
        merged,
        active=True,
        planner=None,
        degraded=Degradation("PrometheusUnreachable", "cannot reach http://prom:9090"),
        generation=3,
        now=NOW,
    )
    planner = {c["type"]: c for c in degraded["conditions"]}["PlannerDegraded"]
    assert (planner["status"], planner["reason"]) == ("True", "PrometheusUnreachable")
    assert degraded["planner"]["mode"] == "forecast"  # the last decision stays visible

    off = merge_planner_status(
        degraded, active=False, planner=None, degraded=None, generation=4, now=NOW
    )
    assert off["planner"] is None
    assert [c["type"] for c in off["conditions"]] == ["Ready"]
