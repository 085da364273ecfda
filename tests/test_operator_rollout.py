"""rollout.decide: the coordinated update of an InferenceDeployment, worked through by hand.

Pools and the router are plain dicts shaped as the API server returns them; only the fields
rollout reads are filled in (pool spec.replicas, status.revisions, status.conditions; the
router's revision annotation, generation, spec.replicas and rollout status).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kleave.api.inference_deployment import InferenceDeploymentSpec
from kleave.api.vocabulary import Role
from kleave.operator.conditions import get_condition
from kleave.operator.naming import ANNOTATION_REVISION
from kleave.operator.rollout import Event, Plan, PoolPlan, decide, transition_events

NOW = datetime(2026, 11, 1, 12, 0, 0, tzinfo=UTC)
EARLIER = "2026-11-01T11:00:00Z"
OLD = "rold123"  # the serving revision S
NEW = "rnew456"  # the plan revision R

Pools = dict[Role, dict[str, Any] | None]


def make_spec(**pool_overrides: dict[str, Any]) -> InferenceDeploymentSpec:
    """PD with prefill x2 and decode x3 (Static unless overridden), router x2."""
    pools: dict[str, Any] = {
        "prefill": {"gpuType": "H100-SXM", "replicas": 2},
        "decode": {"gpuType": "H100-SXM", "replicas": 3},
    }
    for role, extra in pool_overrides.items():
        pools[role] = pools[role] | extra
    return InferenceDeploymentSpec.model_validate(
        {"model": "org/model", "topology": "PD", "router": {"replicas": 2}, "pools": pools}
    )


def make_owner(status: dict[str, Any] | None = None, generation: int = 4) -> dict[str, Any]:
    owner: dict[str, Any] = {
        "apiVersion": "kleave.dev/v1alpha1",
        "kind": "InferenceDeployment",
        "metadata": {"name": "llm", "namespace": "ns", "uid": "u-1", "generation": generation},
        "spec": {},
    }
    if status is not None:
        owner["status"] = status
    return owner


def make_pool(
    replicas: int,
    ready: dict[str, int] | None = None,
    degraded: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """An InferencePool with ``ready`` replicas per revision and optionally Degraded=True."""
    conditions = []
    if degraded is not None:
        conditions.append(
            {
                "type": "Degraded",
                "status": "True",
                "reason": degraded[0],
                "message": degraded[1],
                "lastTransitionTime": EARLIER,
            }
        )
    return {
        "metadata": {"name": "x", "namespace": "ns", "generation": 1},
        "spec": {"replicas": replicas},
        "status": {
            "revisions": [
                {"revision": rev, "replicas": replicas, "readyReplicas": n}
                for rev, n in (ready or {}).items()
            ],
            "conditions": conditions,
        },
    }


def make_router(
    revision: str,
    *,
    replicas: int = 2,
    ready: int = 2,
    updated: int | None = None,
    total: int | None = None,
    generation: int = 3,
    observed: int = 3,
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "llm-router",
            "namespace": "ns",
            "generation": generation,
            "annotations": {ANNOTATION_REVISION: revision},
        },
        "spec": {"replicas": replicas},
        "status": {
            "observedGeneration": observed,
            "replicas": replicas if total is None else total,
            "updatedReplicas": replicas if updated is None else updated,
            "readyReplicas": ready,
        },
    }


def serving_status(revision: str, *, ready: bool = True, degraded: bool = False) -> dict[str, Any]:
    """The status a previous reconcile wrote while serving ``revision``."""
    return {
        "planRevision": revision,
        "servingRevision": revision,
        "conditions": [
            {
                "type": "Ready",
                "status": "True" if ready else "False",
                "reason": "Serving" if ready else "WaitingForPools",
                "message": "m",
                "lastTransitionTime": EARLIER,
            },
            {
                "type": "Degraded",
                "status": "True" if degraded else "False",
                "reason": "Unschedulable" if degraded else "AsExpected",
                "message": "m",
                "lastTransitionTime": EARLIER,
            },
        ],
    }


def run(
    *,
    pools: Pools,
    router: dict[str, Any] | None,
    status: dict[str, Any] | None = None,
    spec: InferenceDeploymentSpec | None = None,
    revision: str = NEW,
) -> Plan:
    return decide(
        owner=make_owner(status),
        spec=spec or make_spec(),
        revision=revision,
        pools=pools,
        router=router,
        now=NOW,
    )


def cond(plan: Plan, type_: str) -> dict[str, Any]:
    found = get_condition(plan.status["conditions"], type_)
    assert found is not None, f"no {type_} condition in {plan.status['conditions']}"
    return found


def reasons(plan: Plan) -> list[str]:
    return [event.reason for event in plan.events]


# -- initial create: the router waits for every pool -----------------------------------------


def test_initial_create_gates_router_at_zero_replicas() -> None:
    plan = run(pools={"prefill": None, "decode": None}, router=None, status=None)

    assert plan.router_replicas == 0
    assert plan.router_revision == NEW
    assert plan.serving_revision == NEW
    assert plan.keep_revisions == frozenset({NEW})
    assert plan.pools == {
        "prefill": PoolPlan(replicas=2, conditional=False, retain_revision=None),
        "decode": PoolPlan(replicas=3, conditional=False, retain_revision=None),
    }
    ready = cond(plan, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "WaitingForPools")
    assert "prefill (0/0 ready)" in ready["message"]
    assert "decode (0/0 ready)" in ready["message"]
    assert plan.status["planRevision"] == NEW
    assert plan.status["servingRevision"] == NEW
    assert plan.status["observedGeneration"] == 4
    assert plan.status["router"] == {"replicas": 0, "readyReplicas": 0}
    accepted = cond(plan, "Accepted")
    assert (accepted["status"], accepted["reason"]) == ("True", "SpecValid")
    # Nothing was ever Ready or Degraded, and no rollout started: no events yet.
    assert plan.events == []


def test_router_stays_at_zero_while_one_pool_has_no_ready_replica() -> None:
    pools: Pools = {"prefill": make_pool(2, {NEW: 2}), "decode": make_pool(3, {NEW: 0})}
    plan = run(pools=pools, router=make_router(NEW, replicas=0, ready=0), status=None)

    assert plan.router_replicas == 0
    ready = cond(plan, "Ready")
    assert ready["reason"] == "WaitingForPools"
    assert "decode (0/3 ready)" in ready["message"]
    assert "prefill" not in ready["message"]


def test_router_starts_once_every_pool_has_one_ready_replica() -> None:
    pools: Pools = {"prefill": make_pool(2, {NEW: 1}), "decode": make_pool(3, {NEW: 1})}
    plan = run(pools=pools, router=make_router(NEW, replicas=0, ready=0), status=None)

    assert plan.router_replicas == 2  # spec.router.replicas
    ready = cond(plan, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "WaitingForRouter")
    progressing = cond(plan, "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("True", "ReplicasNotReady")
    assert progressing["message"] == "pools not fully ready: prefill 1/2, decode 1/3"


def test_ready_router_emits_serving_event_and_reports_complete() -> None:
    pools: Pools = {"prefill": make_pool(2, {NEW: 2}), "decode": make_pool(3, {NEW: 3})}
    status = serving_status(NEW, ready=False)
    plan = run(pools=pools, router=make_router(NEW, ready=2), status=status)

    assert plan.router_replicas == 2
    ready = cond(plan, "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "Serving")
    assert NEW in ready["message"]
    assert ready["lastTransitionTime"] == "2026-11-01T12:00:00Z"  # False -> True at NOW
    assert Event("Normal", "Serving", ready["message"]) in plan.events
    progressing = cond(plan, "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("False", "Complete")
    assert plan.status["pools"]["decode"] == {
        "name": "llm-decode",
        "replicas": 3,
        "readyReplicas": 3,
        "summary": "3/3",
    }
    assert plan.status["router"] == {"replicas": 2, "readyReplicas": 2}


def test_ready_router_is_not_scaled_to_zero_when_a_pool_loses_its_replicas() -> None:
    pools: Pools = {"prefill": make_pool(2, {NEW: 0}), "decode": make_pool(3, {NEW: 3})}
    plan = run(pools=pools, router=make_router(NEW, ready=2), status=serving_status(NEW))

    assert plan.router_replicas == 2
    ready = cond(plan, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "WaitingForPools")
    assert Event("Warning", "NotReady", ready["message"]) in plan.events


def test_progressing_stays_true_while_the_router_is_starting() -> None:
    pools: Pools = {"prefill": make_pool(2, {NEW: 2}), "decode": make_pool(3, {NEW: 3})}
    plan = run(pools=pools, router=make_router(NEW, ready=0), status=None)

    assert cond(plan, "Ready")["reason"] == "WaitingForRouter"
    assert cond(plan, "Progressing")["status"] == "True"


def test_colocated_waits_only_for_the_decode_pool() -> None:
    spec = InferenceDeploymentSpec.model_validate(
        {"model": "m", "topology": "Colocated", "pools": {"decode": {"gpuType": "H20"}}}
    )
    plan = run(pools={"decode": make_pool(1, {NEW: 1})}, router=None, spec=spec)

    assert set(plan.pools) == {"decode"}
    assert plan.router_replicas == 1
    assert set(plan.status["pools"]) == {"decode"}


# -- a new plan revision: pools roll beside the serving one, then the router moves ------------


def test_new_revision_keeps_serving_revision_in_every_pool_and_router_on_it() -> None:
    pools: Pools = {
        "prefill": make_pool(2, {NEW: 0, OLD: 2}),
        "decode": make_pool(3, {NEW: 0, OLD: 3}),
    }
    plan = run(pools=pools, router=make_router(OLD), status=serving_status(OLD))

    assert plan.router_revision == OLD
    assert plan.router_replicas == 2
    assert plan.serving_revision == OLD
    assert plan.keep_revisions == frozenset({OLD, NEW})
    assert {role: p.retain_revision for role, p in plan.pools.items()} == {
        "prefill": OLD,
        "decode": OLD,
    }
    assert plan.status["planRevision"] == NEW
    assert plan.status["servingRevision"] == OLD
    started = [e for e in plan.events if e.reason == "RolloutStarted"]
    assert len(started) == 1
    assert started[0].type == "Normal"
    assert f"rolling out revision {NEW} beside {OLD}" in started[0].message
    progressing = cond(plan, "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("True", "RollingOut")
    assert f"ready at {NEW}: prefill 0/2, decode 0/3" in progressing["message"]
    # The old revision still serves: Ready does not flap during a rollout.
    ready = cond(plan, "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "Serving")
    assert ready["lastTransitionTime"] == EARLIER
    assert "NotReady" not in reasons(plan)


def test_rollout_started_is_reported_once() -> None:
    pools: Pools = {
        "prefill": make_pool(2, {NEW: 1, OLD: 2}),
        "decode": make_pool(3, {NEW: 0, OLD: 3}),
    }
    status = serving_status(OLD) | {"planRevision": NEW}  # a previous reconcile saw NEW
    plan = run(pools=pools, router=make_router(OLD), status=status)

    assert "RolloutStarted" not in reasons(plan)
    assert plan.router_revision == OLD


def test_router_waits_until_every_pool_is_fully_ready_at_new_revision() -> None:
    # prefill is complete at NEW, decode has 2 of 3: one pool short keeps the router on OLD.
    pools: Pools = {
        "prefill": make_pool(2, {NEW: 2, OLD: 2}),
        "decode": make_pool(3, {NEW: 2, OLD: 3}),
    }
    plan = run(pools=pools, router=make_router(OLD), status=serving_status(OLD))

    assert plan.router_revision == OLD
    assert plan.serving_revision == OLD


def test_router_template_moves_when_every_pool_is_ready_at_new_revision() -> None:
    pools: Pools = {
        "prefill": make_pool(2, {NEW: 2, OLD: 2}),
        "decode": make_pool(3, {NEW: 3, OLD: 3}),
    }
    plan = run(pools=pools, router=make_router(OLD), status=serving_status(OLD))

    assert plan.router_revision == NEW
    # The router Deployment still runs OLD: status does not switch yet, pools keep OLD.
    assert plan.serving_revision == OLD
    assert plan.status["servingRevision"] == OLD
    assert all(p.retain_revision == OLD for p in plan.pools.values())
    assert "RolloutComplete" not in reasons(plan)


def test_router_stays_on_new_revision_once_moved_even_if_a_pool_dips() -> None:
    # The router template is at NEW but its rollout is not complete; a decode pod at NEW
    # restarted. Moving back would be a second rollout: the router stays at NEW.
    pools: Pools = {
        "prefill": make_pool(2, {NEW: 2, OLD: 2}),
        "decode": make_pool(3, {NEW: 2, OLD: 3}),
    }
    router = make_router(NEW, updated=1, total=3, ready=2)
    plan = run(pools=pools, router=router, status=serving_status(OLD))

    assert plan.router_revision == NEW
    assert plan.serving_revision == OLD
    assert plan.keep_revisions == frozenset({OLD, NEW})


def test_complete_router_rollout_switches_serving_revision() -> None:
    pools: Pools = {
        "prefill": make_pool(2, {NEW: 2, OLD: 2}),
        "decode": make_pool(3, {NEW: 3, OLD: 3}),
    }
    plan = run(pools=pools, router=make_router(NEW), status=serving_status(OLD))

    assert plan.router_revision == NEW
    assert plan.serving_revision == NEW
    assert plan.status["servingRevision"] == NEW
    assert plan.keep_revisions == frozenset({NEW})
    assert all(p.retain_revision is None for p in plan.pools.values())
    assert Event("Normal", "RolloutComplete", f"the router serves plan revision {NEW}") in (
        plan.events
    )
    progressing = cond(plan, "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("False", "Complete")


@pytest.mark.parametrize(
    ("router", "why"),
    [
        (make_router(NEW, generation=4, observed=3), "controller has not seen the new template"),
        (make_router(NEW, updated=1), "a pod is still on the old template"),
        (make_router(NEW, ready=1), "a new pod is not ready"),
        (make_router(NEW, total=3), "an old pod is still running"),
        (make_router(OLD), "the Deployment is still annotated with the old revision"),
    ],
)
def test_incomplete_router_rollout_keeps_serving_revision(router: dict[str, Any], why: str) -> None:
    pools: Pools = {
        "prefill": make_pool(2, {NEW: 2, OLD: 2}),
        "decode": make_pool(3, {NEW: 3, OLD: 3}),
    }
    plan = run(pools=pools, router=router, status=serving_status(OLD))

    assert plan.router_revision == NEW, why
    assert plan.serving_revision == OLD, why
    assert "RolloutComplete" not in reasons(plan), why
    assert all(p.retain_revision == OLD for p in plan.pools.values()), why


def test_spec_reverted_mid_rollout_goes_back_to_serving_revision() -> None:
    # NEW was being rolled out; the spec went back to OLD: the plan revision is OLD again.
    pools: Pools = {
        "prefill": make_pool(2, {OLD: 2, NEW: 1}),
        "decode": make_pool(3, {OLD: 3, NEW: 0}),
    }
    status = serving_status(OLD) | {"planRevision": NEW}
    plan = run(pools=pools, router=make_router(OLD), status=status, revision=OLD)

    assert plan.router_revision == OLD
    assert plan.serving_revision == OLD
    assert plan.keep_revisions == frozenset({OLD})
    assert all(p.retain_revision is None for p in plan.pools.values())
    assert "RolloutStarted" in reasons(plan)  # planRevision changed NEW -> OLD


# -- who owns a pool's replicas ----------------------------------------------------------------


def test_static_pool_scaled_directly_is_reverted_with_an_event_on_the_pool() -> None:
    pools: Pools = {"prefill": make_pool(2, {NEW: 2}), "decode": make_pool(5, {NEW: 3})}
    plan = run(pools=pools, router=make_router(NEW), status=serving_status(NEW))

    assert plan.pools["decode"] == PoolPlan(replicas=3, conditional=False, retain_revision=None)
    reverted = [e for e in plan.events if e.reason == "ReplicasReverted"]
    assert len(reverted) == 1
    assert reverted[0].type == "Normal"
    assert reverted[0].on_pool == "decode"
    assert reverted[0].message.startswith("spec.replicas 5 -> 3: pool decode has scaling Static")
    assert "scaling: External" in reverted[0].message
    assert plan.status["pools"]["decode"]["replicas"] == 3


def test_static_pool_at_spec_replicas_gets_no_event() -> None:
    pools: Pools = {"prefill": make_pool(2, {NEW: 2}), "decode": make_pool(3, {NEW: 3})}
    plan = run(pools=pools, router=make_router(NEW), status=serving_status(NEW))

    assert "ReplicasReverted" not in reasons(plan)
    assert plan.pools["prefill"] == PoolPlan(2, False, None)


@pytest.mark.parametrize("scaling", ["External", "Planner"])
def test_externally_scaled_pool_keeps_live_replicas_conditionally(scaling: str) -> None:
    spec = make_spec(decode={"scaling": scaling})
    pools: Pools = {"prefill": make_pool(2, {NEW: 2}), "decode": make_pool(7, {NEW: 7})}
    plan = run(pools=pools, router=make_router(NEW), status=serving_status(NEW), spec=spec)

    assert plan.pools["decode"] == PoolPlan(replicas=7, conditional=True, retain_revision=None)
    assert plan.pools["prefill"] == PoolPlan(replicas=2, conditional=False, retain_revision=None)
    assert "ReplicasReverted" not in reasons(plan)
    assert plan.status["pools"]["decode"]["summary"] == "7/7"


def test_external_pool_not_yet_created_starts_at_spec_replicas() -> None:
    spec = make_spec(decode={"scaling": "External"})
    plan = run(pools={"prefill": None, "decode": None}, router=None, spec=spec)

    assert plan.pools["decode"] == PoolPlan(replicas=3, conditional=False, retain_revision=None)


# -- Degraded ----------------------------------------------------------------------------------


def test_degraded_pool_propagates_reason_and_message() -> None:
    pools: Pools = {
        "prefill": make_pool(2, {NEW: 2}),
        "decode": make_pool(3, {NEW: 0}, degraded=("Unschedulable", "pod d-0: 0/4 nodes")),
    }
    plan = run(pools=pools, router=make_router(NEW), status=serving_status(NEW))

    degraded = cond(plan, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "Unschedulable")
    assert degraded["message"] == "pool decode: pod d-0: 0/4 nodes"
    assert Event("Warning", "Unschedulable", "pool decode: pod d-0: 0/4 nodes") in plan.events


def test_two_degraded_pools_report_the_first_reason_and_both_messages() -> None:
    pools: Pools = {
        "prefill": make_pool(2, {NEW: 0}, degraded=("NoNodesForGPUType", "no H100")),
        "decode": make_pool(3, {NEW: 1}, degraded=("PoolNotReady", "1/3 ready")),
    }
    plan = run(pools=pools, router=None, status=None)

    degraded = cond(plan, "Degraded")
    assert degraded["reason"] == "NoNodesForGPUType"
    assert degraded["message"] == "prefill: no H100; decode: 1/3 ready"


def test_pool_degraded_false_is_not_propagated_and_recovery_is_reported() -> None:
    pool = make_pool(3, {NEW: 3})
    pool["status"]["conditions"] = [
        {"type": "Degraded", "status": "False", "reason": "AsExpected", "message": "ok"}
    ]
    pools: Pools = {"prefill": make_pool(2, {NEW: 2}), "decode": pool}
    plan = run(pools=pools, router=make_router(NEW), status=serving_status(NEW, degraded=True))

    degraded = cond(plan, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("False", "AsExpected")
    assert Event("Normal", "Recovered", "no longer degraded: no pool reports a problem") in (
        plan.events
    )


def test_steady_state_emits_no_events_and_keeps_transition_times() -> None:
    pools: Pools = {"prefill": make_pool(2, {NEW: 2}), "decode": make_pool(3, {NEW: 3})}
    status = serving_status(NEW)
    first = run(pools=pools, router=make_router(NEW), status=status)
    second = decide(
        owner=make_owner(first.status),
        spec=make_spec(),
        revision=NEW,
        pools=pools,
        router=make_router(NEW),
        now=NOW + timedelta(minutes=10),
    )

    assert second.events == []
    assert second.status == first.status


# -- transition_events -------------------------------------------------------------------------


def c(status: str, reason: str = "R", message: str = "msg") -> dict[str, Any]:
    return {"type": "X", "status": status, "reason": reason, "message": message}


@pytest.mark.parametrize(
    ("type_", "before", "after", "expected"),
    [
        ("Ready", None, c("True", "Serving"), [Event("Normal", "Serving", "msg")]),
        ("Ready", c("False"), c("True", "Serving"), [Event("Normal", "Serving", "msg")]),
        ("Ready", c("True"), c("False", "WaitingForPools"), [Event("Warning", "NotReady", "msg")]),
        ("Ready", None, c("False"), []),
        ("Ready", c("False", "A"), c("False", "B"), []),
        ("Ready", c("True", "Serving", "old"), c("True", "Serving", "new"), []),
        ("Degraded", None, c("True", "Unschedulable"), [Event("Warning", "Unschedulable", "msg")]),
        ("Degraded", c("True", "A"), c("True", "B"), [Event("Warning", "B", "msg")]),
        ("Degraded", c("True", "A", "x"), c("True", "A", "y"), []),
        (
            "Degraded",
            c("True"),
            c("False", "AsExpected", "fine"),
            [Event("Normal", "Recovered", "no longer degraded: fine")],
        ),
        ("Degraded", None, c("False", "AsExpected"), []),
        ("Progressing", None, c("True", "RollingOut"), []),
        ("Ready", c("True"), None, []),
    ],
)
def test_transition_events(
    type_: str,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    expected: list[Event],
) -> None:
    assert transition_events(type_, before, after) == expected
