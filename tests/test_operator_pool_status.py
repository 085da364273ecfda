"""pool_status: which workloads an InferencePool keeps, and the status it reports."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kleave.operator.conditions import get_condition
from kleave.operator.naming import LABEL_POOL, LABEL_REVISION
from kleave.operator.pool_status import (
    NOT_READY_GRACE_S,
    PoolDecision,
    decide,
    gpu_products,
    unschedulable_message,
)
from kleave.operator.rollout import Event

T0 = datetime(2026, 11, 1, 12, 0, 0, tzinfo=UTC)
T0_TEXT = "2026-11-01T12:00:00Z"
REV = "rnew456"
OLD = "rold123"
H100 = Counter({"H100-SXM": 2})


def node(
    name: str,
    product: str | None = "H100-SXM",
    *,
    ready: str | None = "True",
    unschedulable: bool = False,
) -> dict[str, Any]:
    labels = {} if product is None else {"nvidia.com/gpu.product": product}
    conditions = [] if ready is None else [{"type": "Ready", "status": ready}]
    return {
        "metadata": {"name": name, "labels": labels},
        "spec": {"unschedulable": unschedulable},
        "status": {"conditions": conditions},
    }


def make_pool(
    replicas: int = 2,
    *,
    retain: str | None = None,
    conditions: list[dict[str, Any]] | None = None,
    gpu_type: str = "H100-SXM",
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "role": "decode",
        "gpuType": gpu_type,
        "replicas": replicas,
        "revision": REV,
    }
    if retain is not None:
        spec["retainRevision"] = retain
    return {
        "metadata": {"name": "llm-decode", "namespace": "ns", "generation": 7},
        "spec": spec,
        "status": {"conditions": conditions or []},
    }


def workload(
    revision: str | None,
    *,
    replicas: int = 2,
    ready: int = 2,
    updated: int | None = None,
    generation: int = 1,
    observed: int = 1,
    kind: str = "Deployment",
) -> dict[str, Any]:
    labels = {} if revision is None else {LABEL_REVISION: revision}
    return {
        "kind": kind,
        "metadata": {
            "name": f"llm-decode-{revision}",
            "labels": labels,
            "generation": generation,
        },
        "status": {
            "observedGeneration": observed,
            "replicas": replicas,
            "readyReplicas": ready,
            "updatedReplicas": replicas if updated is None else updated,
        },
    }


def pod(
    name: str,
    *,
    phase: str = "Pending",
    scheduled: dict[str, Any] | None = None,
    deleting: bool = False,
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "labels": {LABEL_POOL: "llm-decode"},
            "deletionTimestamp": "2026-11-01T12:00:00Z" if deleting else None,
        },
        "status": {"phase": phase, "conditions": [] if scheduled is None else [scheduled]},
    }


UNSCHEDULABLE = {
    "type": "PodScheduled",
    "status": "False",
    "reason": "Unschedulable",
    "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu.",
}


def not_ready_since(when: str) -> list[dict[str, Any]]:
    return [
        {
            "type": "Ready",
            "status": "False",
            "reason": "ReplicasNotReady",
            "message": "m",
            "lastTransitionTime": when,
        }
    ]


def run(
    pool: dict[str, Any] | None = None,
    workloads: list[dict[str, Any]] | None = None,
    pods: list[dict[str, Any]] | None = None,
    gpu_nodes: Counter[str] = H100,
    now: datetime = T0,
) -> PoolDecision:
    return decide(
        pool=pool or make_pool(),
        workloads=workloads if workloads is not None else [workload(REV)],
        pods=pods or [],
        gpu_nodes=gpu_nodes,
        now=now,
    )


def cond(decision: PoolDecision, type_: str) -> dict[str, Any]:
    found = get_condition(decision.status["conditions"], type_)
    assert found is not None
    return found


# -- nodes -------------------------------------------------------------------------------------


def test_gpu_products_counts_only_schedulable_ready_gpu_nodes() -> None:
    nodes = [
        node("a"),
        node("b"),
        node("cordoned", unschedulable=True),
        node("not-ready", ready="False"),
        node("unknown", ready="Unknown"),
        node("no-conditions", ready=None),
        node("cpu-only", product=None),
        node("empty-label", product=""),
        node("h20", product="H20"),
    ]
    assert gpu_products(nodes) == Counter({"H100-SXM": 2, "H20": 1})


def test_gpu_products_of_nothing_is_empty() -> None:
    assert gpu_products([]) == Counter()


@pytest.mark.parametrize(
    ("nodes", "known"),
    [(Counter(), "none"), (Counter({"H20": 3, "A100": 1}), "A100, H20")],
)
def test_no_nodes_for_gpu_type_is_degraded_and_names_known_types(
    nodes: Counter[str], known: str
) -> None:
    decision = run(gpu_nodes=nodes)

    degraded = cond(decision, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "NoNodesForGPUType")
    assert "nvidia.com/gpu.product=H100-SXM" in degraded["message"]
    assert "spec.pools.decode.gpuType" in degraded["message"]
    assert degraded["message"].endswith(f"(known: {known})")
    assert Event("Warning", "NoNodesForGPUType", degraded["message"]) in decision.events


def test_pool_scaled_to_zero_needs_no_gpu_nodes() -> None:
    decision = run(
        pool=make_pool(0), workloads=[workload(REV, replicas=0, ready=0)], gpu_nodes=Counter()
    )

    assert cond(decision, "Degraded")["status"] == "False"
    assert cond(decision, "Ready")["status"] == "True"


# -- pods --------------------------------------------------------------------------------------


def test_pending_unschedulable_pod_makes_the_pool_degraded() -> None:
    pods = [
        pod("running", phase="Running"),
        pod("llm-decode-x-1", scheduled=UNSCHEDULABLE),
    ]
    decision = run(workloads=[workload(REV, ready=1)], pods=pods)

    degraded = cond(decision, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "Unschedulable")
    assert degraded["message"] == (
        "pod llm-decode-x-1: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
    )


def test_no_nodes_wins_over_unschedulable() -> None:
    decision = run(pods=[pod("p", scheduled=UNSCHEDULABLE)], gpu_nodes=Counter())

    assert cond(decision, "Degraded")["reason"] == "NoNodesForGPUType"


@pytest.mark.parametrize(
    "other",
    [
        pod("deleting", scheduled=UNSCHEDULABLE, deleting=True),
        pod("scheduled-pending", scheduled={"type": "PodScheduled", "status": "True"}),
        pod("gated", scheduled=UNSCHEDULABLE | {"reason": "SchedulingGated"}),
        pod("running", phase="Running", scheduled=UNSCHEDULABLE),
        pod("no-conditions"),
    ],
)
def test_pods_that_are_not_unschedulable_are_ignored(other: dict[str, Any]) -> None:
    assert unschedulable_message([other]) is None


def test_first_unschedulable_pod_is_reported() -> None:
    pods = [
        pod("a", phase="Running"),
        pod("b", scheduled=UNSCHEDULABLE | {"message": "first"}),
        pod("c", scheduled=UNSCHEDULABLE | {"message": "second"}),
    ]
    assert unschedulable_message(pods) == "pod b: first"


# -- readiness over time -----------------------------------------------------------------------


def test_unready_pool_within_grace_is_not_degraded() -> None:
    pool = make_pool(conditions=not_ready_since(T0_TEXT))
    now = T0 + timedelta(seconds=NOT_READY_GRACE_S - 1)
    decision = run(pool=pool, workloads=[workload(REV, ready=1)], now=now)

    ready = cond(decision, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ReplicasNotReady")
    assert ready["lastTransitionTime"] == T0_TEXT
    degraded = cond(decision, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("False", "AsExpected")


def test_unready_pool_past_grace_is_degraded_pool_not_ready() -> None:
    pool = make_pool(conditions=not_ready_since(T0_TEXT))
    now = T0 + timedelta(seconds=NOT_READY_GRACE_S)
    decision = run(pool=pool, workloads=[workload(REV, ready=1)], now=now)

    degraded = cond(decision, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "PoolNotReady")
    assert degraded["message"] == "only 1/2 replicas ready for over 300s"


def test_pool_that_just_became_unready_gets_the_full_grace() -> None:
    ready_before = [
        {
            "type": "Ready",
            "status": "True",
            "reason": "AllReplicasReady",
            "message": "m",
            "lastTransitionTime": "2026-10-01T00:00:00Z",
        }
    ]
    decision = run(pool=make_pool(conditions=ready_before), workloads=[workload(REV, ready=1)])

    assert cond(decision, "Ready")["lastTransitionTime"] == T0_TEXT
    assert cond(decision, "Degraded")["reason"] == "AsExpected"
    assert Event("Warning", "NotReady", "1/2 replicas ready at revision rnew456") in (
        decision.events
    )


def test_new_pool_is_not_degraded_on_its_first_reconcile() -> None:
    decision = run(workloads=[], now=T0 + timedelta(days=1))

    assert cond(decision, "Ready")["status"] == "False"
    assert cond(decision, "Degraded")["status"] == "False"


# -- workloads and revisions -------------------------------------------------------------------


def test_delete_list_keeps_current_and_retained_revisions() -> None:
    current, retained = workload(REV), workload(OLD)
    stale = [workload("rabc000"), workload("rdef111", kind="StatefulSet")]
    decision = run(pool=make_pool(retain=OLD), workloads=[stale[0], current, retained, stale[1]])

    assert decision.delete == stale
    assert decision.revision == REV
    assert decision.replicas == 2


def test_without_retain_revision_the_old_workload_is_deleted() -> None:
    old = workload(OLD)
    decision = run(pool=make_pool(), workloads=[workload(REV), old])

    assert decision.delete == [old]
    assert [r["revision"] for r in decision.status["revisions"]] == [REV]
    progressing = cond(decision, "Progressing")
    assert progressing["status"] == "True"  # something still to clean up


def test_revisions_list_current_first_then_retained() -> None:
    workloads = [
        workload(OLD, replicas=3, ready=3, updated=3),
        workload(REV, replicas=2, ready=1, updated=2),
    ]
    decision = run(pool=make_pool(4, retain=OLD), workloads=workloads)

    assert decision.status["revisions"] == [
        {"revision": REV, "replicas": 4, "readyReplicas": 1, "updatedReplicas": 2},
        {"revision": OLD, "replicas": 3, "readyReplicas": 3, "updatedReplicas": 3},
    ]
    progressing = cond(decision, "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("True", "RollingOut")
    assert f"revision {OLD} kept until the router moves" in progressing["message"]


@pytest.mark.parametrize("retain", [REV, "rgone00"])
def test_retain_equal_to_current_or_absent_adds_no_revision(retain: str) -> None:
    decision = run(pool=make_pool(retain=retain))

    assert [r["revision"] for r in decision.status["revisions"]] == [REV]


def test_all_ready_pool_reports_ready_and_complete() -> None:
    decision = run(pool=make_pool(conditions=not_ready_since("2026-11-01T11:00:00Z")))

    ready = cond(decision, "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "AllReplicasReady")
    assert ready["message"] == "2/2 replicas ready at revision rnew456"
    assert ready["observedGeneration"] == 7
    progressing = cond(decision, "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("False", "Complete")
    assert decision.events == [Event("Normal", "AllReplicasReady", ready["message"])]
    assert decision.delete == []


def test_stale_observed_generation_counts_no_updated_replicas() -> None:
    decision = run(workloads=[workload(REV, ready=2, generation=5, observed=4)])

    assert decision.status["updatedReplicas"] == 0
    assert cond(decision, "Ready")["status"] == "False"
    progressing = cond(decision, "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("True", "Scaling")


def test_status_fields_for_scale_subresource() -> None:
    decision = run(workloads=[workload(REV, replicas=3, ready=2, updated=3)])

    status = decision.status
    assert status["selector"] == "kleave.dev/inference-pool=llm-decode"
    assert status["replicas"] == 3  # what the workload runs, for /scale
    assert status["readyReplicas"] == 2
    assert status["updatedReplicas"] == 3
    assert status["observedGeneration"] == 7


def test_status_replicas_before_the_workload_exists_is_the_desired_count() -> None:
    decision = run(workloads=[])

    assert decision.status["replicas"] == 2
    assert decision.status["readyReplicas"] == 0
