"""The serving plan: what the workers and the router must agree on, and its revision.

The plan names every pool, which pool talks to which (and how: HTTP, KV-cache transfer, or
per-layer activations), the KV-transfer backend, each pool's parallelism, image and engine
arguments. Two workers can only cooperate if they run the same plan, so its hash is the
*revision*: a spec change that alters the plan starts a coordinated rollout of every pool
(see docs/inference-deployment.md), while changes outside it (replicas, resources, env, GPU
type, scheduling) roll only the pool they touch.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from kleave.api.inference_deployment import InferenceDeploymentSpec
from kleave.api.inference_pool import PoolTemplate
from kleave.operator import engines
from kleave.operator.naming import (
    REVISION_LENGTH,
    pool_name,
    pool_service_url,
    router_name,
    service_url,
    workload_name,
)


def pool_image(spec: InferenceDeploymentSpec, pool: PoolTemplate) -> str:
    """The worker image: the pool's own, else the deployment's, else the engine's."""
    return pool.image or spec.image or engines.default_image(spec.engine, "worker")


def routes(spec: InferenceDeploymentSpec) -> list[dict[str, str]]:
    """Which pool talks to which, and over what."""
    if spec.topology == "Colocated":
        return [{"from": "router", "to": "decode", "via": "http"}]
    if spec.topology == "PD":
        return [
            {"from": "router", "to": "prefill", "via": "http"},
            {"from": "router", "to": "decode", "via": "http"},
            {"from": "prefill", "to": "decode", "via": "kv-cache"},
        ]
    return [
        {"from": "router", "to": "prefill", "via": "http"},
        {"from": "router", "to": "attention", "via": "http"},
        {"from": "prefill", "to": "attention", "via": "kv-cache"},
        {"from": "attention", "to": "ffn", "via": "activations"},
        {"from": "ffn", "to": "attention", "via": "activations"},
    ]


def plan_contract(spec: InferenceDeploymentSpec) -> dict[str, Any]:
    """The fields every pool must agree on; their hash is the revision."""
    pools: dict[str, Any] = {}
    for role, pool in spec.pools.defined().items():
        pools[role] = {
            "gpusPerReplica": pool.gpus_per_replica,
            "parallelism": {"tensor": pool.parallelism.tensor, "expert": pool.parallelism.expert},
            "image": pool_image(spec, pool),
            "args": list(pool.args),
        }
    return {
        "model": spec.model,
        "engine": spec.engine,
        "topology": spec.topology,
        "kvTransfer": {
            "backend": engines.resolve_kv_backend(spec.engine, spec.kv_transfer.backend)
        },
        "pools": pools,
        "routes": routes(spec),
    }


def revision_of(contract: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(contract, sort_keys=True).encode()).hexdigest()
    # Hex digits only, but never all digits: a revision must not read as a number in YAML.
    return "r" + digest[: REVISION_LENGTH - 1]


def build_plan(
    spec: InferenceDeploymentSpec, *, name: str, namespace: str
) -> tuple[str, dict[str, Any]]:
    """The revision and the full plan document the workers read from their ConfigMap."""
    contract = plan_contract(spec)
    revision = revision_of(contract)
    pools = {}
    for role, entry in contract["pools"].items():
        pools[role] = entry | {
            "service": workload_name(pool_name(name, role), revision),
            "url": pool_service_url(name, namespace, role, revision, engines.WORKER_PORT),
        }
    plan = contract | {
        "apiVersion": "kleave.dev/v1alpha1",
        "kind": "ServingPlan",
        "deployment": name,
        "namespace": namespace,
        "revision": revision,
        "pools": pools,
        "router": {
            "service": router_name(name),
            "url": service_url(router_name(name), namespace, engines.ROUTER_PORT),
        },
    }
    return revision, plan
