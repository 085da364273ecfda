"""SandboxWarmPool (``sbxwp``): pre-started sandboxes of one template, ready to be claimed.

Starting a microVM and the runtime inside it takes seconds; adopting one that is already
running takes milliseconds. A warm pool keeps ``replicas`` unclaimed, ready sandbox pods of its
template; an AgentSandbox that names the pool adopts one (the pod leaves the pool, which then
starts a replacement). The ``/scale`` subresource lets ``kubectl scale`` or an HPA own
``replicas``; or ``autoscaling`` lets kleave size the pool from the claim rate (observed, or
forecast as the DOPD planner forecasts request rates) within ``min``/``max``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from kleave.api.common import (
    Condition,
    Int64,
    KindInfo,
    ScaleSubresource,
    SpecModel,
    StatusModel,
    conditions_field,
)
from kleave.api.crd import crd_for
from kleave.api.sandbox_template import ObjectRef, name_length_rule

MAX_REPLICAS = 10000
#: The claim history kept in status has at most this many windows (a week of minutes).
MAX_HISTORY_WINDOWS = 10080
#: Two daily seasons of claim history, unless that is more windows than status holds.
DEFAULT_HISTORY_S = 2 * 86400
DEFAULT_STARTUP_S = 30

WarmPoolAutoscalingMode = Literal["off", "reactive", "forecast"]


def _spec_rules() -> list[Any]:
    return [
        {
            "rule": "!has(self.min) || !has(self.max) || self.min <= self.max",
            "message": "spec.min must not exceed spec.max",
            "fieldPath": ".min",
        },
        {
            "rule": (
                "!has(self.min) || self.replicas >= self.min || (self.replicas == 0 "
                "&& has(self.autoscaling) && has(self.autoscaling.mode) "
                "&& self.autoscaling.mode != 'off')"
            ),
            "message": (
                "spec.replicas must be at least spec.min (or left out, when "
                "spec.autoscaling sets it)"
            ),
            "fieldPath": ".replicas",
        },
        {
            "rule": "!has(self.max) || self.replicas <= self.max",
            "message": "spec.replicas must be at most spec.max",
            "fieldPath": ".replicas",
        },
        {
            "rule": (
                "!has(self.autoscaling) || !has(self.autoscaling.mode) "
                "|| self.autoscaling.mode == 'off' || has(self.max)"
            ),
            "message": "spec.max is required when spec.autoscaling.mode is reactive or forecast",
            "fieldPath": ".max",
        },
    ]


def _autoscaling_rules() -> list[Any]:
    return [
        {
            "rule": (
                "!has(self.historySeconds) || self.historySeconds <= "
                f"(has(self.intervalSeconds) ? self.intervalSeconds : 60) * {MAX_HISTORY_WINDOWS}"
            ),
            "message": (
                "spec.autoscaling.historySeconds must be at most "
                f"{MAX_HISTORY_WINDOWS} x intervalSeconds (the windows kept in status)"
            ),
            "fieldPath": ".historySeconds",
        },
    ]


WARM_POOL_KIND = KindInfo(
    kind="SandboxWarmPool",
    plural="sandboxwarmpools",
    singular="sandboxwarmpool",
    short_names=["sbxwp"],
    categories=["kleave", "kleave-sandbox"],
    description=(
        "SandboxWarmPool keeps pre-started sandboxes of a SandboxTemplate ready, so an "
        "AgentSandbox that names the pool adopts one in milliseconds instead of starting a "
        "microVM. Scale it with kubectl scale or an HPA."
    ),
    printer_columns=[
        {
            "name": "TEMPLATE",
            "type": "string",
            "jsonPath": ".spec.templateRef.name",
            "description": "The SandboxTemplate the pool's sandboxes are built from.",
        },
        {
            "name": "DESIRED",
            "type": "integer",
            "jsonPath": ".spec.replicas",
            "description": "Unclaimed sandboxes the pool keeps.",
        },
        {
            "name": "READY",
            "type": "integer",
            "jsonPath": ".status.readyReplicas",
            "description": "Unclaimed sandboxes ready to be adopted now.",
        },
        {
            "name": "CLAIMED",
            "type": "integer",
            "jsonPath": ".status.claimed",
            "description": "Sandboxes adopted from the pool since it was created.",
            "priority": 1,
        },
        {
            "name": "HASH",
            "type": "string",
            "jsonPath": ".status.templateHash",
            "description": "The template hash the pool's ready sandboxes run.",
            "priority": 1,
        },
        {
            "name": "AUTOSCALE",
            "type": "string",
            "jsonPath": ".status.autoscaling.reason",
            "description": "Why the autoscaler chose DESIRED (Forecast, Reactive, Burst, ...).",
            "priority": 1,
        },
        {"name": "AGE", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ],
    scale=ScaleSubresource(
        spec_replicas_path=".spec.replicas",
        status_replicas_path=".status.replicas",
        label_selector_path=".status.selector",
    ),
    validations=[name_length_rule("pool")],
)


class WarmPoolAutoscaling(SpecModel):
    """How kleave sizes the pool from the claim rate, so claims find a ready sandbox."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": _autoscaling_rules()})

    mode: WarmPoolAutoscalingMode = Field(
        default="off",
        description=(
            "off: replicas are the manifest's (or kubectl scale's, or an HPA's). reactive: "
            "size for the claim rate of the last interval. forecast: size for the upper bound "
            "of the claim-rate forecast until a sandbox started now is ready (the DOPD "
            "planner's forecasters, chosen by backtest, daily seasonality). Both also keep "
            "enough sandboxes for the largest burst remembered. With reactive or forecast, "
            "kleave owns spec.replicas (within min and max; max is required): leave replicas "
            "out of Git, or have Argo CD / Flux ignore it."
        ),
    )
    interval_seconds: int = Field(
        default=60,
        ge=5,
        le=3600,
        description="Seconds between decisions, and the window of the claim history.",
    )
    warm_percent: float = Field(
        default=99.0,
        ge=50.0,
        le=99.99,
        description=(
            "Share of claims that should find a ready sandbox (not cold-start) when claims "
            "arrive at random at the provisioned rate: the pool holds the claims expected "
            "while a replacement starts, at this quantile (Poisson). Default 99."
        ),
    )
    startup_seconds: int | None = Field(
        default=None,
        ge=1,
        le=3600,
        description=(
            "How long a new pool sandbox takes to become ready. Default: measured (90th "
            f"percentile of the pool's pods from creation to Ready; {DEFAULT_STARTUP_S} until "
            "one has been seen)."
        ),
    )
    burst_memory_seconds: int = Field(
        default=1800,
        ge=0,
        le=7 * 86400,
        description=(
            "Keep enough sandboxes for the most claims seen within one start-up time over "
            "this long (a burst of claims arrives faster than replacements start). 0: size "
            "for the rate alone. Default 1800."
        ),
    )
    forecast_level: float = Field(
        default=0.8,
        ge=0.5,
        le=0.99,
        description="forecast mode: central prediction-interval level; its upper bound is used.",
    )
    history_seconds: int | None = Field(
        default=None,
        ge=600,
        le=7 * 86400,
        description=(
            "Claim history kept in status.autoscaling.history (so an operator restart loses "
            "nothing) and read by the forecasters. At most 10080 x intervalSeconds. Default "
            "two days (two daily seasons), or 10080 windows when intervalSeconds is under 18."
        ),
    )
    scale_down_delay_seconds: int = Field(
        default=300,
        ge=0,
        le=86400,
        description=(
            "Scale down only to the highest size recommended over this long (start-up costs "
            "are paid once; a lull between bursts does not empty the pool). Scale-up is "
            "immediate. Default 300."
        ),
    )

    @property
    def history_s(self) -> int:
        """The history kept: the spec's, or two days capped to the windows status holds."""
        if self.history_seconds is not None:
            return self.history_seconds
        return min(DEFAULT_HISTORY_S, self.interval_seconds * MAX_HISTORY_WINDOWS)

    @model_validator(mode="after")
    def _history_fits(self) -> WarmPoolAutoscaling:
        """Mirror the CEL rule, for specs parsed outside the API server."""
        if (
            self.history_seconds is not None
            and self.history_seconds > self.interval_seconds * MAX_HISTORY_WINDOWS
        ):
            raise ValueError(
                f"spec.autoscaling.historySeconds must be at most {MAX_HISTORY_WINDOWS} x "
                "intervalSeconds (the windows kept in status)"
            )
        return self


class SandboxWarmPoolSpec(SpecModel):
    """The desired state of a SandboxWarmPool."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": _spec_rules()})

    template_ref: ObjectRef = Field(
        description=(
            "The SandboxTemplate in this namespace whose sandboxes the pool keeps warm. "
            "Changing it, or the template itself, replaces the unclaimed sandboxes; claimed "
            "ones are never touched."
        ),
    )
    replicas: int = Field(
        default=0,
        ge=0,
        le=MAX_REPLICAS,
        description=(
            "Unclaimed, ready sandboxes to keep. Each adoption takes one out of the pool and "
            "a replacement is started. Also settable through /scale (kubectl scale, HPA)."
        ),
    )
    min_replicas: int | None = Field(
        default=None,
        alias="min",
        ge=0,
        le=MAX_REPLICAS,
        description=(
            "The fewest replicas /scale, an HPA or the planner may set; the API server refuses "
            "replicas below it."
        ),
    )
    max_replicas: int | None = Field(
        default=None,
        alias="max",
        ge=0,
        le=MAX_REPLICAS,
        description=(
            "The most replicas /scale, an HPA or the planner may set; the API server refuses "
            "replicas above it, which bounds what idle warm sandboxes cost."
        ),
    )
    autoscaling: WarmPoolAutoscaling | None = Field(
        default=None,
        description=(
            "Size replicas from the claim rate within min and max (default off: replicas are "
            "set by hand, kubectl scale or an HPA)."
        ),
    )

    @model_validator(mode="after")
    def _within_bounds(self) -> SandboxWarmPoolSpec:
        """Mirror the CEL rules, for specs parsed outside the API server."""
        low, high = self.min_replicas, self.max_replicas
        if low is not None and high is not None and low > high:
            raise ValueError(f"spec.min ({low}) must not exceed spec.max ({high})")
        scaling = self.autoscaling
        autoscaled = scaling is not None and scaling.mode != "off"
        if low is not None and self.replicas < low and not (autoscaled and self.replicas == 0):
            raise ValueError(
                f"spec.replicas ({self.replicas}) must be at least spec.min ({low}) "
                "(or left out, when spec.autoscaling sets it)"
            )
        if high is not None and self.replicas > high:
            raise ValueError(f"spec.replicas ({self.replicas}) must be at most spec.max ({high})")
        if autoscaled and high is None:
            raise ValueError(
                "spec.max is required when spec.autoscaling.mode is reactive or forecast"
            )
        return self


class ClaimHistoryStatus(StatusModel):
    """Claims per window, oldest first, as comma-separated integers (empty: not observed)."""

    interval_seconds: int = Field(default=60, ge=1, description="The window length.")
    end: str | None = Field(
        default=None, description="When the newest window ended (RFC 3339, UTC)."
    )
    claims: str = Field(
        default="",
        description="AgentSandboxes created naming this pool, per window (warm or cold).",
    )
    peaks: str = Field(
        default="",
        description="Per window, the most claims created within one start-up time.",
    )


class WarmPoolAutoscalingStatus(StatusModel):
    """The autoscaler's last decision, so `kubectl get -o yaml` explains spec.replicas."""

    mode: str = Field(default="off", description="The autoscaling mode in effect.")
    last_decision_time: str | None = Field(default=None, description="When it last decided.")
    replicas: int = Field(default=0, ge=0, description="The replicas it chose.")
    recommended: int = Field(
        default=0, ge=0, description="Its need before the scale-down delay (within min/max)."
    )
    reason: str = Field(
        default="",
        description=(
            "Why: Forecast, Reactive, Burst (a remembered burst sets the size), "
            "ScaleDownDelayed, AtMax, AtMin, NoClaims."
        ),
    )
    message: str = Field(default="", description="The decision in words.")
    forecaster: str | None = Field(default=None, description="The forecaster chosen.")
    startup_seconds: float | None = Field(
        default=None, description="The start-up time sized for (set or measured)."
    )
    observed_claims_per_minute: float | None = Field(
        default=None, description="Claim rate of the last window."
    )
    forecast_claims_per_minute: float | None = Field(
        default=None, description="Mean forecast claim rate (forecast mode)."
    )
    provisioned_claims_per_minute: float | None = Field(
        default=None, description="The claim rate sized for."
    )
    burst_claims: int | None = Field(
        default=None,
        description="The most claims within one start-up time remembered (burstMemorySeconds).",
    )
    history: ClaimHistoryStatus | None = Field(
        default=None, description="The claim history the decisions read."
    )


class SandboxWarmPoolStatus(StatusModel):
    """The observed state of a SandboxWarmPool, written by kleave."""

    observed_generation: Int64 | None = Field(
        default=None, ge=0, description="The metadata.generation kleave last reconciled."
    )
    replicas: int = Field(
        default=0,
        ge=0,
        description=(
            "Unclaimed sandbox pods of the pool, starting or ready (what /scale reports)."
        ),
    )
    ready_replicas: int = Field(
        default=0, ge=0, description="Unclaimed sandboxes ready to be adopted now."
    )
    claimed: Int64 = Field(
        default=0,
        ge=0,
        description="Sandboxes adopted from the pool since it was created (a running total).",
    )
    selector: str = Field(
        default="",
        max_length=1024,
        description=(
            "Label selector of the pool's unclaimed pods, in string form (for /scale and HPA)."
        ),
    )
    template_hash: str | None = Field(
        default=None,
        max_length=64,
        description=(
            "The template hash new pool sandboxes are built from; pods of another hash are "
            "being replaced."
        ),
    )
    conditions: list[Condition] = conditions_field(
        "Current conditions, one per type: Ready (readyReplicas has reached replicas), "
        "Progressing (filling, or replacing sandboxes of an older templateHash), Degraded "
        "(reason TemplateNotFound, TemplateNotAccepted or Unschedulable)."
    )
    autoscaling: WarmPoolAutoscalingStatus | None = Field(
        default=None, description="The autoscaler's last decision (spec.autoscaling)."
    )


def crd() -> dict[str, Any]:
    """The SandboxWarmPool CustomResourceDefinition."""
    return crd_for(WARM_POOL_KIND, SandboxWarmPoolSpec, SandboxWarmPoolStatus)
