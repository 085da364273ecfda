"""Pure decisions for one InferenceDeployment: replicas, revisions, router gating, status.

Coordinated update (why no request crosses plan revisions):

1. A spec change that alters the serving plan yields a new revision R. Every pool gets
   ``spec.revision = R`` and keeps the serving revision S as ``retainRevision``: its pool
   controller starts R's workers beside S's and leaves S's untouched.
2. While any pool's R workers are not all ready, the router stays on S, so it only ever
   pairs S prefill with S decode.
3. When every pool is ready at R, the router's template moves to R; each router pod serves
   one revision, so during the router's own rolling update old pods send to S and new pods to R.
4. When the router rollout is complete, ``status.servingRevision = R`` and pools drop S.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from kleave.api.inference_deployment import InferenceDeploymentSpec
from kleave.api.vocabulary import Role
from kleave.operator.conditions import get_condition, set_condition
from kleave.operator.naming import ANNOTATION_REVISION


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str
    on_pool: Role | None = None  # None: the InferenceDeployment itself


@dataclass(frozen=True)
class PoolPlan:
    """What kleave applies for one pool."""

    replicas: int
    conditional: bool  # apply only if the pool has not changed since read (External/Planner)
    retain_revision: str | None


@dataclass
class Plan:
    pools: dict[Role, PoolPlan]
    router_revision: str
    router_replicas: int
    serving_revision: str
    keep_revisions: frozenset[str]
    status: dict[str, Any]
    events: list[Event] = field(default_factory=list)


def revision_ready(pool: Mapping[str, Any] | None, revision: str) -> tuple[int, int]:
    """(ready, desired) replicas of ``pool`` at ``revision``, from its status."""
    if pool is None:
        return 0, 0
    desired = int(pool.get("spec", {}).get("replicas") or 0)
    for entry in pool.get("status", {}).get("revisions") or ():
        if entry.get("revision") == revision:
            return int(entry.get("readyReplicas") or 0), desired
    return 0, desired


def _router_complete(router: Mapping[str, Any] | None, revision: str) -> bool:
    if router is None:
        return False
    meta, spec, status = router["metadata"], router.get("spec", {}), router.get("status", {})
    if (meta.get("annotations") or {}).get(ANNOTATION_REVISION) != revision:
        return False
    want = int(spec.get("replicas") or 0)
    return (
        int(status.get("observedGeneration") or 0) >= int(meta.get("generation") or 0)
        and int(status.get("updatedReplicas") or 0) >= want
        and int(status.get("readyReplicas") or 0) >= want
        and int(status.get("replicas") or 0) == want
    )


def _pool_replicas(
    role: Role, spec: InferenceDeploymentSpec, current: Mapping[str, Any] | None
) -> tuple[PoolPlan, Event | None]:
    template = spec.pools.defined()[role]
    live = None if current is None else current.get("spec", {}).get("replicas")
    if template.scaling == "Static" or live is None:
        event = None
        if current is not None and template.scaling == "Static" and live != template.replicas:
            event = Event(
                "Normal",
                "ReplicasReverted",
                f"spec.replicas {live} -> {template.replicas}: pool {role} has scaling Static, "
                f"so its replicas come from the InferenceDeployment's spec.pools.{role}.replicas;"
                f" set it there, or set scaling: External to scale this pool directly",
                on_pool=role,
            )
        return PoolPlan(template.replicas, False, None), event
    # External / Planner: the pool's /scale owns replicas; assert the value it has.
    return PoolPlan(int(live), True, None), None


def transition_events(
    type_: str, before: Mapping[str, Any] | None, after: Mapping[str, Any] | None
) -> list[Event]:
    """Events worth a human's attention when a Ready or Degraded condition changes."""
    if after is None or type_ not in ("Ready", "Degraded"):
        return []
    same = before is not None and all(before.get(k) == after.get(k) for k in ("status", "reason"))
    if same:
        return []
    ok = after.get("status") == "True"
    reason, message = str(after.get("reason")), str(after.get("message"))
    if type_ == "Degraded":
        if ok:
            return [Event("Warning", reason, message)]
        if before is not None and before.get("status") == "True":
            return [Event("Normal", "Recovered", f"no longer degraded: {message}")]
        return []
    if ok:
        return [Event("Normal", reason, message)]
    if before is not None and before.get("status") == "True":
        return [Event("Warning", "NotReady", message)]
    return []


class ConditionWriter:
    """Sets conditions one by one and collects the events their transitions deserve."""

    def __init__(
        self, conditions: list[dict[str, Any]], generation: int | None, now: datetime
    ) -> None:
        self.conditions = conditions
        self.events: list[Event] = []
        self._generation = generation
        self._now = now

    def put(self, type_: str, ok: bool, reason: str, message: str) -> None:
        before = get_condition(self.conditions, type_)
        self.conditions = set_condition(
            self.conditions, type=type_, status="True" if ok else "False", reason=reason,
            message=message, generation=self._generation, now=self._now,
        )  # fmt: skip
        self.events.extend(transition_events(type_, before, get_condition(self.conditions, type_)))


def decide(
    *,
    owner: Mapping[str, Any],
    spec: InferenceDeploymentSpec,
    revision: str,
    pools: Mapping[Role, Mapping[str, Any] | None],
    router: Mapping[str, Any] | None,
    now: datetime,
) -> Plan:
    """Everything one reconcile of an InferenceDeployment applies and reports."""
    status = owner.get("status") or {}
    generation = owner["metadata"].get("generation")
    serving = status.get("servingRevision") or revision
    roles = list(spec.pools.defined())
    events: list[Event] = []

    # Which revision the router should serve.
    router_current = (
        None
        if router is None
        else router["metadata"].get("annotations", {}).get(ANNOTATION_REVISION)
    )
    target_ready = all(
        ready >= max(desired, 1)
        for ready, desired in (revision_ready(pools.get(role), revision) for role in roles)
    )
    moving = revision in (serving, router_current) or target_ready
    router_revision = revision if moving else serving
    if serving != revision and router_revision == revision and _router_complete(router, revision):
        events.append(
            Event("Normal", "RolloutComplete", f"the router serves plan revision {revision}")
        )
        serving = revision

    # Startup order: the router starts once every pool has a ready replica.
    waiting = []
    for role in roles:
        ready, desired = revision_ready(pools.get(role), router_revision)
        if ready < 1:
            waiting.append(f"{role} ({ready}/{desired} ready)")
    router_ready = int((router or {}).get("status", {}).get("readyReplicas") or 0)
    router_replicas = spec.router.replicas if not waiting or router_ready > 0 else 0

    pool_plans: dict[Role, PoolPlan] = {}
    for role in roles:
        plan, event = _pool_replicas(role, spec, pools.get(role))
        retain = serving if serving != revision else None
        pool_plans[role] = PoolPlan(plan.replicas, plan.conditional, retain)
        if event is not None:
            events.append(event)

    if status.get("planRevision") not in (None, revision):
        events.append(
            Event(
                "Normal",
                "RolloutStarted",
                f"serving plan changed: rolling out revision {revision} beside {serving}; the "
                f"router moves when every pool is ready at {revision}",
            )
        )

    pool_status: dict[str, Any] = {}
    degraded: list[tuple[str, str, str]] = []
    for role in roles:
        current = pools.get(role)
        ready, _ = revision_ready(current, revision)
        desired = pool_plans[role].replicas
        name = f"{owner['metadata']['name']}-{role}"
        pool_status[role] = {
            "name": name,
            "replicas": desired,
            "readyReplicas": ready,
            "summary": f"{ready}/{desired}",
        }
        cond = get_condition((current or {}).get("status", {}).get("conditions"), "Degraded")
        if cond is not None and cond.get("status") == "True":
            degraded.append((role, str(cond.get("reason")), str(cond.get("message"))))

    writer = ConditionWriter(list(status.get("conditions") or []), generation, now)
    put = writer.put

    put(
        "Accepted",
        True,
        "SpecValid",
        f"model {spec.model}, engine {spec.engine}, topology {spec.topology}",
    )
    if waiting:
        put(
            "Ready",
            False,
            "WaitingForPools",
            "the router waits for a ready replica of every pool: " + ", ".join(waiting),
        )
    elif router_ready < 1:
        put(
            "Ready",
            False,
            "WaitingForRouter",
            "every pool has a ready replica; the router is starting",
        )
    else:
        put("Ready", True, "Serving", f"the router serves plan revision {router_revision}")

    behind = [
        f"{role} {pool_status[role]['summary']}"
        for role in roles
        if pool_status[role]["readyReplicas"] != pool_status[role]["replicas"]
    ]
    if serving != revision:
        put(
            "Progressing",
            True,
            "RollingOut",
            f"rolling out plan revision {revision} (router on {router_revision}); ready at "
            f"{revision}: " + ", ".join(f"{r} {pool_status[r]['summary']}" for r in roles),
        )
    elif behind:
        put("Progressing", True, "ReplicasNotReady", "pools not fully ready: " + ", ".join(behind))
    elif router_ready < router_replicas:
        put("Progressing", True, "RouterStarting",
            f"router {router_ready}/{router_replicas} ready")  # fmt: skip
    else:
        put("Progressing", False, "Complete", "every pool and the router are at the desired state")

    if degraded:
        _, reason, _ = degraded[0]
        detail = "; ".join(f"{r}: {m}" for r, _, m in degraded)
        put("Degraded", True, reason, f"pool {detail}" if len(degraded) == 1 else detail)
    else:
        put("Degraded", False, "AsExpected", "no pool reports a problem")

    new_status: dict[str, Any] = {
        "planRevision": revision,
        "servingRevision": serving,
        "pools": pool_status,
        "router": {"replicas": router_replicas, "readyReplicas": router_ready},
        "conditions": writer.conditions,
    }
    if generation is not None:
        new_status["observedGeneration"] = generation
    return Plan(
        pools=pool_plans,
        router_revision=router_revision,
        router_replicas=router_replicas,
        serving_revision=serving,
        keep_revisions=frozenset({revision, serving, router_revision}),
        status=new_status,
        events=events + writer.events,
    )
