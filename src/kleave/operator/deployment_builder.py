"""Pure builders: an InferenceDeployment -> its InferencePools, plan ConfigMap and router.

What to build at which revision (and how many router replicas) is decided in
:mod:`kleave.operator.rollout`; these functions only render manifests.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from kleave.api.inference_deployment import InferenceDeploymentSpec
from kleave.api.inference_pool import POOL_KIND, PoolTemplate
from kleave.api.vocabulary import Role
from kleave.operator import engines
from kleave.operator.naming import (
    ANNOTATION_REVISION,
    COMPONENT_PLAN,
    COMPONENT_ROUTER,
    COMPONENT_WORKER,
    LABEL_COMPONENT,
    LABEL_DEPLOYMENT,
    LABEL_REVISION,
    LABEL_ROLE,
    base_labels,
    owner_reference,
    plan_configmap_name,
    pool_name,
    pool_service_url,
    router_name,
)
from kleave.operator.serving_plan import pool_image

PLAN_VOLUME = "serving-plan"


def build_pool(
    owner: Mapping[str, Any],
    spec: InferenceDeploymentSpec,
    role: Role,
    pool: PoolTemplate,
    *,
    revision: str,
    retain_revision: str | None,
    replicas: int,
) -> dict[str, Any]:
    """The InferencePool of one role; ``replicas`` is what kleave asserts (see rollout)."""
    name = owner["metadata"]["name"]
    template = pool.model_dump(by_alias=True, exclude_none=True, exclude={"image", "replicas"})
    body: dict[str, Any] = template | {
        "replicas": replicas,
        "role": role,
        "model": spec.model,
        "engine": spec.engine,
        "topology": spec.topology,
        "kvBackend": engines.resolve_kv_backend(spec.engine, spec.kv_transfer.backend),
        "image": pool_image(spec, pool),
        "revision": revision,
    }
    if retain_revision is not None and retain_revision != revision:
        body["retainRevision"] = retain_revision
    return {
        "apiVersion": POOL_KIND.api_version,
        "kind": POOL_KIND.kind,
        "metadata": {
            "name": pool_name(name, role),
            "namespace": owner["metadata"]["namespace"],
            "labels": base_labels(name, COMPONENT_WORKER) | {LABEL_ROLE: role},
            "ownerReferences": [owner_reference(owner)],
        },
        "spec": body,
    }


def build_plan_configmap(
    owner: Mapping[str, Any], revision: str, plan: Mapping[str, Any]
) -> dict[str, Any]:
    """The serving plan of one revision; immutable, as a revision's plan never changes."""
    name = owner["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": plan_configmap_name(name, revision),
            "namespace": owner["metadata"]["namespace"],
            "labels": base_labels(name, COMPONENT_PLAN) | {LABEL_REVISION: revision},
            "ownerReferences": [owner_reference(owner)],
        },
        "immutable": True,
        "data": {engines.PLAN_FILE: json.dumps(plan, indent=2, sort_keys=True) + "\n"},
    }


def router_labels(name: str) -> dict[str, str]:
    return base_labels(name, COMPONENT_ROUTER)


def router_selector(name: str) -> dict[str, str]:
    return {LABEL_DEPLOYMENT: name, LABEL_COMPONENT: COMPONENT_ROUTER}


def _router_preset(
    owner: Mapping[str, Any], spec: InferenceDeploymentSpec, revision: str
) -> engines.ContainerPreset:
    decode_role: Role = "attention" if spec.topology == "PDAF" else "decode"
    return engines.router_preset(
        engines.RouterSpec(
            engine=spec.engine,
            topology=spec.topology,
            model=spec.model,
            kv_backend=engines.resolve_kv_backend(spec.engine, spec.kv_transfer.backend),
            prefill_urls=_urls(owner, spec, "prefill", revision),
            decode_urls=_urls(owner, spec, decode_role, revision),
            extra_args=tuple(spec.router.args),
            image=spec.router.image,
        )
    )


def build_router(
    owner: Mapping[str, Any],
    spec: InferenceDeploymentSpec,
    *,
    revision: str,
    replicas: int,
) -> dict[str, Any]:
    """The router Deployment, pinned to one plan revision's pools.

    A router pod only ever addresses the pools of the revision in its template; moving to a
    new revision is a rolling update of the router, so each request stays within one revision.
    """
    name = owner["metadata"]["name"]
    namespace = owner["metadata"]["namespace"]
    preset = _router_preset(owner, spec, revision)
    env = [{"name": k, "value": v} for k, v in preset.env]
    env += [
        {"name": "KLEAVE_REVISION", "value": revision},
        {"name": "KLEAVE_PLAN", "value": f"{engines.PLAN_DIR}/{engines.PLAN_FILE}"},
    ]
    for var in spec.router.env:
        env = [item for item in env if item["name"] != var.name]
        env.append({"name": var.name, "value": var.value})
    http = preset.ports[0].name
    labels = router_labels(name)
    resources = spec.router.resources.model_dump(by_alias=True)
    container = {
        "name": "router",
        "image": preset.image,
        "command": list(preset.command),
        "args": list(preset.args),
        "env": env,
        "ports": [{"name": p.name, "containerPort": p.port} for p in preset.ports],
        "resources": {
            kind: {k: str(v) for k, v in values.items()}
            for kind, values in resources.items()
            if values
        },
        "volumeMounts": [{"name": PLAN_VOLUME, "mountPath": engines.PLAN_DIR, "readOnly": True}],
        "readinessProbe": {"httpGet": {"path": preset.readiness_path, "port": http}},
        "livenessProbe": {
            "httpGet": {"path": preset.liveness_path, "port": http},
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": router_name(name),
            "namespace": namespace,
            "labels": labels,
            "annotations": {ANNOTATION_REVISION: revision},
            "ownerReferences": [owner_reference(owner)],
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": router_selector(name)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": {
                "metadata": {
                    "labels": labels | {LABEL_REVISION: revision},
                    "annotations": {ANNOTATION_REVISION: revision},
                },
                "spec": {
                    "containers": [container],
                    "volumes": [
                        {
                            "name": PLAN_VOLUME,
                            "configMap": {"name": plan_configmap_name(name, revision)},
                        }
                    ],
                    "enableServiceLinks": False,
                },
            },
        },
    }


def _urls(
    owner: Mapping[str, Any], spec: InferenceDeploymentSpec, role: Role, revision: str
) -> tuple[str, ...]:
    if role not in spec.pools.defined():
        return ()
    meta = owner["metadata"]
    return (pool_service_url(meta["name"], meta["namespace"], role, revision, engines.WORKER_PORT),)


def build_router_service(owner: Mapping[str, Any], spec: InferenceDeploymentSpec) -> dict[str, Any]:
    """The Service clients call: the router's OpenAI-compatible API (and its other ports)."""
    name = owner["metadata"]["name"]
    preset = _router_preset(owner, spec, revision="")  # only its ports are used
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": router_name(name),
            "namespace": owner["metadata"]["namespace"],
            "labels": router_labels(name),
            "ownerReferences": [owner_reference(owner)],
        },
        "spec": {
            "type": "ClusterIP",
            "selector": router_selector(name),
            "ports": [
                {"name": p.name, "port": p.port, "targetPort": p.name, "protocol": "TCP"}
                for p in preset.ports
            ],
        },
    }
