"""InferencePool (``infp``): one role's workers of an InferenceDeployment, scalable on its own.

The parent InferenceDeployment writes one InferencePool per role; the pool's controller turns
it into a Deployment (or StatefulSet) per serving-plan revision and reports readiness. The
``/scale`` subresource lets ``kubectl scale``, an HPA or the planner own ``spec.replicas``
(which of them does is the pool's ``scaling`` policy).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field

from kleave.api.common import (
    DEFAULTED,
    Condition,
    Int64,
    KindInfo,
    ScaleSubresource,
    SpecModel,
    StatusModel,
    conditions_field,
)
from kleave.api.crd import crd_for
from kleave.api.vocabulary import Engine, KvBackend, Role, Topology

ROLES: tuple[Role, ...] = ("prefill", "decode", "attention", "ffn")
Scaling = Literal["Static", "External", "Planner"]

GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_RESOURCE = "nvidia.com/gpu"

_LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
_QUANTITY_MAP: dict[str, Any] = {"additionalProperties": {"x-kubernetes-int-or-string": True}}


class Parallelism(SpecModel):
    """How one replica's GPUs split the model."""

    tensor: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Tensor-parallel degree: each layer's weights split across this many GPUs.",
    )
    expert: int = Field(
        default=1,
        ge=1,
        le=256,
        description=(
            "Expert-parallel degree: MoE experts spread across this many GPUs, tokens "
            "dispatched to them and combined back. 1 for dense models."
        ),
    )


class EnvVar(SpecModel):
    """An environment variable for the worker containers."""

    name: str = Field(
        description="Variable name.",
        min_length=1,
        max_length=253,
        pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$",
    )
    value: str = Field(default="", description="Variable value.", max_length=32768)


class Toleration(SpecModel):
    """A toleration of node taints, as in a pod spec."""

    key: str | None = Field(default=None, description="The taint key; empty matches all keys.")
    operator: Literal["Exists", "Equal"] = Field(
        default="Equal", description="Exists (any value) or Equal (the given value)."
    )
    value: str | None = Field(default=None, description="The taint value for Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="The taint effect to tolerate; empty matches all effects."
    )
    toleration_seconds: Int64 | None = Field(
        default=None, description="For NoExecute: how long the pod stays bound once tainted."
    )


class Resources(SpecModel):
    """CPU and memory for each worker container; GPUs come from gpusPerReplica."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "(!has(self.requests) || !('nvidia.com/gpu' in self.requests)) && "
                    "(!has(self.limits) || !('nvidia.com/gpu' in self.limits))",
                    "message": (
                        "nvidia.com/gpu is set from gpusPerReplica: remove it from resources"
                    ),
                }
            ]
        }
    )

    requests: dict[str, int | str] = Field(
        default_factory=dict,
        description="Resource requests, e.g. cpu: 8, memory: 64Gi.",
        json_schema_extra=_QUANTITY_MAP,
    )
    limits: dict[str, int | str] = Field(
        default_factory=dict,
        description="Resource limits, e.g. memory: 96Gi.",
        json_schema_extra=_QUANTITY_MAP,
    )


def _pool_rules() -> list[Any]:
    return [
        {
            "rule": "self.gpusPerReplica % (self.parallelism.tensor * self.parallelism.expert)"
            " == 0",
            "message": (
                "parallelism.tensor x parallelism.expert must divide gpusPerReplica "
                "(each replica's GPUs are split tensor x expert ways)"
            ),
            "fieldPath": ".parallelism",
        },
        {
            "rule": "self.replicas >= self.minReplicas",
            "message": "replicas must be at least minReplicas",
            "fieldPath": ".replicas",
        },
        {
            "rule": "!has(self.maxReplicas) || self.replicas <= self.maxReplicas",
            "message": "replicas must be at most maxReplicas",
            "fieldPath": ".replicas",
        },
        {
            "rule": "!has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",
            "message": "minReplicas must not exceed maxReplicas",
            "fieldPath": ".minReplicas",
        },
    ]


class PoolTemplate(SpecModel):
    """One pool's workers: how many, on which GPUs, split how, and who scales them."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": _pool_rules()})

    replicas: int = Field(
        default=1,
        ge=0,
        le=10000,
        description=(
            "Worker replicas (pods). With scaling Static this is the count; with External or "
            "Planner it is only the initial count, and the InferencePool's /scale owns it."
        ),
    )
    min_replicas: int = Field(
        default=0,
        ge=0,
        le=10000,
        description="The fewest replicas kubectl scale, an HPA or the planner may set.",
    )
    max_replicas: int | None = Field(
        default=None,
        ge=0,
        le=10000,
        description="The most replicas kubectl scale, an HPA or the planner may set.",
    )
    gpu_type: str = Field(
        description=(
            "GPU product the workers run on, matched against the nodes' "
            "nvidia.com/gpu.product label (e.g. H100-SXM, H20)."
        ),
        min_length=1,
        max_length=63,
        pattern=_LABEL_VALUE,
    )
    gpus_per_replica: int = Field(
        default=1,
        ge=1,
        le=64,
        description="GPUs per replica, requested as the nvidia.com/gpu resource.",
    )
    parallelism: Parallelism = Field(
        default_factory=Parallelism,
        json_schema_extra=DEFAULTED,
        description="Tensor and expert parallelism within one replica.",
    )
    scaling: Scaling = Field(
        default="Static",
        description=(
            "Who owns the replica count: Static (this spec; direct edits of the "
            "InferencePool are reverted), External (kubectl scale or an HPA on the "
            "InferencePool), or Planner (kleave's DOPD planner)."
        ),
    )
    image: str | None = Field(
        default=None,
        description="Worker image for this pool; default: the engine's image.",
        min_length=1,
        max_length=512,
    )
    args: list[str] = Field(
        default_factory=list,
        description="Extra engine arguments, appended after kleave's so they take precedence.",
        max_length=128,
    )
    env: list[EnvVar] = Field(
        default_factory=list,
        description="Extra environment variables for the workers.",
        max_length=128,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    resources: Resources = Field(
        default_factory=Resources,
        json_schema_extra=DEFAULTED,
        description="CPU and memory requests and limits per worker container.",
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict,
        description="Extra node labels the workers require, on top of the GPU product.",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        description="Taints the workers tolerate (e.g. a dedicated GPU node pool's taint).",
        max_length=64,
    )


POOL_KIND = KindInfo(
    kind="InferencePool",
    plural="inferencepools",
    singular="inferencepool",
    short_names=["infp"],
    description=(
        "InferencePool is one role's workers (prefill, decode, attention or ffn) of an "
        "InferenceDeployment. kleave creates it; scale it with kubectl scale or an HPA when "
        "its scaling is External."
    ),
    printer_columns=[
        {"name": "ROLE", "type": "string", "jsonPath": ".spec.role"},
        {"name": "GPU", "type": "string", "jsonPath": ".spec.gpuType"},
        {
            "name": "READY",
            "type": "integer",
            "jsonPath": ".status.readyReplicas",
            "description": "Ready replicas of the current revision.",
        },
        {
            "name": "DESIRED",
            "type": "integer",
            "jsonPath": ".spec.replicas",
            "description": "Desired replicas.",
        },
        {"name": "SCALING", "type": "string", "jsonPath": ".spec.scaling", "priority": 1},
        {"name": "REVISION", "type": "string", "jsonPath": ".spec.revision", "priority": 1},
        {"name": "AGE", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ],
    scale=ScaleSubresource(
        spec_replicas_path=".spec.replicas",
        status_replicas_path=".status.replicas",
        label_selector_path=".status.selector",
    ),
)


class InferencePoolSpec(PoolTemplate):
    """The desired state of one pool; written by the owning InferenceDeployment."""

    role: Role = Field(
        description="The pool's role: prefill, decode, attention or ffn. Immutable.",
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "self == oldSelf", "message": "spec.role is immutable"}
            ]
        },
    )
    model: str = Field(description="The model served.", min_length=1, max_length=253)
    engine: Engine = Field(description="The inference engine of the workers.")
    topology: Topology = Field(description="The parent's topology.")
    kv_backend: KvBackend = Field(
        default="auto", description="The resolved KV-cache transfer backend."
    )
    revision: str = Field(
        description=(
            "The serving-plan revision the workers should run; a new revision is rolled out "
            "beside the old one (see retainRevision)."
        ),
        min_length=1,
        max_length=16,
        pattern=r"^[a-z0-9]+$",
    )
    retain_revision: str | None = Field(
        default=None,
        description=(
            "An older revision whose workers stay up, untouched, until the router has moved "
            "to the new one; workers of any other revision are removed."
        ),
        max_length=16,
        pattern=r"^[a-z0-9]+$",
    )


class RevisionStatus(StatusModel):
    """The workers of one serving-plan revision."""

    revision: str = Field(description="The serving-plan revision.")
    replicas: int = Field(default=0, description="Desired replicas of this revision.")
    ready_replicas: int = Field(default=0, description="Ready replicas of this revision.")
    updated_replicas: int = Field(
        default=0, description="Replicas running this revision's latest pod template."
    )


class InferencePoolStatus(StatusModel):
    """The observed state of one pool."""

    observed_generation: Int64 | None = Field(
        default=None, ge=0, description="The metadata.generation kleave last reconciled."
    )
    replicas: int = Field(default=0, description="Replicas of the current revision (for /scale).")
    ready_replicas: int = Field(default=0, description="Ready replicas of the current revision.")
    updated_replicas: int = Field(
        default=0, description="Replicas of the current revision on its latest pod template."
    )
    selector: str = Field(
        default="",
        description="Label selector of the pool's pods, in string form (for /scale and HPA).",
    )
    revisions: list[RevisionStatus] = Field(
        default_factory=list,
        description="Workers per serving-plan revision, the current one first.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["revision"],
        },
    )
    conditions: list[Condition] = conditions_field(
        "Ready (every desired replica ready), Progressing (a rollout or scale is under "
        "way), Degraded (with reason NoNodesForGPUType, Unschedulable or PoolNotReady)."
    )


def crd() -> dict[str, Any]:
    """The InferencePool CustomResourceDefinition."""
    return crd_for(POOL_KIND, InferencePoolSpec, InferencePoolStatus)
