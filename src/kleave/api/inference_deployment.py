"""InferenceDeployment (``infd``): one model served by prefill/decode(/attention/FFN) pools.

The spec is what an admin keeps in Git; kleave derives from it one InferencePool per role, a
serving-plan ConfigMap, the router, and Services. Every rule the API server can check is in
the schema or a CEL rule here, so ``kubectl apply`` rejects a bad manifest naming the field.
"""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field

from kleave.api.autoscaling import AutoscalingSpec, PlannerStatus, SloSpec
from kleave.api.common import (
    DEFAULTED,
    Condition,
    Int64,
    KindInfo,
    PrinterColumn,
    SpecModel,
    StatusModel,
    conditions_field,
)
from kleave.api.crd import crd_for
from kleave.api.inference_pool import ROLES, EnvVar, PoolTemplate, Resources
from kleave.api.vocabulary import Engine, KvBackend, Role, Topology

MAX_NAME_LENGTH = 40
"""Child names add a role and a revision (``<name>-attention-<rev>``) within Kubernetes' limits."""

KIND = KindInfo(
    kind="InferenceDeployment",
    plural="inferencedeployments",
    singular="inferencedeployment",
    short_names=["infd"],
    description=(
        "InferenceDeployment serves one LLM with disaggregated prefill and decode (and "
        "optionally attention/FFN) pools that kleave creates, scales and updates together."
    ),
    printer_columns=[
        {
            "name": "READY",
            "type": "string",
            "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
            "description": "Whether the router serves and every pool has a ready replica.",
        },
        {
            "name": "TOPOLOGY",
            "type": "string",
            "jsonPath": ".spec.topology",
            "description": "How serving is split across pools.",
        },
        *(
            PrinterColumn(
                name=letter,
                type="string",
                jsonPath=f".status.pools.{role}.summary",
                description=f"Ready/desired replicas of the {role} pool.",
            )
            for role, letter in (
                ("prefill", "P"),
                ("decode", "D"),
                ("attention", "A"),
                ("ffn", "F"),
            )
        ),
        {
            "name": "ENGINE",
            "type": "string",
            "jsonPath": ".spec.engine",
            "description": "The inference engine the workers run.",
            "priority": 1,
        },
        {
            "name": "MODEL",
            "type": "string",
            "jsonPath": ".spec.model",
            "description": "The model served.",
            "priority": 1,
        },
        {
            "name": "REVISION",
            "type": "string",
            "jsonPath": ".status.servingRevision",
            "description": "The serving-plan revision the router sends traffic to.",
            "priority": 1,
        },
        {"name": "AGE", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ],
    validations=[
        {
            "rule": f"self.metadata.name.size() <= {MAX_NAME_LENGTH}",
            "message": (
                f"metadata.name must be at most {MAX_NAME_LENGTH} characters: child objects "
                "add the role and a revision to it"
            ),
        }
    ],
)

_KV_BACKENDS: dict[str, tuple[str, ...]] = {
    "builtin": ("tcp", "nccl"),
    "vllm": ("nixl", "nccl", "mooncake"),
    "sglang": ("mooncake", "nixl"),
}


def _spec_rules() -> list[Any]:
    """Cross-field rules: which pools each topology needs, and engine compatibility."""
    kv = " || ".join(
        f"(self.engine == '{engine}' && self.kvTransfer.backend in {list(backends)})"
        for engine, backends in _KV_BACKENDS.items()
    )
    kv_help = "; ".join(f"{e}: {', '.join(b)}" for e, b in _KV_BACKENDS.items())
    return [
        {
            "rule": "self.topology != 'PD' || (has(self.pools.prefill) && has(self.pools.decode))",
            "message": "topology PD requires spec.pools.prefill and spec.pools.decode",
            "fieldPath": ".pools",
        },
        {
            "rule": "self.topology != 'PD' || (!has(self.pools.attention) && !has(self.pools.ffn))",
            "message": (
                "spec.pools.attention and spec.pools.ffn are only allowed with topology PDAF"
            ),
            "fieldPath": ".pools",
        },
        {
            "rule": "self.topology != 'PDAF' || (has(self.pools.prefill) && "
            "has(self.pools.attention) && has(self.pools.ffn))",
            "message": (
                "topology PDAF requires spec.pools.prefill, spec.pools.attention and spec.pools.ffn"
            ),
            "fieldPath": ".pools",
        },
        {
            "rule": "self.topology != 'PDAF' || !has(self.pools.decode)",
            "message": (
                "spec.pools.decode is not allowed with topology PDAF: decode runs as the "
                "attention and ffn pools"
            ),
            "fieldPath": ".pools.decode",
        },
        {
            "rule": "self.topology != 'Colocated' || (has(self.pools.decode) && "
            "!has(self.pools.prefill) && !has(self.pools.attention) && !has(self.pools.ffn))",
            "message": (
                "topology Colocated serves prefill and decode in one pool: set "
                "spec.pools.decode only"
            ),
            "fieldPath": ".pools",
        },
        {
            "rule": "self.topology != 'PDAF' || self.engine == 'builtin'",
            "message": (
                "spec.engine must be builtin for topology PDAF: only kleave's workers "
                "disaggregate attention and FFN"
            ),
            "fieldPath": ".engine",
        },
        {
            "rule": f"self.kvTransfer.backend == 'auto' || {kv}",
            "message": f"spec.kvTransfer.backend is not supported by the engine ({kv_help})",
            "fieldPath": ".kvTransfer.backend",
        },
    ]


class KvTransfer(SpecModel):
    """How prefill workers hand the KV cache to decode workers."""

    backend: KvBackend = Field(
        default="auto",
        description=(
            "Transfer backend: auto (the engine's default: builtin nccl, vllm nixl, sglang "
            "mooncake), tcp, nccl, nixl or mooncake. Part of the serving plan: changing it "
            "rolls every pool together."
        ),
    )


class RouterSpec(SpecModel):
    """The request router: the OpenAI-compatible entry point in front of the pools."""

    replicas: int = Field(default=1, ge=1, le=100, description="Router replicas.")
    image: str | None = Field(
        default=None,
        min_length=1,
        max_length=512,
        description="Router image; default: the engine's router image.",
    )
    args: list[str] = Field(
        default_factory=list, max_length=128, description="Extra router arguments, appended."
    )
    env: list[EnvVar] = Field(
        default_factory=list,
        max_length=128,
        description="Extra environment variables for the router.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    resources: Resources = Field(
        default_factory=Resources,
        json_schema_extra=DEFAULTED,
        description="CPU and memory requests and limits per router.",
    )


class Pools(SpecModel):
    """The pools by role; which ones are required depends on spec.topology."""

    prefill: PoolTemplate | None = Field(
        default=None,
        description="Prefill workers: compute the prompt's KV cache (PD and PDAF).",
    )
    decode: PoolTemplate | None = Field(
        default=None,
        description=(
            "Decode workers: generate tokens from transferred KV caches (PD), or serve both "
            "phases (Colocated, where it is the only pool)."
        ),
    )
    attention: PoolTemplate | None = Field(
        default=None,
        description="Attention workers: decode-time attention over the KV cache (PDAF).",
    )
    ffn: PoolTemplate | None = Field(
        default=None,
        description=(
            "FFN/expert workers: the MoE layers for the attention workers (PDAF); each replica "
            "is an expert-parallel rank with a stable identity (a StatefulSet)."
        ),
    )

    def defined(self) -> dict[Role, PoolTemplate]:
        """The pools that are set, in role order."""
        found = {role: getattr(self, role) for role in ROLES}
        return {role: pool for role, pool in found.items() if pool is not None}


def _immutable(field: str, hint: str) -> dict[str, Any]:
    return {
        "x-kubernetes-validations": [
            {"rule": "self == oldSelf", "message": f"spec.{field} is immutable: {hint}"}
        ]
    }


class InferenceDeploymentSpec(SpecModel):
    """The desired state of an InferenceDeployment."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": _spec_rules()})

    model: str = Field(
        description=(
            "The model to serve: a Hugging Face repo id such as "
            "meta-llama/Llama-3.1-8B-Instruct, or a URI (s3://, pvc://, file://) of a "
            "directory holding the weights and config."
        ),
        min_length=1,
        max_length=253,
        pattern=r"^\S+$",
    )
    engine: Engine = Field(
        default="builtin",
        description=(
            "The inference engine in the worker pods: builtin (kleave's own workers), vllm, "
            "or sglang. Immutable."
        ),
        json_schema_extra=_immutable("engine", "create a new InferenceDeployment to switch"),
    )
    topology: Topology = Field(
        default="PD",
        description=(
            "How serving is split: Colocated (prefill and decode in one pool, "
            "spec.pools.decode), PD (separate prefill and decode pools with KV-cache "
            "transfer), or PDAF (prefill, plus decode split into attention and FFN pools). "
            "Immutable."
        ),
        json_schema_extra=_immutable("topology", "create a new InferenceDeployment to change it"),
    )
    image: str | None = Field(
        default=None,
        min_length=1,
        max_length=512,
        description="Worker image for every pool (a pool's own image wins); default: the engine's.",
    )
    kv_transfer: KvTransfer = Field(
        default_factory=KvTransfer,
        json_schema_extra=DEFAULTED,
        description="KV-cache transfer between prefill and decode.",
    )
    router: RouterSpec = Field(
        default_factory=RouterSpec, json_schema_extra=DEFAULTED, description="The request router."
    )
    pools: Pools = Field(description="The worker pools by role.")
    slo: SloSpec = Field(
        default_factory=SloSpec,
        json_schema_extra=DEFAULTED,
        description="Latency targets the planner provisions for.",
    )
    autoscaling: AutoscalingSpec = Field(
        default_factory=AutoscalingSpec,
        json_schema_extra=DEFAULTED,
        description="The DOPD planner, for pools whose scaling is Planner.",
    )


class PoolStatus(StatusModel):
    """One pool as the InferenceDeployment sees it."""

    name: str = Field(description="The InferencePool's name.")
    replicas: int = Field(default=0, description="Desired replicas (the InferencePool's).")
    ready_replicas: int = Field(default=0, description="Ready replicas of the serving revision.")
    summary: str = Field(default="", description="ready/desired, for kubectl get.")


class RouterStatus(StatusModel):
    """The router Deployment as observed."""

    replicas: int = Field(default=0, description="Router replicas currently wanted.")
    ready_replicas: int = Field(default=0, description="Ready router replicas.")


class InferenceDeploymentStatus(StatusModel):
    """The observed state of an InferenceDeployment, written by kleave."""

    observed_generation: Int64 | None = Field(
        default=None,
        description=(
            "The metadata.generation kleave last reconciled; when it lags the resource's "
            "generation, the latest spec change is not yet reflected in status."
        ),
        ge=0,
    )
    plan_revision: str | None = Field(
        default=None, description="The revision of the serving plan the spec asks for."
    )
    serving_revision: str | None = Field(
        default=None,
        description=(
            "The serving-plan revision the router sends traffic to; differs from "
            "planRevision while a coordinated update is rolling out."
        ),
    )
    pools: dict[str, PoolStatus] = Field(
        default_factory=dict, description="Each pool's replicas, by role."
    )
    router: RouterStatus | None = Field(default=None, description="The router's replicas.")
    planner: PlannerStatus | None = Field(
        default=None, description="The planner's last observation and decision."
    )
    conditions: list[Condition] = conditions_field(
        "Current conditions, one per type: Accepted (the spec is valid and supported), "
        "Ready (serving), Progressing (a rollout or scale under way), Degraded (why not "
        "fully healthy: NoNodesForGPUType, Unschedulable, PoolNotReady), PlannerDegraded "
        "(the planner cannot read metrics or size pools; replicas are held)."
    )


def crd() -> dict[str, Any]:
    """The InferenceDeployment CustomResourceDefinition."""
    return crd_for(KIND, InferenceDeploymentSpec, InferenceDeploymentStatus)
