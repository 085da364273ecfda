"""Pure decisions of the sandbox controllers: warm-pool plans, claims, lifetimes, status.

Everything here reads plain dicts (the controllers' cached objects) and returns what to do;
:mod:`kleave.operator.sandbox_controllers` does the I/O. Pods are slimmed to the fields read
here (:func:`slim_sandbox_pod`), which keeps thousands of cached sandbox pods small.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from kleave.api.agent_sandbox import AgentSandboxSpec
from kleave.api.sandbox_template import Lifetime, SandboxTemplateSpec
from kleave.operator.conditions import get_condition
from kleave.operator.naming import (
    ANNOTATION_CLAIM_SOURCE,
    ANNOTATION_CLAIMED_AT,
    ANNOTATION_CLAIMED_FROM,
    ANNOTATION_RESTORED,
    ANNOTATION_TOKEN_NONCE,
    LABEL_SANDBOX,
    LABEL_TEMPLATE_HASH,
    LABEL_WARM_POOL,
    owner_reference,
)
from kleave.operator.pool_status import unschedulable_message
from kleave.operator.rollout import ConditionWriter, Event
from kleave.operator.sandbox_builder import (
    CONTAINER_NAME,
    PERSIST_VOLUME,
    pool_selector,
    selector_string,
)
from kleave.operator.sandbox_pause import RUN, Intent, persistence_of

_KEPT_ANNOTATIONS = (
    ANNOTATION_CLAIM_SOURCE,
    ANNOTATION_CLAIMED_AT,
    ANNOTATION_CLAIMED_FROM,
    ANNOTATION_RESTORED,
    ANNOTATION_TOKEN_NONCE,
)

Obj = Mapping[str, Any]


# -- pods -----------------------------------------------------------------------------------


def slim_sandbox_pod(pod: Obj) -> dict[str, Any]:
    """The fields of a sandbox pod the controllers read (claims need resourceVersion)."""
    meta = pod.get("metadata", {})
    spec = pod.get("spec", {})
    status = pod.get("status", {})
    annotations = meta.get("annotations") or {}
    port = spec.get("runtimePort")  # an already slimmed pod
    for container in spec.get("containers") or ():
        if container.get("name") == CONTAINER_NAME:
            for item in container.get("ports") or ():
                port = item.get("containerPort")
                break
    claim = spec.get("claimName")
    for volume in spec.get("volumes") or ():
        if volume.get("name") == PERSIST_VOLUME:
            claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"),
            "creationTimestamp": meta.get("creationTimestamp"),
            "deletionTimestamp": meta.get("deletionTimestamp"),
            "labels": dict(meta.get("labels") or {}),
            "annotations": {k: annotations[k] for k in _KEPT_ANNOTATIONS if k in annotations},
            "ownerReferences": [dict(ref) for ref in meta.get("ownerReferences") or ()],
        },
        "spec": {"nodeName": spec.get("nodeName"), "runtimePort": port, "claimName": claim},
        "status": {
            "phase": status.get("phase"),
            "podIP": status.get("podIP"),
            "conditions": [
                {k: c.get(k) for k in ("type", "status", "reason", "message")}
                for c in status.get("conditions") or ()
            ],
        },
    }


def is_ready(pod: Obj) -> bool:
    ready = get_condition(pod.get("status", {}).get("conditions"), "Ready")
    return ready is not None and ready.get("status") == "True"


def is_live(pod: Obj) -> bool:
    """Not being deleted, and not finished (a sandbox pod that ended cannot serve)."""
    if pod["metadata"].get("deletionTimestamp"):
        return False
    return pod.get("status", {}).get("phase") not in ("Failed", "Succeeded")


def label(pod: Obj, key: str) -> str | None:
    value = (pod["metadata"].get("labels") or {}).get(key)
    return None if value is None else str(value)


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def format_ms(moment: datetime) -> str:
    """RFC 3339 in UTC with milliseconds: claim times are compared to the millisecond."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _age_key(pod: Obj) -> tuple[str, str]:
    return (str(pod["metadata"].get("creationTimestamp") or ""), str(pod["metadata"]["name"]))


def _removal_order(pods: Sequence[Obj]) -> list[Obj]:
    """Which pods to give up first: the not ready, then the newest (the oldest have been
    warm longest, so they are the safest to hand out)."""
    waiting = sorted((p for p in pods if not is_ready(p)), key=_age_key)
    ready = sorted((p for p in pods if is_ready(p)), key=_age_key, reverse=True)
    return [*waiting, *ready]


# -- warm pools -----------------------------------------------------------------------------


@dataclass
class PoolPlan:
    """One reconcile of a warm pool: pods to create and delete, and the status to write."""

    create: int
    delete: list[Obj]
    status: dict[str, Any]
    events: list[Event] = field(default_factory=list)


def plan_pool(
    *,
    pool: Obj,
    template_hash: str | None,
    problem: tuple[str, str] | None,
    pods: Sequence[Obj],
    busy: Collection[str],
    claimed_total: int,
    now: datetime,
) -> PoolPlan:
    """Keep ``spec.replicas`` unclaimed pods of the template's current hash.

    ``pods`` are the pool's unclaimed pods (labelled with the pool); ``busy`` names pods a
    claim is in flight for, which are never deleted. A template change rolls the pool: the
    new pods are created first and old-hash pods go only as new ones become ready (until
    then an old ready pod can still be adopted). With the template missing or not accepted
    (``problem``), nothing is created and nothing is deleted.
    """
    meta = pool["metadata"]
    replicas = int((pool.get("spec") or {}).get("replicas") or 0)
    generation = meta.get("generation")
    live = [p for p in pods if is_live(p)]
    finished = [
        p for p in pods if not p["metadata"].get("deletionTimestamp") and not is_live(p)
    ]  # ended pods are replaced (a pooled pod has no state worth keeping)
    current = sorted(
        (p for p in live if template_hash and label(p, LABEL_TEMPLATE_HASH) == template_hash),
        key=_age_key,
    )
    old = sorted((p for p in live if p not in current), key=_age_key)
    ready_current = [p for p in current if is_ready(p)]
    ready_all = [p for p in live if is_ready(p)]

    create = 0
    delete: list[Obj] = []
    if problem is None and template_hash is not None:
        delete.extend(finished)
        create = max(0, replicas - len(current))
        if len(current) > replicas:
            delete.extend(_removal_order(current)[: len(current) - replicas])
        keep_old = max(0, replicas - len(ready_current))
        if len(old) > keep_old:
            delete.extend(_removal_order(old)[: len(old) - keep_old])
    delete = [p for p in delete if p["metadata"]["name"] not in busy]

    writer = ConditionWriter(
        list((pool.get("status") or {}).get("conditions") or []), generation, now
    )
    ready_ok = problem is None and len(ready_current) >= replicas
    writer.put(
        "Ready",
        ready_ok,
        "AllReplicasReady" if ready_ok else "ReplicasNotReady",
        f"{len(ready_current)}/{replicas} unclaimed sandboxes ready"
        + (f" at template hash {template_hash}" if template_hash else ""),
    )
    rolling = bool(old) and problem is None
    progressing = problem is None and (rolling or len(current) != replicas or not ready_ok)
    writer.put(
        "Progressing",
        progressing,
        "RollingOut" if rolling else ("Filling" if progressing else "Complete"),
        f"{len(current)} of {replicas} sandboxes at template hash {template_hash}"
        + (f", {len(old)} of an older hash being replaced" if rolling else ""),
    )
    unschedulable = unschedulable_message(live)
    if problem is not None:
        writer.put("Degraded", True, problem[0], problem[1])
    elif unschedulable is not None:
        writer.put("Degraded", True, "Unschedulable", unschedulable)
    else:
        writer.put("Degraded", False, "AsExpected", "the pool's sandboxes schedule and start")

    status: dict[str, Any] = {
        "replicas": len(live),
        "readyReplicas": len(ready_all),
        "claimed": claimed_total,
        "selector": selector_string(pool_selector(meta["name"])),
        "conditions": writer.conditions,
    }
    if template_hash is not None:
        status["templateHash"] = template_hash
    if generation is not None:
        status["observedGeneration"] = generation
    # Readiness flips with every claim and refill: only Degraded changes are worth events.
    events = [e for e in writer.events if e.reason not in ("AllReplicasReady", "NotReady")]
    return PoolPlan(create=create, delete=delete, status=status, events=events)


# -- claims ---------------------------------------------------------------------------------


def claim_candidates(
    pods: Sequence[Obj], template_hash: str | None, busy: Collection[str]
) -> list[Obj]:
    """Ready, unclaimed pool pods to try, in order: the current hash first, oldest first.

    Pods of an older hash (a roll in progress) come after: they were built from the
    template as it was moments ago, and adopting one beats a cold start.
    """
    ready = [
        p
        for p in pods
        if is_live(p)
        and is_ready(p)
        and p["metadata"]["name"] not in busy
        and label(p, LABEL_SANDBOX) is None
        and p["metadata"].get("resourceVersion")
    ]
    return sorted(
        ready, key=lambda p: (label(p, LABEL_TEMPLATE_HASH) != template_hash, _age_key(p))
    )


def claim_patch(pod: Obj, sandbox: Obj, pool: str, now: datetime) -> dict[str, Any]:
    """The JSON merge patch that binds ``pod`` to ``sandbox``, only if the pod is unchanged.

    ``metadata.resourceVersion`` makes it a compare-and-swap: if anyone (another worker,
    another operator replica, the pool deleting it) changed the pod since it was read, the
    API server answers 409 and nothing is written. In one write the pod gains the sandbox
    label, loses the pool label (it leaves the pool's selector), and gets the sandbox as its
    only owner (merge patch replaces the list), so deleting the sandbox deletes the pod.
    """
    return {
        "metadata": {
            "resourceVersion": pod["metadata"]["resourceVersion"],
            "labels": {LABEL_SANDBOX: sandbox["metadata"]["name"], LABEL_WARM_POOL: None},
            "annotations": {
                ANNOTATION_CLAIM_SOURCE: "Warm",
                ANNOTATION_CLAIMED_FROM: pool,
                ANNOTATION_CLAIMED_AT: format_ms(now),
            },
            "ownerReferences": [owner_reference(sandbox)],
        }
    }


def cold_start_reason(sandbox: AgentSandboxSpec, template: SandboxTemplateSpec) -> str | None:
    """Why a sandbox naming a warm pool cannot adopt a warm pod, if it cannot.

    A running pod's environment cannot change, so variables the sandbox adds to the
    template's need a pod started for it; nor can its volumes, so a sandbox whose persistence
    differs from the template's (no volume, another size or class) gets its own pod too.
    """
    taken = {e.name for e in template.env}
    extra = sorted(e.name for e in sandbox.env if e.name not in taken)
    if extra:
        return f"spec.env adds {', '.join(extra)}, which the pool's running pods cannot get"
    if persistence_of(sandbox, template) != template.persistence:
        return "spec.persistence differs from the template's, and a pod's volumes are fixed"
    return None


# -- lifetimes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Deadlines:
    """When a sandbox ends (its pod is deleted), and when the AgentSandbox itself goes."""

    expires_at: datetime | None
    delete_at: datetime | None


def deadlines(created: datetime, lifetime: Lifetime) -> Deadlines:
    if lifetime.max_lifetime_seconds <= 0:
        return Deadlines(None, None)
    expires = created + timedelta(seconds=lifetime.max_lifetime_seconds)
    return Deadlines(expires, expires + timedelta(seconds=lifetime.ttl_seconds_after_finished))


def creation_estimate(sandbox: Obj, first_seen: datetime | None) -> datetime:
    """When the sandbox was created, to the millisecond where possible.

    The API server stores creationTimestamp to the second. The operator's first sight of the
    object is later than the real creation but usually by milliseconds; kept within the
    second creationTimestamp names, it bounds the error of claim latencies to the watch delay.
    """
    stamp = parse_time(sandbox["metadata"].get("creationTimestamp"))
    if stamp is None:
        return first_seen or datetime.now(UTC)
    if first_seen is None:
        return stamp
    return min(max(first_seen, stamp), stamp + timedelta(milliseconds=999))


# -- AgentSandbox status --------------------------------------------------------------------


@dataclass
class SandboxView:
    """One AgentSandbox's status and the events its reconcile deserves."""

    status: dict[str, Any]
    events: list[Event] = field(default_factory=list)


def sandbox_status(
    *,
    sandbox: Obj,
    pod: Obj | None,
    problem: tuple[str, str] | None,
    expires_at: datetime | None,
    expired: bool,
    created: datetime,
    runtime_port: int | None,
    now: datetime,
    intent: Intent = RUN,
    lifecycle: Mapping[str, Any] | None = None,
    warning: tuple[str, str] | None = None,
) -> SandboxView:
    """The AgentSandbox's status from its pod (the pod's labels and annotations say how it
    was obtained, so this is right after an operator restart too).

    ``problem`` (reason, message): why there is no pod, e.g. TemplateNotFound; reasons
    ``InvalidSpec`` and ``PodLost`` are final (phase Failed), the others wait (Pending).
    ``intent`` says whether the sandbox should run (else it is Pausing while its pod exists,
    then Paused); ``lifecycle`` holds the status fields pause, resume and the idle clock keep
    (snapshot, auditHead, volumeClaimName, lastActivityTime, idlePausedAt, resumeRequest);
    ``warning`` is a Degraded reason that does not stop the sandbox (a failed snapshot keeps
    its pod running, an audit log that fails verification is reported, not hidden).
    """
    current = dict(sandbox.get("status") or {})
    generation = sandbox["metadata"].get("generation")
    writer = ConditionWriter(list(current.get("conditions") or []), generation, now)
    status: dict[str, Any] = {
        "expiresAt": None if expires_at is None else expires_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        **(lifecycle or {}),
    }
    if generation is not None:
        status["observedGeneration"] = generation

    def degraded_as_expected(message: str) -> None:
        if warning is not None:
            writer.put("Degraded", True, warning[0], warning[1])
        else:
            writer.put("Degraded", False, "AsExpected", message)

    if expired:
        status |= {"phase": "Terminating", "podName": None, "endpoint": None}
        writer.put(
            "Ready", False, "Expired", f"maxLifetimeSeconds ended it at {status['expiresAt']}"
        )
        status["conditions"] = writer.conditions
        return SandboxView(status, writer.events)

    if not intent.run:
        reason = intent.pause_reason or "Requested"
        why = (
            "idleTimeoutSeconds passed without a runtime call"
            if reason == "IdleTimeout"
            else ("spec.mode is Paused")
        )
        snapshot = status.get("snapshot") or current.get("snapshot") or {}
        if pod is not None:
            name = pod["metadata"]["name"]
            status |= {"phase": "Pausing", "podName": name, "endpoint": None}
            writer.put("Ready", False, "Pausing", f"{why}: snapshotting, then pod {name} goes")
            writer.put("Paused", False, "Pausing", f"{why}; pod {name} is being freed")
        else:
            held = (
                f"snapshot {snapshot['generation']} holds its state"
                if snapshot.get("generation") is not None
                else "no pod was started yet"
            )
            status |= {"phase": "Paused", "podName": None, "endpoint": None}
            writer.put("Ready", False, "Paused", f"{why}; {held}")
            writer.put("Paused", True, reason, f"{why}; {held}")
        degraded_as_expected("paused as asked")
        status["conditions"] = writer.conditions
        # A pause is asked for: its own events (Pausing, Paused) say so, not a NotReady warning.
        return SandboxView(
            status, [e for e in _sandbox_events(writer.events) if e.reason != "NotReady"]
        )

    if pod is None:
        final = problem is not None and problem[0] in ("InvalidSpec", "PodLost")
        status |= {"phase": "Failed" if final else "Pending", "endpoint": None}
        if problem is not None:
            writer.put("Ready", False, problem[0], problem[1])
            writer.put("Degraded", True, problem[0], problem[1])
        else:
            writer.put("Ready", False, "Pending", "waiting for a pod")
        status["conditions"] = writer.conditions
        return SandboxView(status, _sandbox_events(writer.events))

    meta = pod["metadata"]
    annotations = meta.get("annotations") or {}
    source = str(annotations.get(ANNOTATION_CLAIM_SOURCE) or "Cold")
    claimed_at = parse_time(annotations.get(ANNOTATION_CLAIMED_AT)) or parse_time(
        meta.get("creationTimestamp")
    )
    status |= {"podName": meta["name"], "templateHash": label(pod, LABEL_TEMPLATE_HASH)}
    # latencyMs None until Ready: status is merge-patched, and a resumed sandbox's claim
    # would otherwise keep the latency of the claim before it.
    claim: dict[str, Any] = {"source": source, "latencyMs": None}
    if claimed_at is not None:
        claim["claimedAt"] = format_ms(claimed_at)
    previous = current.get("claim") or {}
    same_pod = current.get("podName") == meta["name"]
    if get_condition(current.get("conditions"), "Paused") is not None:
        writer.put("Paused", False, "Running", "the sandbox runs")

    restoring = source == "Resume" and not annotations.get(ANNOTATION_RESTORED)
    ready = is_ready(pod) and is_live(pod) and not restoring
    ip = pod.get("status", {}).get("podIP")
    port = pod.get("spec", {}).get("runtimePort") or runtime_port
    if ready:
        if same_pod and previous.get("latencyMs") is not None:
            claim["latencyMs"] = previous["latencyMs"]
        else:
            # Ready is when a reconcile first sees the pod bound and ready: for a warm claim
            # right after the claim's patch returned, for a cold start on the pod's Ready,
            # for a resume once the snapshot is restored.
            claim["latencyMs"] = max(0, round((now - created).total_seconds() * 1000))
        status |= {
            "phase": "Ready",
            "endpoint": f"{ip}:{port}" if ip and port else None,
        }
        writer.put("Ready", True, "RuntimeReady", f"pod {meta['name']} is ready")
        degraded_as_expected("the sandbox runs as asked")
    elif not is_live(pod):
        reason = "PodLost"
        message = (
            f"pod {meta['name']} is being deleted"
            if meta.get("deletionTimestamp")
            else f"pod {meta['name']} ended ({pod.get('status', {}).get('phase')})"
        ) + "; its workspace is gone, create a new AgentSandbox"
        status |= {"phase": "Failed", "endpoint": None}
        writer.put("Ready", False, reason, message)
        writer.put("Degraded", True, reason, message)
    else:
        pending = unschedulable_message([pod])
        phase = "Resuming" if source == "Resume" else "Starting"
        status |= {"phase": "Pending" if pending else phase, "endpoint": None}
        if restoring and is_ready(pod):
            writer.put("Ready", False, "Restoring", f"restoring the snapshot into {meta['name']}")
        else:
            writer.put("Ready", False, "PodStarting", f"pod {meta['name']} is starting")
        if pending is not None:
            writer.put("Degraded", True, "Unschedulable", pending)
        else:
            degraded_as_expected("the sandbox's pod is starting")
    status["claim"] = claim
    status["conditions"] = writer.conditions
    return SandboxView(status, _sandbox_events(writer.events))


def _sandbox_events(events: list[Event]) -> list[Event]:
    """Claimed and ColdStarted events say when a sandbox got its pod; Ready adds nothing."""
    return [e for e in events if e.reason != "RuntimeReady"]
