"""Pure decisions of the sandbox controllers: pool plans, claims, lifetimes and status."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from kleave.api.agent_sandbox import AgentSandboxSpec
from kleave.api.sandbox_template import Lifetime, SandboxTemplateSpec
from kleave.operator.conditions import get_condition
from kleave.operator.naming import (
    ANNOTATION_CLAIM_SOURCE,
    ANNOTATION_CLAIMED_AT,
    ANNOTATION_CLAIMED_FROM,
    LABEL_SANDBOX,
    LABEL_TEMPLATE_HASH,
    LABEL_WARM_POOL,
)
from kleave.operator.sandbox_controllers import SandboxPods
from kleave.operator.sandbox_decisions import (
    claim_candidates,
    claim_patch,
    cold_start_reason,
    creation_estimate,
    deadlines,
    format_ms,
    plan_pool,
    sandbox_status,
    slim_sandbox_pod,
)

NOW = datetime(2026, 1, 2, 3, 4, 5, 500000, tzinfo=UTC)
POOL: dict[str, Any] = {
    "apiVersion": "kleave.dev/v1alpha1",
    "kind": "SandboxWarmPool",
    "metadata": {"name": "pool", "namespace": "ns", "uid": "p-uid", "generation": 3},
    "spec": {"templateRef": {"name": "t"}, "replicas": 3},
}
SANDBOX: dict[str, Any] = {
    "apiVersion": "kleave.dev/v1alpha1",
    "kind": "AgentSandbox",
    "metadata": {
        "name": "sbx",
        "namespace": "ns",
        "uid": "s-uid",
        "generation": 1,
        "creationTimestamp": "2026-01-02T03:04:05Z",
    },
    "spec": {"warmPoolRef": {"name": "pool"}},
}


def pod(
    name: str,
    *,
    hash_: str = "h1",
    ready: bool = True,
    created: str = "2026-01-02T03:00:00Z",
    phase: str = "Running",
    deleting: bool = False,
    rv: str = "10",
    pool: str | None = "pool",
    sandbox: str | None = None,
    annotations: dict[str, str] | None = None,
    unschedulable: bool = False,
) -> dict[str, Any]:
    labels = {LABEL_TEMPLATE_HASH: hash_}
    if pool:
        labels[LABEL_WARM_POOL] = pool
    if sandbox:
        labels[LABEL_SANDBOX] = sandbox
    conditions = [{"type": "Ready", "status": "True" if ready else "False"}]
    if unschedulable:
        phase = "Pending"
        conditions.append(
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/3 nodes are available",
            }
        )
    return slim_sandbox_pod(
        {
            "metadata": {
                "name": name,
                "namespace": "ns",
                "uid": f"uid-{name}",
                "resourceVersion": rv,
                "creationTimestamp": created,
                "deletionTimestamp": "2026-01-02T03:04:00Z" if deleting else None,
                "labels": labels,
                "annotations": annotations or {},
            },
            "spec": {
                "containers": [
                    {"name": "sandbox", "ports": [{"name": "runtime", "containerPort": 8080}]}
                ]
            },
            "status": {"phase": phase, "podIP": "10.0.0.7", "conditions": conditions},
        }
    )


def names(pods: list[Any]) -> list[str]:
    return [p["metadata"]["name"] for p in pods]


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


# -- warm pools -----------------------------------------------------------------------------


def test_an_empty_pool_creates_its_replicas() -> None:
    plan = plan_pool(
        pool=POOL, template_hash="h1", problem=None, pods=[], busy=(), claimed_total=7, now=NOW
    )
    assert plan.create == 3 and plan.delete == []
    status = plan.status
    assert status["replicas"] == 0 and status["readyReplicas"] == 0
    assert status["claimed"] == 7
    assert status["templateHash"] == "h1"
    assert status["observedGeneration"] == 3
    assert status["selector"] == "app.kubernetes.io/managed-by=kleave,kleave.dev/warm-pool=pool"
    cond = conditions(status)
    assert cond["Ready"]["status"] == "False"
    assert (cond["Progressing"]["status"], cond["Progressing"]["reason"]) == ("True", "Filling")
    assert cond["Degraded"]["status"] == "False"


def test_a_full_pool_is_ready_and_quiet() -> None:
    pods = [pod(f"p{i}") for i in range(3)]
    plan = plan_pool(
        pool=POOL, template_hash="h1", problem=None, pods=pods, busy=(), claimed_total=0, now=NOW
    )
    assert plan.create == 0 and plan.delete == []
    cond = conditions(plan.status)
    assert cond["Ready"]["status"] == "True"
    assert cond["Progressing"]["reason"] == "Complete"
    assert plan.status["readyReplicas"] == 3 and plan.status["replicas"] == 3
    assert plan.events == []  # readiness flips with every claim: no events for it


def test_surplus_goes_not_ready_first_then_newest_and_never_a_busy_pod() -> None:
    pods = [
        pod("old", created="2026-01-02T01:00:00Z"),
        pod("mid", created="2026-01-02T02:00:00Z"),
        pod("new", created="2026-01-02T03:00:00Z"),
        pod("newest", created="2026-01-02T03:30:00Z"),
        pod("starting", ready=False, created="2026-01-02T00:00:00Z"),
    ]
    plan = plan_pool(
        pool=POOL, template_hash="h1", problem=None, pods=pods, busy=(), claimed_total=0, now=NOW
    )
    assert names(plan.delete) == ["starting", "newest"]
    busy = plan_pool(
        pool=POOL,
        template_hash="h1",
        problem=None,
        pods=pods,
        busy={"newest"},
        claimed_total=0,
        now=NOW,
    )
    assert names(busy.delete) == ["starting"]


def test_a_template_change_creates_new_pods_first_and_retires_old_ones_as_new_become_ready() -> (
    None
):
    old = [pod(f"old{i}", hash_="h0") for i in range(3)]
    start = plan_pool(
        pool=POOL, template_hash="h1", problem=None, pods=old, busy=(), claimed_total=0, now=NOW
    )
    assert start.create == 3 and start.delete == []  # nothing old goes before new is ready
    assert conditions(start.status)["Progressing"]["reason"] == "RollingOut"
    assert start.status["readyReplicas"] == 3  # old pods can still be adopted meanwhile

    new = [pod("new0", ready=True), pod("new1", ready=False), pod("new2", ready=False)]
    middle = plan_pool(
        pool=POOL,
        template_hash="h1",
        problem=None,
        pods=[*old, *new],
        busy=(),
        claimed_total=0,
        now=NOW,
    )
    assert middle.create == 0 and len(middle.delete) == 1

    ready = [pod(f"new{i}") for i in range(3)]
    done = plan_pool(
        pool=POOL,
        template_hash="h1",
        problem=None,
        pods=[*old, *ready],
        busy=(),
        claimed_total=0,
        now=NOW,
    )
    assert sorted(names(done.delete)) == ["old0", "old1", "old2"]


def test_ended_pods_are_replaced_and_deleting_ones_ignored() -> None:
    pods = [pod("a"), pod("failed", phase="Failed"), pod("gone", deleting=True)]
    plan = plan_pool(
        pool=POOL, template_hash="h1", problem=None, pods=pods, busy=(), claimed_total=0, now=NOW
    )
    assert names(plan.delete) == ["failed"]
    assert plan.create == 2
    assert plan.status["replicas"] == 1


def test_a_missing_template_degrades_the_pool_and_touches_nothing() -> None:
    pods = [pod("a", hash_="h0"), pod("b", hash_="h0", phase="Failed")]
    plan = plan_pool(
        pool=POOL,
        template_hash=None,
        problem=("TemplateNotFound", "SandboxTemplate t does not exist in namespace ns"),
        pods=pods,
        busy=(),
        claimed_total=0,
        now=NOW,
    )
    assert plan.create == 0 and plan.delete == []
    degraded = conditions(plan.status)["Degraded"]
    assert (degraded["status"], degraded["reason"]) == ("True", "TemplateNotFound")
    assert [e.reason for e in plan.events] == ["TemplateNotFound"]
    assert "templateHash" not in plan.status


def test_unschedulable_pool_pods_degrade_the_pool() -> None:
    pods = [pod("a"), pod("b", unschedulable=True, ready=False)]
    plan = plan_pool(
        pool=POOL, template_hash="h1", problem=None, pods=pods, busy=(), claimed_total=0, now=NOW
    )
    degraded = conditions(plan.status)["Degraded"]
    assert degraded["reason"] == "Unschedulable" and "0/3 nodes" in degraded["message"]


# -- claims ---------------------------------------------------------------------------------


def test_claim_candidates_are_ready_unclaimed_current_hash_first_oldest_first() -> None:
    pods = [
        pod("c-new", created="2026-01-02T03:00:00Z"),
        pod("c-old", created="2026-01-02T01:00:00Z"),
        pod("stale-hash", hash_="h0", created="2026-01-01T00:00:00Z"),
        pod("not-ready", ready=False),
        pod("deleting", deleting=True),
        pod("busy"),
        pod("bound", sandbox="someone"),
    ]
    order = claim_candidates(pods, "h1", {"busy"})
    assert names(order) == ["c-old", "c-new", "stale-hash"]


def test_claim_patch_is_a_compare_and_swap_that_moves_the_pod_to_the_sandbox() -> None:
    patch = claim_patch(pod("p", rv="42"), SANDBOX, "pool", NOW)
    meta = patch["metadata"]
    assert meta["resourceVersion"] == "42"
    assert meta["labels"] == {LABEL_SANDBOX: "sbx", LABEL_WARM_POOL: None}
    assert meta["annotations"] == {
        ANNOTATION_CLAIM_SOURCE: "Warm",
        ANNOTATION_CLAIMED_FROM: "pool",
        ANNOTATION_CLAIMED_AT: "2026-01-02T03:04:05.500Z",
    }
    [owner] = meta["ownerReferences"]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("AgentSandbox", "s-uid", True)


def test_extra_environment_needs_a_cold_start() -> None:
    template = SandboxTemplateSpec.model_validate(
        {"image": "img", "env": [{"name": "A", "value": "1"}]}
    )
    same = AgentSandboxSpec.model_validate(
        {"warmPoolRef": {"name": "pool"}, "env": [{"name": "A", "value": "2"}]}
    )
    assert cold_start_reason(same, template) is None  # the template's value wins anyway
    extra = AgentSandboxSpec.model_validate(
        {"warmPoolRef": {"name": "pool"}, "env": [{"name": "TASK", "value": "1"}]}
    )
    reason = cold_start_reason(extra, template)
    assert reason is not None and "TASK" in reason
    bigger = AgentSandboxSpec.model_validate(
        {"warmPoolRef": {"name": "pool"}, "persistence": {"size": "20Gi"}}
    )
    reason = cold_start_reason(bigger, template)
    assert reason is not None and "spec.persistence" in reason
    same_volume = AgentSandboxSpec.model_validate(
        {"warmPoolRef": {"name": "pool"}, "persistence": {"enabled": True}}
    )
    assert cold_start_reason(same_volume, template) is None


# -- lifetimes ------------------------------------------------------------------------------


def test_deadlines_follow_max_lifetime_and_ttl() -> None:
    created = datetime(2026, 1, 1, tzinfo=UTC)
    lifetime = Lifetime(max_lifetime_seconds=60, ttl_seconds_after_finished=30)
    dl = deadlines(created, lifetime)
    assert dl.expires_at == created + timedelta(seconds=60)
    assert dl.delete_at == created + timedelta(seconds=90)
    assert deadlines(created, Lifetime(max_lifetime_seconds=0)) == type(dl)(None, None)


def test_creation_estimate_stays_within_the_second_the_api_server_names() -> None:
    stamp = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert creation_estimate(SANDBOX, None) == stamp
    seen = stamp + timedelta(milliseconds=120)
    assert creation_estimate(SANDBOX, seen) == seen
    late = stamp + timedelta(seconds=5)  # a lagging watch
    assert creation_estimate(SANDBOX, late) == stamp + timedelta(milliseconds=999)
    early = stamp - timedelta(seconds=1)  # clock skew
    assert creation_estimate(SANDBOX, early) == stamp


# -- status ---------------------------------------------------------------------------------


def _status(bound: dict[str, Any] | None, **kwargs: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "sandbox": SANDBOX,
        "pod": bound,
        "problem": None,
        "expires_at": NOW + timedelta(hours=1),
        "expired": False,
        "created": datetime(2026, 1, 2, 3, 4, 5, 100000, tzinfo=UTC),
        "runtime_port": 8080,
        "now": NOW,
    } | kwargs
    return sandbox_status(**args).status


def test_a_warm_claim_is_ready_with_its_claim_latency() -> None:
    claimed_at = "2026-01-02T03:04:05.142Z"
    warm = pod(
        "pool-x",
        pool=None,
        sandbox="sbx",
        annotations={ANNOTATION_CLAIM_SOURCE: "Warm", ANNOTATION_CLAIMED_AT: claimed_at},
    )
    status = _status(warm)
    assert status["phase"] == "Ready"
    assert status["podName"] == "pool-x"
    assert status["endpoint"] == "10.0.0.7:8080"
    assert status["templateHash"] == "h1"
    # From the creation estimate to the reconcile that saw it bound (after the patch).
    assert status["claim"] == {"source": "Warm", "claimedAt": claimed_at, "latencyMs": 400}
    assert status["expiresAt"] == "2026-01-02T04:04:05Z"
    assert conditions(status)["Ready"]["status"] == "True"


def test_a_cold_start_is_starting_then_ready_with_the_latency_it_was_first_seen_ready() -> None:
    annotations = {ANNOTATION_CLAIM_SOURCE: "Cold", ANNOTATION_CLAIMED_AT: format_ms(NOW)}
    starting = pod("sbx", pool=None, sandbox="sbx", ready=False, annotations=annotations)
    status = _status(starting)
    assert status["phase"] == "Starting" and status["endpoint"] is None
    assert status["claim"] == {"source": "Cold", "claimedAt": format_ms(NOW), "latencyMs": None}
    ready = pod("sbx", pool=None, sandbox="sbx", annotations=annotations)
    later = NOW + timedelta(seconds=2)
    status = _status(ready, now=later)
    assert status["claim"]["latencyMs"] == 2400
    # Once recorded, the latency stays what it was.
    recorded = SANDBOX | {"status": {"podName": "sbx", "claim": {"latencyMs": 2400}}}
    again = _status(ready, sandbox=recorded, now=later + timedelta(minutes=5))
    assert again["claim"]["latencyMs"] == 2400


def test_problems_without_a_pod_are_pending_or_failed() -> None:
    status = _status(None, problem=("WarmPoolNotFound", "SandboxWarmPool pool does not exist"))
    assert status["phase"] == "Pending"
    assert conditions(status)["Degraded"]["reason"] == "WarmPoolNotFound"
    lost = _status(None, problem=("PodLost", "pod x no longer exists"))
    assert lost["phase"] == "Failed"


def test_an_ended_or_unschedulable_pod() -> None:
    failed = _status(pod("sbx", pool=None, sandbox="sbx", phase="Failed", ready=False))
    assert failed["phase"] == "Failed"
    assert conditions(failed)["Degraded"]["reason"] == "PodLost"
    pending = _status(pod("sbx", pool=None, sandbox="sbx", ready=False, unschedulable=True))
    assert pending["phase"] == "Pending"
    assert conditions(pending)["Degraded"]["reason"] == "Unschedulable"


def test_an_expired_sandbox_is_terminating_without_a_pod() -> None:
    current = SANDBOX | {"status": {"podName": "p", "endpoint": "10.0.0.7:8080"}}
    status = _status(None, sandbox=current, expired=True)
    assert status["phase"] == "Terminating"
    assert status["podName"] is None and status["endpoint"] is None
    ready = get_condition(status["conditions"], "Ready")
    assert ready is not None and ready["reason"] == "Expired"


# -- the pod cache --------------------------------------------------------------------------


def test_pod_cache_ignores_updates_older_than_what_it_holds() -> None:
    cache = SandboxPods()
    claimed = pod("p", rv="12", pool=None, sandbox="sbx")
    cache.upsert(claimed)
    stale = pod("p", rv="11", pool="pool")  # a watch event from before the claim
    cache.upsert(stale)
    assert cache.in_pool("ns", "pool") == []
    assert names(cache.of_sandbox("ns", "sbx")) == ["p"]
    newer = pod("p", rv="13", pool=None, sandbox="sbx", ready=False)
    cache.upsert(newer)
    assert cache.get("ns", "p") == newer
    cache.remove(newer)
    assert len(cache) == 0 and cache.of_sandbox("ns", "sbx") == []
