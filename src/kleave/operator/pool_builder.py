"""Pure builders: an InferencePool at one plan revision -> its workload and Service.

Prefill, decode and attention pools run as Deployments: their replicas are interchangeable.
FFN pools run as StatefulSets, so each replica has a stable identity (``<workload>-N``) and DNS
name and replicas are replaced one at a time: the layout for expert-parallel ranks spread over
replicas. kleave's own workers do not spread ranks over replicas yet: each builtin FFN replica
is a whole FFN worker, its experts split over its own GPUs (``parallelism.expert``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kleave.api.inference_pool import GPU_PRODUCT_LABEL, GPU_RESOURCE, InferencePoolSpec
from kleave.operator import engines
from kleave.operator.naming import (
    ANNOTATION_REVISION,
    COMPONENT_WORKER,
    LABEL_DEPLOYMENT,
    LABEL_POOL,
    LABEL_REVISION,
    LABEL_ROLE,
    base_labels,
    owner_reference,
    plan_configmap_name,
    router_name,
    workload_name,
)

PLAN_VOLUME = "serving-plan"
SHM_VOLUME = "dshm"
TERMINATION_GRACE_S = 60  # lets in-flight generations finish before a worker stops
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"


def is_ranked(spec: InferencePoolSpec) -> bool:
    """Whether replicas need stable ranks (a StatefulSet)."""
    return spec.role == "ffn"


def pool_labels(pool: Mapping[str, Any], spec: InferencePoolSpec) -> dict[str, str]:
    deployment = pool["metadata"]["labels"].get(LABEL_DEPLOYMENT, pool["metadata"]["name"])
    return base_labels(deployment, COMPONENT_WORKER) | {
        LABEL_POOL: pool["metadata"]["name"],
        LABEL_ROLE: spec.role,
    }


def selector_labels(pool_name: str, revision: str | None = None) -> dict[str, str]:
    labels = {LABEL_POOL: pool_name}
    if revision is not None:
        labels[LABEL_REVISION] = revision
    return labels


def selector_string(labels: Mapping[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


def _resources(spec: InferencePoolSpec) -> dict[str, Any]:
    gpus = str(spec.gpus_per_replica)
    requests = {k: str(v) for k, v in spec.resources.requests.items()} | {GPU_RESOURCE: gpus}
    limits = {k: str(v) for k, v in spec.resources.limits.items()} | {GPU_RESOURCE: gpus}
    return {"requests": requests, "limits": limits}


def _affinity(spec: InferencePoolSpec) -> dict[str, Any]:
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {
                        "matchExpressions": [
                            {"key": GPU_PRODUCT_LABEL, "operator": "In", "values": [spec.gpu_type]}
                        ]
                    }
                ]
            }
        }
    }


def _tolerations(spec: InferencePoolSpec) -> list[dict[str, Any]]:
    # GPU node pools are commonly tainted nvidia.com/gpu:NoSchedule so that only GPU pods land
    # there; a GPU worker always tolerates it.
    tolerations: list[dict[str, Any]] = [
        {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
    ]
    for toleration in spec.tolerations:
        tolerations.append(toleration.model_dump(by_alias=True, exclude_none=True))
    return tolerations


def _env(spec: InferencePoolSpec, preset: engines.ContainerPreset, revision: str) -> list[Any]:
    env: list[dict[str, Any]] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "KLEAVE_ROLE", "value": spec.role},
        {"name": "KLEAVE_REVISION", "value": revision},
        {"name": "KLEAVE_PLAN", "value": f"{engines.PLAN_DIR}/{engines.PLAN_FILE}"},
    ]
    if is_ranked(spec):
        env.append(
            {
                "name": "KLEAVE_RANK",
                "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{POD_INDEX_LABEL}']"}},
            }
        )
    names = {item["name"] for item in env}
    for name, value in preset.env:
        if name not in names:
            env.append({"name": name, "value": value})
            names.add(name)
    for var in spec.env:  # the user's last, replacing a preset's value of the same name
        env = [item for item in env if item["name"] != var.name]
        env.append({"name": var.name, "value": var.value})
    return env


def pod_template(
    pool: Mapping[str, Any], spec: InferencePoolSpec, revision: str, deployment: str
) -> dict[str, Any]:
    preset = engines.worker_preset(
        engines.WorkerSpec(
            engine=spec.engine,
            topology=spec.topology,
            role=spec.role,
            model=spec.model,
            tensor=spec.parallelism.tensor,
            expert=spec.parallelism.expert,
            gpus=spec.gpus_per_replica,
            kv_backend=engines.resolve_kv_backend(spec.engine, spec.kv_backend),
            extra_args=tuple(spec.args),
            image=spec.image,
            router_host=f"{router_name(deployment)}.{pool['metadata']['namespace']}.svc",
        )
    )
    volumes: list[dict[str, Any]] = [
        {"name": PLAN_VOLUME, "configMap": {"name": plan_configmap_name(deployment, revision)}}
    ]
    mounts: list[dict[str, Any]] = [
        {"name": PLAN_VOLUME, "mountPath": engines.PLAN_DIR, "readOnly": True}
    ]
    if preset.shm:
        volumes.append({"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": SHM_VOLUME, "mountPath": "/dev/shm"})
    http = preset.ports[0].name
    container: dict[str, Any] = {
        "name": spec.role,
        "image": preset.image,
        "command": list(preset.command),
        "args": list(preset.args),
        "env": _env(spec, preset, revision),
        "ports": [{"name": p.name, "containerPort": p.port} for p in preset.ports],
        "resources": _resources(spec),
        "volumeMounts": mounts,
        "readinessProbe": {
            "httpGet": {"path": preset.readiness_path, "port": http},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        # Loading weights takes minutes; the startup probe holds the liveness probe off.
        "startupProbe": {
            "httpGet": {"path": preset.liveness_path, "port": http},
            "periodSeconds": 10,
            "failureThreshold": 180,
        },
        "livenessProbe": {
            "httpGet": {"path": preset.liveness_path, "port": http},
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
    }
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "affinity": _affinity(spec),
        "tolerations": _tolerations(spec),
        "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
        "enableServiceLinks": False,
    }
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    labels = pool_labels(pool, spec) | {LABEL_REVISION: revision}
    return {
        "metadata": {
            "labels": labels,
            "annotations": {
                ANNOTATION_REVISION: revision,
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(engines.metrics_port(preset).port),
                "prometheus.io/path": preset.metrics_path,
            },
        },
        "spec": pod_spec,
    }


def build_workload(pool: Mapping[str, Any], revision: str, replicas: int) -> dict[str, Any]:
    """The Deployment (or StatefulSet) running ``pool``'s workers at ``revision``."""
    spec = InferencePoolSpec.model_validate(pool["spec"])
    meta = pool["metadata"]
    deployment = meta["labels"].get(LABEL_DEPLOYMENT, meta["name"])
    name = workload_name(meta["name"], revision)
    labels = pool_labels(pool, spec) | {LABEL_REVISION: revision}
    body: dict[str, Any] = {
        "replicas": replicas,
        "selector": {"matchLabels": selector_labels(meta["name"], revision)},
        "template": pod_template(pool, spec, revision, deployment),
        "revisionHistoryLimit": 3,
    }
    if is_ranked(spec):
        kind = "StatefulSet"
        body |= {
            "serviceName": name,
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "RollingUpdate"},
        }
    else:
        kind = "Deployment"
        # Never below the desired capacity during a pool's own rollout: one extra replica
        # at a time (it needs one replica's GPUs free).
        body["strategy"] = {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
        }
    return {
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": {
            "name": name,
            "namespace": meta["namespace"],
            "labels": labels,
            "annotations": {ANNOTATION_REVISION: revision},
            "ownerReferences": [owner_reference(pool)],
        },
        "spec": body,
    }


def build_service(pool: Mapping[str, Any], revision: str) -> dict[str, Any]:
    """A headless Service per pool and revision: the router and peers see every worker."""
    spec = InferencePoolSpec.model_validate(pool["spec"])
    meta = pool["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": workload_name(meta["name"], revision),
            "namespace": meta["namespace"],
            "labels": pool_labels(pool, spec) | {LABEL_REVISION: revision},
            "ownerReferences": [owner_reference(pool)],
        },
        "spec": {
            "clusterIP": "None",
            "selector": selector_labels(meta["name"], revision),
            "ports": [
                {
                    "name": "http",
                    "port": engines.WORKER_PORT,
                    "targetPort": "http",
                    "protocol": "TCP",
                }
            ],
        },
    }
