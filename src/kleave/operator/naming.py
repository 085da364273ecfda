"""Names and labels of the objects kleave creates, in one place so every builder agrees."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "kleave"
LABEL_DEPLOYMENT = "kleave.dev/inference-deployment"
LABEL_POOL = "kleave.dev/inference-pool"
LABEL_ROLE = "kleave.dev/role"
LABEL_COMPONENT = "kleave.dev/component"
LABEL_REVISION = "kleave.dev/revision"
ANNOTATION_REVISION = "kleave.dev/revision"

# Agent sandboxes (operator/sandbox_builder.py, operator/sandbox_controllers.py).
LABEL_COMPONENT_APP = "app.kubernetes.io/component"
LABEL_SANDBOX_TEMPLATE = "kleave.dev/sandbox-template"
LABEL_TEMPLATE_HASH = "kleave.dev/template-hash"
LABEL_WARM_POOL = "kleave.dev/warm-pool"  # unclaimed pool pods only; removed by the claim
LABEL_SANDBOX = "kleave.dev/sandbox"  # the AgentSandbox a pod is bound to
ANNOTATION_TOOL_POLICY = "kleave.dev/tool-policy"
ANNOTATION_CLAIM_SOURCE = "kleave.dev/claim-source"  # Warm, Cold or Resume
ANNOTATION_CLAIMED_AT = "kleave.dev/claimed-at"
ANNOTATION_CLAIMED_FROM = "kleave.dev/claimed-from"  # the warm pool of a Warm claim
ANNOTATION_RESTORED = "kleave.dev/restored-generation"  # on a resumed pod, once restored
ANNOTATION_RESUME_REQUESTED = "kleave.dev/resume-requested"  # on an AgentSandbox, by its user
ANNOTATION_TOKEN_NONCE = "kleave.dev/runtime-token-nonce"  # the pod's token = HMAC(key, ...)
ANNOTATION_TOKEN_SHA256 = "kleave.dev/runtime-token-sha256"  # what the runtime checks against
COMPONENT_SANDBOX = "sandbox"

COMPONENT_WORKER = "worker"
COMPONENT_ROUTER = "router"
COMPONENT_PLAN = "serving-plan"

REVISION_LENGTH = 7


def pool_name(deployment: str, role: str) -> str:
    return f"{deployment}-{role}"


def workload_name(pool: str, revision: str) -> str:
    """The Deployment/StatefulSet (and its Service) of one pool at one plan revision."""
    return f"{pool}-{revision}"


def router_name(deployment: str) -> str:
    return f"{deployment}-router"


def plan_configmap_name(deployment: str, revision: str) -> str:
    return f"{deployment}-plan-{revision}"


def service_url(service: str, namespace: str, port: int) -> str:
    return f"http://{service}.{namespace}.svc:{port}"


def pool_service_url(deployment: str, namespace: str, role: str, revision: str, port: int) -> str:
    """Where one role's workers of one revision answer (their headless Service)."""
    return service_url(workload_name(pool_name(deployment, role), revision), namespace, port)


def base_labels(deployment: str, component: str) -> dict[str, str]:
    """Labels on everything kleave creates for one InferenceDeployment."""
    return {
        MANAGED_BY: MANAGER,
        "app.kubernetes.io/name": "kleave",
        "app.kubernetes.io/instance": deployment,
        LABEL_DEPLOYMENT: deployment,
        LABEL_COMPONENT: component,
    }


def owner_reference(owner: Mapping[str, Any]) -> dict[str, Any]:
    """A controller ownerReference: deleting the owner deletes the child (garbage collection)."""
    meta = owner["metadata"]
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
