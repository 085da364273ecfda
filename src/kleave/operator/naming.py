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
