"""Pure builders: serving plan and revision, InferencePools, plan ConfigMap, router, workloads."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

from kleave.api.inference_deployment import InferenceDeploymentSpec
from kleave.api.inference_pool import InferencePoolSpec
from kleave.api.vocabulary import Role
from kleave.operator import engines
from kleave.operator.deployment_builder import (
    build_plan_configmap,
    build_pool,
    build_router,
    build_router_service,
)
from kleave.operator.naming import LABEL_POOL, LABEL_REVISION, REVISION_LENGTH
from kleave.operator.pool_builder import POD_INDEX_LABEL, build_service, build_workload
from kleave.operator.serving_plan import build_plan, plan_contract, revision_of

OWNER: dict[str, Any] = {
    "apiVersion": "kleave.dev/v1alpha1",
    "kind": "InferenceDeployment",
    "metadata": {"name": "llm", "namespace": "ns", "uid": "infd-uid", "generation": 1},
}
REV = "rabc123"

Doc = dict[str, Any]


def pd_doc(engine: str = "builtin") -> Doc:
    return {
        "model": "org/model",
        "engine": engine,
        "topology": "PD",
        "pools": {
            "prefill": {"gpuType": "H100-SXM", "replicas": 2},
            "decode": {
                "gpuType": "H100-SXM",
                "replicas": 3,
                "gpusPerReplica": 2,
                "parallelism": {"tensor": 2},
                "resources": {"requests": {"cpu": 8, "memory": "64Gi"}},
            },
        },
    }


def pdaf_doc() -> Doc:
    return {
        "model": "org/moe",
        "topology": "PDAF",
        "pools": {
            "prefill": {"gpuType": "H100-SXM"},
            "attention": {"gpuType": "H100-SXM"},
            "ffn": {
                "gpuType": "H20",
                "replicas": 4,
                "gpusPerReplica": 8,
                "parallelism": {"expert": 8},
            },
        },
    }


def spec_of(doc: Doc) -> InferenceDeploymentSpec:
    return InferenceDeploymentSpec.model_validate(doc)


def revision(doc: Doc) -> str:
    return revision_of(plan_contract(spec_of(doc)))


def pool_object(
    doc: Doc, role: Role, *, retain: str | None = None, replicas: int = 2
) -> dict[str, Any]:
    """The InferencePool kleave writes, as read back from the API server (with a uid)."""
    spec = spec_of(doc)
    pool = build_pool(
        OWNER,
        spec,
        role,
        spec.pools.defined()[role],
        revision=REV,
        retain_revision=retain,
        replicas=replicas,
    )
    pool["metadata"]["uid"] = f"{role}-uid"
    return pool


def container(obj: dict[str, Any]) -> dict[str, Any]:
    containers = obj["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: dict[str, Any] = containers[0]
    return result


def env_of(obj: dict[str, Any]) -> dict[str, Any]:
    """Env by name; fails if a name appears twice."""
    env = container(obj)["env"]
    names = [item["name"] for item in env]
    assert len(names) == len(set(names)), f"duplicate env names: {names}"
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in env}


# -- serving plan and revision -----------------------------------------------------------------


def edit(path: str, value: Any) -> Callable[[Doc], None]:
    """Set ``value`` at a dotted ``path`` of a spec document."""

    def apply(doc: Doc) -> None:
        *parents, leaf = path.split(".")
        target = doc
        for key in parents:
            target = target.setdefault(key, {})
        target[leaf] = value

    return apply


PLAN_CHANGES = {
    "kvTransfer.backend": edit("kvTransfer.backend", "tcp"),
    "parallelism": edit("pools.decode.parallelism", {"tensor": 1}),
    "gpusPerReplica": edit("pools.prefill.gpusPerReplica", 2),
    "args": edit("pools.prefill.args", ["--max-num-seqs", "64"]),
    "model": edit("model", "org/other-model"),
    "pool image": edit("pools.decode.image", "registry.example/worker:2"),
    "image": edit("image", "registry.example/worker:2"),
}

NON_PLAN_CHANGES = {
    "replicas": edit("pools.decode.replicas", 9),
    "minReplicas/maxReplicas": edit("pools.decode.maxReplicas", 20),
    "resources": edit("pools.decode.resources", {"limits": {"memory": "96Gi"}}),
    "env": edit("pools.prefill.env", [{"name": "LOG_LEVEL", "value": "debug"}]),
    "gpuType": edit("pools.prefill.gpuType", "H20"),
    "nodeSelector": edit("pools.prefill.nodeSelector", {"zone": "a"}),
    "tolerations": edit("pools.prefill.tolerations", [{"key": "k", "operator": "Exists"}]),
    "scaling": edit("pools.decode.scaling", "External"),
    "router": edit("router", {"replicas": 3, "env": [{"name": "A", "value": "b"}]}),
    "kvTransfer.backend auto -> engine default": edit("kvTransfer.backend", "nccl"),
}


@pytest.mark.parametrize("change", list(PLAN_CHANGES), ids=list(PLAN_CHANGES))
def test_plan_field_change_makes_a_new_revision(change: str) -> None:
    before = pd_doc()
    after = copy.deepcopy(before)
    PLAN_CHANGES[change](after)

    assert revision(after) != revision(before)


@pytest.mark.parametrize("change", list(NON_PLAN_CHANGES), ids=list(NON_PLAN_CHANGES))
def test_change_outside_the_plan_keeps_the_revision(change: str) -> None:
    before = pd_doc()
    after = copy.deepcopy(before)
    NON_PLAN_CHANGES[change](after)
    assert spec_of(after) != spec_of(before)  # the edit really changed the spec

    assert revision(after) == revision(before)


def test_revision_is_short_lowercase_and_never_a_number() -> None:
    rev = revision(pd_doc())

    assert len(rev) == REVISION_LENGTH
    assert rev.startswith("r")
    assert rev == rev.lower() and rev.isalnum()
    InferencePoolSpec.model_validate(pool_object(pd_doc(), "decode")["spec"] | {"revision": rev})


def test_build_plan_points_every_pool_at_its_revision() -> None:
    rev, plan = build_plan(spec_of(pd_doc()), name="llm", namespace="ns")

    assert rev == revision(pd_doc())
    assert plan["revision"] == rev
    assert plan["kvTransfer"] == {"backend": "nccl"}
    assert plan["pools"]["decode"]["service"] == f"llm-decode-{rev}"
    assert plan["pools"]["decode"]["url"] == f"http://llm-decode-{rev}.ns.svc:8000"
    assert plan["pools"]["prefill"]["url"] == f"http://llm-prefill-{rev}.ns.svc:8000"
    assert plan["pools"]["decode"]["gpusPerReplica"] == 2
    assert plan["router"]["url"] == "http://llm-router.ns.svc:8000"
    assert {"from": "prefill", "to": "decode", "via": "kv-cache"} in plan["routes"]


# -- InferencePool and plan ConfigMap ----------------------------------------------------------


def test_build_pool_carries_the_plan_and_validates_as_a_pool_spec() -> None:
    pool = pool_object(pd_doc(), "decode", retain="rold000", replicas=5)

    assert pool["metadata"]["name"] == "llm-decode"
    assert pool["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "kleave.dev/v1alpha1",
            "kind": "InferenceDeployment",
            "name": "llm",
            "uid": "infd-uid",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    spec = InferencePoolSpec.model_validate(pool["spec"])
    assert spec.replicas == 5  # what rollout decided, not the template's 3
    assert spec.role == "decode"
    assert spec.revision == REV
    assert spec.retain_revision == "rold000"
    assert spec.kv_backend == "nccl"  # auto resolved for builtin
    assert spec.image == engines.default_image("builtin", "worker")
    assert spec.gpus_per_replica == 2


@pytest.mark.parametrize("retain", [None, REV])
def test_build_pool_omits_retain_revision_when_none_or_current(retain: str | None) -> None:
    pool = pool_object(pd_doc(), "decode", retain=retain)

    assert "retainRevision" not in pool["spec"]


def test_pool_image_prefers_pool_then_deployment_then_engine() -> None:
    doc = pd_doc("vllm")
    doc["image"] = "registry.example/all:1"
    doc["pools"]["decode"]["image"] = "registry.example/decode:1"

    assert pool_object(doc, "decode")["spec"]["image"] == "registry.example/decode:1"
    assert pool_object(doc, "prefill")["spec"]["image"] == "registry.example/all:1"
    assert pool_object(pd_doc("vllm"), "prefill")["spec"]["image"] == "vllm/vllm-openai:v0.31.0"


def test_plan_configmap_is_immutable_and_holds_the_plan() -> None:
    rev, plan = build_plan(spec_of(pd_doc()), name="llm", namespace="ns")
    cm = build_plan_configmap(OWNER, rev, plan)

    assert cm["immutable"] is True
    assert cm["metadata"]["name"] == f"llm-plan-{rev}"
    assert cm["metadata"]["labels"][LABEL_REVISION] == rev
    assert cm["metadata"]["ownerReferences"][0]["controller"] is True
    assert json.loads(cm["data"][engines.PLAN_FILE]) == plan


# -- router --------------------------------------------------------------------------------------


def test_router_is_pinned_to_one_revision() -> None:
    router = build_router(OWNER, spec_of(pd_doc()), revision=REV, replicas=2)

    assert router["metadata"]["annotations"] == {"kleave.dev/revision": REV}
    template = router["spec"]["template"]
    assert template["metadata"]["annotations"] == {"kleave.dev/revision": REV}
    assert template["metadata"]["labels"][LABEL_REVISION] == REV
    assert template["spec"]["volumes"] == [
        {"name": "serving-plan", "configMap": {"name": f"llm-plan-{REV}"}}
    ]
    assert container(router)["volumeMounts"] == [
        {"name": "serving-plan", "mountPath": engines.PLAN_DIR, "readOnly": True}
    ]
    assert env_of(router)["KLEAVE_REVISION"] == REV
    assert router["spec"]["replicas"] == 2
    assert router["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert router["metadata"]["ownerReferences"][0]["uid"] == "infd-uid"


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_router_urls_point_at_the_pinned_revision(engine: str) -> None:
    router = build_router(OWNER, spec_of(pd_doc(engine)), revision=REV, replicas=1)
    args = container(router)["args"]

    prefill = f"http://llm-prefill-{REV}.ns.svc:8000"
    decode = f"http://llm-decode-{REV}.ns.svc:8000"
    assert args[args.index("--prefill") + 1] == prefill
    assert args[args.index("--decode") + 1] == decode
    assert [a for a in args if a.startswith("http://")] == [prefill, decode]


def test_colocated_router_targets_the_decode_pool_of_its_revision() -> None:
    doc = {
        "model": "m",
        "engine": "vllm",
        "topology": "Colocated",
        "pools": {"decode": {"gpuType": "H20"}},
    }
    router = build_router(OWNER, spec_of(doc), revision=REV, replicas=1)

    args = container(router)["args"]
    assert args[:2] == ["--worker-urls", f"http://llm-decode-{REV}.ns.svc:8000"]


def test_router_user_env_replaces_kleave_value() -> None:
    doc = pd_doc() | {
        "router": {"env": [{"name": "KLEAVE_PLAN", "value": "/x"}, {"name": "A", "value": "1"}]}
    }
    env = env_of(build_router(OWNER, spec_of(doc), revision=REV, replicas=1))

    assert env["KLEAVE_PLAN"] == "/x"
    assert env["A"] == "1"
    assert env["KLEAVE_REVISION"] == REV


@pytest.mark.parametrize(
    ("engine", "ports"),
    [
        ("builtin", [("http", engines.ROUTER_PORT)]),
        ("vllm", [("http", engines.ROUTER_PORT), ("metrics", engines.ROUTER_METRICS_PORT)]),
    ],
)
def test_router_service_selects_the_router_pods_on_their_ports(
    engine: str, ports: list[tuple[str, int]]
) -> None:
    spec = spec_of(pd_doc(engine))
    router = build_router(OWNER, spec, revision=REV, replicas=1)
    service = build_router_service(OWNER, spec)

    selector = service["spec"]["selector"]
    assert selector == router["spec"]["selector"]["matchLabels"]
    assert selector.items() <= router["spec"]["template"]["metadata"]["labels"].items()
    assert service["metadata"]["name"] == "llm-router"
    assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == ports
    container_ports = {p["name"]: p["containerPort"] for p in container(router)["ports"]}
    for port in service["spec"]["ports"]:
        assert container_ports[port["targetPort"]] == port["port"]


# -- pool workloads ------------------------------------------------------------------------------


def test_decode_pool_runs_as_a_deployment_pinned_to_its_gpu_type() -> None:
    workload = build_workload(pool_object(pd_doc(), "decode"), REV, 3)

    assert workload["kind"] == "Deployment"
    assert workload["metadata"]["name"] == f"llm-decode-{REV}"
    assert workload["metadata"]["namespace"] == "ns"
    assert workload["spec"]["replicas"] == 3
    assert workload["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    pod_spec = workload["spec"]["template"]["spec"]
    terms = pod_spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"] == [
        {
            "matchExpressions": [
                {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["H100-SXM"]}
            ]
        }
    ]
    assert "nodeSelector" not in pod_spec
    assert "KLEAVE_RANK" not in env_of(workload)


def test_gpu_resource_equals_gpus_per_replica() -> None:
    workload = build_workload(pool_object(pd_doc(), "decode"), REV, 1)

    assert container(workload)["resources"] == {
        "requests": {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "2"},
        "limits": {"nvidia.com/gpu": "2"},
    }


def test_gpu_taint_is_tolerated_beside_the_users_tolerations() -> None:
    doc = pd_doc()
    doc["pools"]["decode"]["tolerations"] = [
        {"key": "dedicated", "value": "infer", "effect": "NoExecute", "tolerationSeconds": 30}
    ]
    doc["pools"]["decode"]["nodeSelector"] = {"zone": "a"}
    pod_spec = build_workload(pool_object(doc, "decode"), REV, 1)["spec"]["template"]["spec"]

    assert pod_spec["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {
            "key": "dedicated",
            "operator": "Equal",
            "value": "infer",
            "effect": "NoExecute",
            "tolerationSeconds": 30,
        },
    ]
    assert pod_spec["nodeSelector"] == {"zone": "a"}


def test_workload_selector_matches_its_pods_and_pins_the_revision() -> None:
    workload = build_workload(pool_object(pd_doc(), "decode"), REV, 1)

    selector = workload["spec"]["selector"]["matchLabels"]
    assert selector == {LABEL_POOL: "llm-decode", LABEL_REVISION: REV}
    template = workload["spec"]["template"]["metadata"]
    assert selector.items() <= template["labels"].items()
    assert template["labels"]["app.kubernetes.io/managed-by"] == "kleave"
    assert template["labels"]["kleave.dev/inference-deployment"] == "llm"
    assert template["annotations"]["kleave.dev/revision"] == REV
    assert template["annotations"]["prometheus.io/port"] == str(engines.WORKER_PORT)


def test_workload_mounts_the_plan_of_its_revision() -> None:
    workload = build_workload(pool_object(pd_doc(), "decode"), REV, 1)

    volumes = workload["spec"]["template"]["spec"]["volumes"]
    assert {"name": "serving-plan", "configMap": {"name": f"llm-plan-{REV}"}} in volumes
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in volumes  # 2 GPUs per replica
    env = env_of(workload)
    assert env["KLEAVE_REVISION"] == REV
    assert env["KLEAVE_ROLE"] == "decode"
    assert env["KLEAVE_PLAN"] == engines.PLAN_PATH


def test_single_gpu_worker_gets_no_shm_volume() -> None:
    workload = build_workload(pool_object(pd_doc(), "prefill"), REV, 1)

    names = [v["name"] for v in workload["spec"]["template"]["spec"]["volumes"]]
    assert names == ["serving-plan"]


def test_workload_and_service_are_owned_by_the_pool() -> None:
    pool = pool_object(pd_doc(), "decode")
    expected = [
        {
            "apiVersion": "kleave.dev/v1alpha1",
            "kind": "InferencePool",
            "name": "llm-decode",
            "uid": "decode-uid",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]

    assert build_workload(pool, REV, 1)["metadata"]["ownerReferences"] == expected
    assert build_service(pool, REV)["metadata"]["ownerReferences"] == expected


def test_ffn_pool_runs_as_a_statefulset_with_ranks() -> None:
    pool = pool_object(pdaf_doc(), "ffn", replicas=4)
    workload = build_workload(pool, REV, 4)
    service = build_service(pool, REV)

    assert workload["kind"] == "StatefulSet"
    assert workload["spec"]["serviceName"] == service["metadata"]["name"] == f"llm-ffn-{REV}"
    assert workload["spec"]["podManagementPolicy"] == "Parallel"
    assert "strategy" not in workload["spec"]
    assert env_of(workload)["KLEAVE_RANK"] == {
        "fieldRef": {"fieldPath": f"metadata.labels['{POD_INDEX_LABEL}']"}
    }
    assert container(workload)["resources"]["limits"]["nvidia.com/gpu"] == "8"


def test_pool_service_is_headless_and_selects_its_revisions_workers() -> None:
    pool = pool_object(pd_doc(), "prefill")
    service = build_service(pool, REV)
    workload = build_workload(pool, REV, 1)

    assert service["spec"]["clusterIP"] == "None"
    assert service["metadata"]["name"] == workload["metadata"]["name"]
    assert service["spec"]["selector"] == workload["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"] == [
        {"name": "http", "port": engines.WORKER_PORT, "targetPort": "http", "protocol": "TCP"}
    ]
    port_names = [p["name"] for p in container(workload)["ports"]]
    assert "http" in port_names


def test_user_env_overrides_a_preset_value() -> None:
    doc = pd_doc("vllm")
    doc["pools"]["prefill"]["env"] = [
        {"name": "VLLM_NIXL_SIDE_CHANNEL_HOST", "value": "10.0.0.9"},
        {"name": "EXTRA", "value": "1"},
    ]
    overridden = env_of(build_workload(pool_object(doc, "prefill"), REV, 1))
    default = build_workload(pool_object(pd_doc("vllm"), "prefill"), REV, 1)

    assert overridden["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "10.0.0.9"
    assert overridden["EXTRA"] == "1"
    assert env_of(default)["VLLM_NIXL_SIDE_CHANNEL_HOST"] == engines.POD_IP_REF
    # $(POD_IP) only expands from a variable defined earlier in the list.
    names = [item["name"] for item in container(default)["env"]]
    assert names.index("POD_IP") < names.index("VLLM_NIXL_SIDE_CHANNEL_HOST")
