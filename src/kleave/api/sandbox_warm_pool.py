"""SandboxWarmPool (``sbxwp``): pre-started sandboxes of one template, ready to be claimed.

Starting a microVM and the runtime inside it takes seconds; adopting one that is already
running takes milliseconds. A warm pool keeps ``replicas`` unclaimed, ready sandbox pods of its
template; an AgentSandbox that names the pool adopts one (the pod leaves the pool, which then
starts a replacement). The ``/scale`` subresource lets ``kubectl scale``, an HPA or, later, the
planner (sizing from the claim-rate forecast within ``min``/``max``) own ``replicas``.
"""

from __future__ import annotations

from typing import Any

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


def _spec_rules() -> list[Any]:
    return [
        {
            "rule": "!has(self.min) || !has(self.max) || self.min <= self.max",
            "message": "spec.min must not exceed spec.max",
            "fieldPath": ".min",
        },
        {
            "rule": "!has(self.min) || self.replicas >= self.min",
            "message": "spec.replicas must be at least spec.min",
            "fieldPath": ".replicas",
        },
        {
            "rule": "!has(self.max) || self.replicas <= self.max",
            "message": "spec.replicas must be at most spec.max",
            "fieldPath": ".replicas",
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
        {"name": "AGE", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ],
    scale=ScaleSubresource(
        spec_replicas_path=".spec.replicas",
        status_replicas_path=".status.replicas",
        label_selector_path=".status.selector",
    ),
    validations=[name_length_rule("pool")],
)


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

    @model_validator(mode="after")
    def _within_bounds(self) -> SandboxWarmPoolSpec:
        """Mirror the CEL rules, for specs parsed outside the API server."""
        low, high = self.min_replicas, self.max_replicas
        if low is not None and high is not None and low > high:
            raise ValueError(f"spec.min ({low}) must not exceed spec.max ({high})")
        if low is not None and self.replicas < low:
            raise ValueError(f"spec.replicas ({self.replicas}) must be at least spec.min ({low})")
        if high is not None and self.replicas > high:
            raise ValueError(f"spec.replicas ({self.replicas}) must be at most spec.max ({high})")
        return self


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


def crd() -> dict[str, Any]:
    """The SandboxWarmPool CustomResourceDefinition."""
    return crd_for(WARM_POOL_KIND, SandboxWarmPoolSpec, SandboxWarmPoolStatus)
