"""The planner's part of an InferenceDeployment: SLOs, autoscaling settings, planner status.

Kept apart from the deployment's serving spec because the planner reads only this and the
pools' bounds; the API server validates it so a typo fails at `kubectl apply`, not at 3 a.m.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field

from kleave.api.common import SpecModel, StatusModel

AutoscalingMode = Literal["off", "reactive", "forecast"]
DEFAULT_ROLE_LABEL = "kleave_dev_role"


class SloSpec(SpecModel):
    """Latency targets the planner provisions for."""

    ttft_ms: int = Field(
        default=2000, ge=1, le=600_000, description="Time to first token target, milliseconds."
    )
    tpot_ms: int = Field(
        default=100, ge=1, le=60_000, description="Time per output token target, milliseconds."
    )
    attainment_percent: float = Field(
        default=99.0,
        ge=50.0,
        le=99.99,
        description="Share of requests that must meet both targets; the queue model's quantile.",
    )


class PrometheusSource(SpecModel):
    """Where the planner reads load and latency (vLLM metric names)."""

    url: str = Field(
        description="Prometheus base URL, e.g. http://prometheus.monitoring:9090.",
        min_length=1,
        max_length=2048,
        pattern=r"^https?://\S+$",
    )
    selector: str | None = Field(
        default=None,
        max_length=1024,
        description=(
            "PromQL label matchers (without braces) selecting this deployment's worker series; "
            'default: namespace="<namespace>",kleave_dev_inference_deployment="<name>".'
        ),
    )
    role_label: str = Field(
        default=DEFAULT_ROLE_LABEL,
        min_length=1,
        max_length=128,
        pattern=r"^[a-zA-Z_][a-zA-Z0-9_]*$",
        description="The series label holding the pool role (prefill, decode, ...).",
    )


def _autoscaling_rules() -> list[Any]:
    return [
        {
            "rule": "!has(self.mode) || self.mode == 'off' || has(self.prometheus)",
            "message": "spec.autoscaling.prometheus is required when mode is reactive or forecast",
            "fieldPath": ".prometheus",
        },
    ]


class AutoscalingSpec(SpecModel):
    """How the DOPD planner drives pools whose `scaling` is Planner."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": _autoscaling_rules()})

    mode: AutoscalingMode = Field(
        default="off",
        description=(
            "off: the planner leaves pools alone. reactive: size pools for the load just "
            "observed. forecast: size them for the forecast upper quantile of the load one "
            "start-up time ahead (DOPD)."
        ),
    )
    interval_seconds: int = Field(
        default=60, ge=5, le=3600, description="Seconds between decisions (the history step)."
    )
    burst_window_seconds: int = Field(
        default=30,
        ge=2,
        le=3600,
        description=(
            "Forecast mode sizes pools for the highest request rate over windows this long "
            "seen in the last half hour, when above the forecast: bursts shorter than a pod's "
            "start-up are met by capacity already there. Must span two Prometheus scrapes; "
            "a window longer than intervalSeconds is cut to it."
        ),
    )
    burst_memory_seconds: int = Field(
        default=1800,
        ge=0,
        le=86400,
        description=(
            "How long a burst is remembered: pools carry the highest burst rate seen this "
            "long ago or later (0: size for the forecast alone). Longer holds capacity for "
            "bursts that recur; shorter frees it sooner after a one-off."
        ),
    )
    startup_seconds: int = Field(
        default=120,
        ge=0,
        le=3600,
        description="How long a new replica takes to serve: the forecast looks this far ahead.",
    )
    history_seconds: int = Field(
        default=7 * 86400,
        ge=600,
        le=30 * 86400,
        description="How much load history the forecaster reads from Prometheus.",
    )
    forecast_level: float = Field(
        default=0.8,
        ge=0.5,
        le=0.99,
        description="Central prediction-interval level; pools are sized for its upper bound.",
    )
    prometheus: PrometheusSource | None = Field(
        default=None, description="The metrics source (required unless mode is off)."
    )
    gpu_budget: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description="Most GPUs the planner may use across Planner pools; pools shrink together.",
    )
    cooldown_seconds: int = Field(
        default=300, ge=0, le=86400, description="No scale-down this soon after a pool changed."
    )
    scale_down_margin_percent: int = Field(
        default=10,
        ge=0,
        le=100,
        description="Hysteresis: scale down only to the need plus this margin.",
    )
    max_step_percent: int = Field(
        default=100,
        ge=1,
        le=1000,
        description="Most replicas added per decision, as a share of the current (at least 2).",
    )
    queue_per_replica: float = Field(
        default=5.0,
        ge=0.1,
        le=10_000,
        description="Waiting requests per replica that trigger an immediate scale-up.",
    )
    kv_usage_percent: int = Field(
        default=90,
        ge=1,
        le=100,
        description="KV-cache usage that triggers an immediate scale-up of the decode side.",
    )
    profiles_config_map: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        description=(
            "ConfigMap (same namespace) whose `profiles.yaml` key holds measured capacity "
            "profiles; models and GPUs not in it use the built-in roofline profiles."
        ),
    )


class LoadStatus(StatusModel):
    """A load estimate: request rate and mean lengths."""

    rate_rps: float = Field(default=0.0, description="Requests per second.")
    input_tokens: float = Field(default=0.0, description="Mean input (prompt) tokens.")
    output_tokens: float = Field(default=0.0, description="Mean output tokens.")


class PlannerPoolStatus(StatusModel):
    """The planner's last decision for one pool."""

    replicas: int = Field(default=0, description="Replicas the planner chose.")
    required: float = Field(default=0.0, description="Replicas the capacity model needs.")
    reason: str = Field(default="", description="Why (Forecast, EmergencyQueue, Cooldown, ...).")
    message: str = Field(default="", description="The decision in words.")


class PlannerStatus(StatusModel):
    """What the planner saw and decided last, so `kubectl get -o yaml` explains the replicas."""

    mode: str = Field(default="off", description="The autoscaling mode in effect.")
    last_decision_time: str | None = Field(default=None, description="When it last decided.")
    forecaster: str | None = Field(default=None, description="The forecaster chosen by backtest.")
    observed: LoadStatus | None = Field(default=None, description="Load in the last interval.")
    forecast: LoadStatus | None = Field(default=None, description="Mean forecast load.")
    provisioned_for: LoadStatus | None = Field(
        default=None, description="The load pools are sized for (forecast upper bound)."
    )
    pools: dict[str, PlannerPoolStatus] = Field(
        default_factory=dict, description="The decision per role."
    )
