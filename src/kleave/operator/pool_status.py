"""Pure decisions for one InferencePool: which workloads to keep, and its status.

The pool runs its current revision's workload at ``spec.replicas``, leaves the retained
revision's workload exactly as it is (the parent drops it once the router has moved), and
deletes workloads of any other revision.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kleave.api.inference_pool import GPU_PRODUCT_LABEL
from kleave.operator.conditions import get_condition
from kleave.operator.naming import LABEL_POOL, LABEL_REVISION
from kleave.operator.pool_builder import selector_string
from kleave.operator.rollout import ConditionWriter, Event

NOT_READY_GRACE_S = 300.0
"""How long a pool may have unready replicas (image pulls, weight loading) before it is
reported Degraded with reason PoolNotReady."""


def gpu_products(nodes: Iterable[Mapping[str, Any]]) -> Counter[str]:
    """Schedulable, Ready nodes per nvidia.com/gpu.product."""
    counts: Counter[str] = Counter()
    for node in nodes:
        product = node["metadata"].get("labels", {}).get(GPU_PRODUCT_LABEL)
        if not product or node.get("spec", {}).get("unschedulable"):
            continue
        ready = get_condition(node.get("status", {}).get("conditions"), "Ready")
        if ready is not None and ready.get("status") == "True":
            counts[product] += 1
    return counts


def unschedulable_message(pods: Sequence[Mapping[str, Any]]) -> str | None:
    """The scheduler's message for the first pending, unschedulable pod, if any."""
    for pod in pods:
        if pod["status"].get("phase") != "Pending" or pod["metadata"].get("deletionTimestamp"):
            continue
        cond = get_condition(pod["status"].get("conditions"), "PodScheduled")
        if cond and cond.get("status") == "False" and cond.get("reason") == "Unschedulable":
            return f"pod {pod['metadata']['name']}: {cond.get('message', '')}".strip()
    return None


def workload_revision(workload: Mapping[str, Any]) -> str | None:
    return (workload["metadata"].get("labels") or {}).get(LABEL_REVISION)


def _counts(workload: Mapping[str, Any] | None) -> tuple[int, int, int]:
    """(replicas, ready, updated) of a Deployment or StatefulSet, from its status."""
    if workload is None:
        return 0, 0, 0
    status = workload.get("status") or {}
    current = int(status.get("observedGeneration") or 0) >= int(
        workload["metadata"].get("generation") or 0
    )
    updated = int(status.get("updatedReplicas") or 0) if current else 0
    return int(status.get("replicas") or 0), int(status.get("readyReplicas") or 0), updated


@dataclass
class PoolDecision:
    revision: str
    replicas: int
    delete: list[Mapping[str, Any]]
    status: dict[str, Any]
    events: list[Event] = field(default_factory=list)


def decide(
    *,
    pool: Mapping[str, Any],
    workloads: Sequence[Mapping[str, Any]],
    pods: Sequence[Mapping[str, Any]],
    gpu_nodes: Counter[str],
    now: datetime,
) -> PoolDecision:
    spec = pool["spec"]
    revision: str = spec["revision"]
    retain = spec.get("retainRevision")
    replicas = int(spec.get("replicas") or 0)
    generation = pool["metadata"].get("generation")
    by_revision = {workload_revision(w): w for w in workloads}
    delete = [w for w in workloads if workload_revision(w) not in (revision, retain)]

    current = by_revision.get(revision)
    _, ready, updated = _counts(current)
    revisions = [
        {"revision": revision, "replicas": replicas, "readyReplicas": ready,
         "updatedReplicas": updated}
    ]  # fmt: skip
    if retain and retain != revision and retain in by_revision:
        old_replicas, old_ready, old_updated = _counts(by_revision[retain])
        revisions.append(
            {"revision": retain, "replicas": old_replicas, "readyReplicas": old_ready,
             "updatedReplicas": old_updated}
        )  # fmt: skip

    writer = ConditionWriter(
        list((pool.get("status") or {}).get("conditions") or []), generation, now
    )
    put = writer.put

    all_ready = ready >= replicas and updated >= replicas
    put(
        "Ready",
        all_ready,
        "AllReplicasReady" if all_ready else "ReplicasNotReady",
        f"{ready}/{replicas} replicas ready at revision {revision}",
    )
    progressing = not all_ready or len(revisions) > 1 or bool(delete)
    put(
        "Progressing",
        progressing,
        "RollingOut" if len(revisions) > 1 else ("Scaling" if progressing else "Complete"),
        f"{ready}/{replicas} ready, {updated} updated at revision {revision}"
        + (f"; revision {retain} kept until the router moves" if len(revisions) > 1 else ""),
    )

    gpu_type = spec["gpuType"]
    pending = unschedulable_message(pods)
    not_ready_since = get_condition(writer.conditions, "Ready")
    stuck = False
    if not all_ready and not_ready_since is not None:
        since = datetime.fromisoformat(str(not_ready_since["lastTransitionTime"]))
        stuck = (now - since).total_seconds() >= NOT_READY_GRACE_S
    if replicas > 0 and gpu_nodes.get(gpu_type, 0) == 0:
        put(
            "Degraded",
            True,
            "NoNodesForGPUType",
            f"no schedulable, Ready node has {GPU_PRODUCT_LABEL}={gpu_type}; add such nodes "
            f"or change spec.pools.{spec['role']}.gpuType (known: "
            f"{', '.join(sorted(gpu_nodes)) or 'none'})",
        )
    elif pending is not None:
        put("Degraded", True, "Unschedulable", pending)
    elif stuck:
        put(
            "Degraded",
            True,
            "PoolNotReady",
            f"only {ready}/{replicas} replicas ready for over {NOT_READY_GRACE_S:.0f}s",
        )
    else:
        put("Degraded", False, "AsExpected", "the pool's workers schedule and start")

    status: dict[str, Any] = {
        "replicas": replicas if current is None else _counts(current)[0],
        "readyReplicas": ready,
        "updatedReplicas": updated,
        "selector": selector_string({LABEL_POOL: pool["metadata"]["name"]}),
        "revisions": revisions,
        "conditions": writer.conditions,
    }
    if generation is not None:
        status["observedGeneration"] = generation
    return PoolDecision(
        revision=revision, replicas=replicas, delete=delete, status=status, events=writer.events
    )
