"""InferenceDeployment (``infd``): one model served by prefill/decode(/attention/FFN) pools.

Only the fields the operator acts on today; the pools, router, SLOs and autoscaling come with
the code that uses them, so the API never promises what the operator ignores.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from kleave.api.common import Condition, Int64, KindInfo, SpecModel, StatusModel
from kleave.api.crd import crd_for

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
            "name": "TOPOLOGY",
            "type": "string",
            "jsonPath": ".spec.topology",
            "description": "How serving is split across pools.",
        },
        {
            "name": "ENGINE",
            "type": "string",
            "jsonPath": ".spec.engine",
            "description": "The inference engine the workers run.",
        },
        {
            "name": "MODEL",
            "type": "string",
            "jsonPath": ".spec.model",
            "description": "The model served.",
            "priority": 1,
        },
        {
            "name": "ACCEPTED",
            "type": "string",
            "jsonPath": '.status.conditions[?(@.type=="Accepted")].status',
            "description": "Whether kleave accepted the spec; see the Accepted condition.",
        },
        {"name": "AGE", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ],
)


class InferenceDeploymentSpec(SpecModel):
    """The desired state of an InferenceDeployment."""

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
    engine: Literal["builtin", "vllm", "sglang"] = Field(
        default="builtin",
        description=(
            "The inference engine in the worker pods: builtin (kleave's own workers), vllm, "
            "or sglang."
        ),
    )
    topology: Literal["Colocated", "PD", "PDAF"] = Field(
        default="PD",
        description=(
            "How serving is split: Colocated (prefill and decode in one pool), PD (separate "
            "prefill and decode pools with KV-cache transfer), or PDAF (PD with attention and "
            "FFN in separate pools). Immutable after creation."
        ),
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self == oldSelf",
                    "message": (
                        "spec.topology is immutable: create a new InferenceDeployment to "
                        "change topology"
                    ),
                }
            ]
        },
    )


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
    conditions: list[Condition] = Field(
        default_factory=list,
        description=(
            "Current conditions, one per type: Accepted (the spec is valid and supported), "
            "Ready, Progressing and Degraded."
        ),
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )


def crd() -> dict[str, Any]:
    """The InferenceDeployment CustomResourceDefinition."""
    return crd_for(KIND, InferenceDeploymentSpec, InferenceDeploymentStatus)
