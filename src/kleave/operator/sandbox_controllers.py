"""The SandboxTemplate, SandboxWarmPool and AgentSandbox controllers.

Built like :mod:`kleave.operator.controllers`: kopf watch events feed in-memory caches and
enqueue keys; workers reconcile a key from the caches with the pure decisions of
:mod:`sandbox_decisions` and :mod:`sandbox_builder`, write, and feed what they wrote back into
the caches (``observe``), so the next reconcile never acts on its own stale view.

Adoption is the part that must never go wrong: a warm pod is claimed with one JSON merge
patch carrying the pod's ``resourceVersion`` (compare-and-swap), so of two claimants only one
wins, whether they are two workers of this process, two operator replicas, or a claim racing
the pool's own clean-up (whose deletes carry the resourceVersion too). A sandbox first looks
for a pod already bound to it, so a claim whose status write never happened (an operator
crash) is found again rather than repeated: a pod is never lost and never bound twice.

Not acted on yet: ``spec.mode: Paused`` and ``idleTimeoutSeconds`` (pause and resume need the
snapshot store); a Paused sandbox keeps running. ``maxLifetimeSeconds`` and
``ttlSecondsAfterFinished`` are.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, cast

import kopf
from pydantic import ValidationError

from kleave.api.agent_sandbox import AgentSandboxSpec
from kleave.api.sandbox_template import Lifetime, SandboxTemplateSpec
from kleave.api.sandbox_warm_pool import SandboxWarmPoolSpec
from kleave.operator import sandbox_builder, sandbox_decisions
from kleave.operator.cached_controller import CachedController
from kleave.operator.cached_controller import is_transient as _is_transient_api
from kleave.operator.conditions import get_condition, set_condition
from kleave.operator.events import EventRecorder, EventType
from kleave.operator.kube import (
    AGENT_SANDBOX,
    NETWORK_POLICY,
    POD,
    RUNTIME_CLASS,
    SANDBOX_TEMPLATE,
    SANDBOX_WARM_POOL,
    ApiError,
    KubeApi,
    ResourceType,
)
from kleave.operator.naming import (
    ANNOTATION_CLAIM_SOURCE,
    ANNOTATION_CLAIMED_AT,
    COMPONENT_SANDBOX,
    LABEL_COMPONENT_APP,
    LABEL_SANDBOX,
    LABEL_SANDBOX_TEMPLATE,
    LABEL_WARM_POOL,
    MANAGED_BY,
    MANAGER,
)
from kleave.operator.rollout import Event
from kleave.operator.sandbox_builder import PodOwner, TemplateError
from kleave.operator.sandbox_decisions import format_ms, label, slim_sandbox_pod
from kleave.operator.store import Store, controller_uid

logger = logging.getLogger("kleave.operator.sandbox")

TEMPLATE_KEY = "SandboxTemplate"
POOL_KEY = "SandboxWarmPool"
SANDBOX_KEY = "AgentSandbox"
RUNTIME_CLASS_RECHECK_S = 30.0
CLAIM_ATTEMPTS = 5
"""Warm pods one reconcile tries before it retries (conflicts) or cold-starts (none left)."""
CREATE_CONCURRENCY = 32

POD_LABELS: dict[str, Any] = {MANAGED_BY: MANAGER, LABEL_SANDBOX_TEMPLATE: kopf.PRESENT}
POLICY_LABELS: dict[str, Any] = {MANAGED_BY: MANAGER, LABEL_COMPONENT_APP: COMPONENT_SANDBOX}
WATCHED: tuple[tuple[ResourceType, dict[str, Any] | None, str], ...] = (
    # (resource, kopf label filter, the same as a list selector)
    (SANDBOX_TEMPLATE, None, ""),
    (SANDBOX_WARM_POOL, None, ""),
    (AGENT_SANDBOX, None, ""),
    (POD, POD_LABELS, f"{MANAGED_BY}={MANAGER},{LABEL_SANDBOX_TEMPLATE}"),
    (NETWORK_POLICY, POLICY_LABELS, f"{MANAGED_BY}={MANAGER},{LABEL_COMPONENT_APP}=sandbox"),
)

Key = tuple[str, str]
Obj = dict[str, Any]


class ClaimConflictError(Exception):
    """Every warm pod tried had changed since it was read; retried with backoff."""


def is_transient(error: BaseException) -> bool:
    return isinstance(error, ClaimConflictError) or _is_transient_api(error)


def _resource_version(obj: Mapping[str, Any]) -> int | None:
    value = obj.get("metadata", {}).get("resourceVersion")
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


class SandboxPods:
    """Sandbox pods, slimmed, by name and indexed by warm pool and by sandbox.

    An update older than the cached object is dropped: the controllers put their own write
    responses into the cache, and a watch event from before that write must not roll the
    cache back (a claimed pod would look unclaimed again).
    """

    def __init__(self) -> None:
        self._pods: dict[Key, Obj] = {}
        self._by_pool: dict[Key, set[Key]] = defaultdict(set)
        self._by_sandbox: dict[Key, set[Key]] = defaultdict(set)

    @staticmethod
    def key_of(pod: Mapping[str, Any]) -> Key:
        meta = pod.get("metadata", {})
        return (str(meta.get("namespace") or ""), str(meta.get("name")))

    def _index(self, key: Key, pod: Obj, add: bool) -> None:
        for index, label_key in (
            (self._by_pool, LABEL_WARM_POOL),
            (self._by_sandbox, LABEL_SANDBOX),
        ):
            value = label(pod, label_key)
            if value is None:
                continue
            slot = (key[0], value)
            if add:
                index[slot].add(key)
            else:
                index[slot].discard(key)
                if not index[slot]:
                    del index[slot]

    def upsert(self, pod: Mapping[str, Any]) -> Obj:
        key = self.key_of(pod)
        current = self._pods.get(key)
        if current is not None and current["metadata"].get("uid") == pod.get("metadata", {}).get(
            "uid"
        ):
            old, new = _resource_version(current), _resource_version(pod)
            if old is not None and new is not None and new < old:
                return current
        stored = slim_sandbox_pod(pod)
        if current is not None:
            self._index(key, current, add=False)
        self._pods[key] = stored
        self._index(key, stored, add=True)
        return stored

    def remove(self, pod: Mapping[str, Any]) -> None:
        key = self.key_of(pod)
        current = self._pods.pop(key, None)
        if current is not None:
            self._index(key, current, add=False)

    def replace_all(self, pods: Iterable[Mapping[str, Any]]) -> None:
        self._pods.clear()
        self._by_pool.clear()
        self._by_sandbox.clear()
        for pod in pods:
            self.upsert(pod)

    def get(self, namespace: str, name: str) -> Obj | None:
        return self._pods.get((namespace, name))

    def in_pool(self, namespace: str, pool: str) -> list[Obj]:
        return [self._pods[k] for k in sorted(self._by_pool.get((namespace, pool), ()))]

    def of_sandbox(self, namespace: str, sandbox: str) -> list[Obj]:
        return [self._pods[k] for k in sorted(self._by_sandbox.get((namespace, sandbox), ()))]

    def __len__(self) -> int:
        return len(self._pods)


class SandboxControllers(CachedController):
    """Caches, the work queue, and the three sandbox reconcilers."""

    what = "sandbox objects"
    log = logger

    def __init__(self, api: KubeApi, *, workers: int = 32) -> None:
        super().__init__(api, workers=workers)
        self.recorder = EventRecorder(api)
        self.templates = Store("SandboxTemplate")
        self.pools = Store("SandboxWarmPool")
        self.sandboxes = Store("AgentSandbox")
        self.pods = SandboxPods()
        self.policies = Store("NetworkPolicy")
        self._busy: set[str] = set()  # "namespace/pod" a claim is in flight for
        self._claims: dict[Key, int] = defaultdict(int)  # per pool, not yet in its status
        self._first_seen: dict[str, datetime] = {}  # sandbox uid -> first watch event

    # -- watching ---------------------------------------------------------------------------

    def register(self, registry: kopf.OperatorRegistry) -> None:
        for rt, labels, _ in WATCHED:
            kopf.on.event(
                rt.group,
                rt.version,
                rt.plural,
                registry=registry,
                id=f"sandbox-cache-{rt.plural}",
                labels=labels,
            )(self._on_event)

    async def _on_event(self, event: Mapping[str, Any], **_: Any) -> None:
        obj = event.get("object")
        if not isinstance(obj, Mapping) or "metadata" not in obj:
            return
        self.observe(str(event.get("type") or ""), obj)

    def _store(self, kind: str) -> Store | None:
        return {
            "SandboxTemplate": self.templates,
            "SandboxWarmPool": self.pools,
            "AgentSandbox": self.sandboxes,
            "NetworkPolicy": self.policies,
        }.get(kind)

    def observe(self, event_type: str, obj: Mapping[str, Any]) -> None:
        """Update the caches with one watched object and enqueue whoever must react."""
        kind = str(obj.get("kind"))
        deleted = event_type == "DELETED"
        if kind == "Pod":
            before_pod = self.pods.get(*SandboxPods.key_of(obj))
            if deleted:
                self.pods.remove(obj)
                after_pod: Obj | None = None
            else:
                after_pod = self.pods.upsert(obj)
                if after_pod == before_pod:
                    return
            if self.queue is not None:
                for pod in (before_pod, after_pod, None if after_pod else obj):
                    if pod is not None:
                        self._enqueue_for_pod(pod)
            return
        store = self._store(kind)
        if store is None:
            return
        before = store.get(*Store.key_of(obj))
        if deleted:
            store.remove(obj)
            after: Mapping[str, Any] | None = None
        else:
            after = store.upsert(obj)
        if kind == "AgentSandbox":
            uid = str(obj["metadata"].get("uid"))
            if deleted:
                self._first_seen.pop(uid, None)
            elif before is None and not (obj.get("status") or {}).get("podName"):
                self._first_seen.setdefault(uid, datetime.now(UTC))
        if self.queue is not None:
            self._enqueue_for(kind, obj, before, after)

    def _enqueue_for_pod(self, pod: Mapping[str, Any]) -> None:
        namespace = str(pod["metadata"].get("namespace") or "")
        pool = label(pod, LABEL_WARM_POOL)
        if pool is not None:
            self.queue.add((POOL_KEY, namespace, pool))
        sandbox = label(pod, LABEL_SANDBOX)
        if sandbox is not None:
            self.queue.add((SANDBOX_KEY, namespace, sandbox))

    def _enqueue_for(
        self,
        kind: str,
        obj: Mapping[str, Any],
        before: Mapping[str, Any] | None,
        after: Mapping[str, Any] | None,
    ) -> None:
        meta = obj["metadata"]
        namespace, name = str(meta.get("namespace") or ""), str(meta["name"])
        if kind == "NetworkPolicy":
            template = (meta.get("labels") or {}).get(LABEL_SANDBOX_TEMPLATE)
            if template:
                self.queue.add((TEMPLATE_KEY, namespace, template))
            return
        self.queue.add((kind, namespace, name))
        # Dependents care about a template's or pool's existence, spec and (template) status;
        # a pool's status changes with every claim and is nobody else's business.
        changed = (
            before is None
            or after is None
            or before.get("spec") != after.get("spec")
            or (kind == "SandboxTemplate" and before.get("status") != after.get("status"))
        )
        if not changed:
            return
        if kind == "SandboxTemplate":
            for pool in self.pools.all():
                if pool["metadata"]["namespace"] == namespace and _template_of_pool(pool) == name:
                    self.queue.add((POOL_KEY, namespace, pool["metadata"]["name"]))
            self._enqueue_unbound(namespace, template=name)
        elif kind == "SandboxWarmPool":
            self._enqueue_unbound(namespace, pool=name)

    def _enqueue_unbound(
        self, namespace: str, *, template: str | None = None, pool: str | None = None
    ) -> None:
        """Sandboxes waiting for this template or pool (those with a pod do not care)."""
        for sandbox in self.sandboxes.all():
            meta = sandbox["metadata"]
            if meta["namespace"] != namespace or (sandbox.get("status") or {}).get("podName"):
                continue
            spec = sandbox.get("spec") or {}
            pool_ref = (spec.get("warmPoolRef") or {}).get("name")
            template_ref = (spec.get("templateRef") or {}).get("name")
            waits_for_pool = pool is not None and pool_ref == pool
            waits_for_template = template is not None and (
                template_ref == template
                or (pool_ref and self._template_name(namespace, pool_ref) == template)
            )
            if waits_for_pool or waits_for_template:
                self.queue.add((SANDBOX_KEY, namespace, meta["name"]))

    def _template_name(self, namespace: str, pool: str) -> str | None:
        obj = self.pools.get(namespace, pool)
        return None if obj is None else _template_of_pool(obj)

    async def prime(self) -> None:
        """List everything once, so the first reconciles see complete caches."""
        for rt, _, selector in WATCHED:
            items = [item async for item in self.api.list(rt, label_selector=selector)]
            if rt is POD:
                self.pods.replace_all(items)
            else:
                store = self._store(rt.kind)
                assert store is not None
                store.replace_all(items)

    def is_transient(self, error: BaseException) -> bool:
        return is_transient(error)

    def _enqueue_all(self) -> None:
        for key_kind, store in (
            (TEMPLATE_KEY, self.templates),
            (POOL_KEY, self.pools),
            (SANDBOX_KEY, self.sandboxes),
        ):
            for obj in store.all():
                self.queue.add((key_kind, obj["metadata"]["namespace"], obj["metadata"]["name"]))

    async def reconcile(self, key: Hashable) -> float | None:
        kind, namespace, name = cast("tuple[str, str, str]", key)
        if kind == TEMPLATE_KEY:
            return await self.reconcile_template(namespace, name)
        if kind == POOL_KEY:
            return await self.reconcile_pool(namespace, name)
        return await self.reconcile_sandbox(namespace, name)

    # -- helpers ----------------------------------------------------------------------------

    async def _post(self, obj: Mapping[str, Any], events: Iterable[Event]) -> None:
        for event in events:
            await self.recorder.post(obj, event.type, event.reason, event.message)

    def _template(
        self, namespace: str, name: str
    ) -> tuple[Obj | None, SandboxTemplateSpec | None, tuple[str, str] | None]:
        """The template, its parsed spec, and why pods cannot be built from it (if so).

        (None, None, None) while the template has not been reconciled at its generation:
        whoever asked waits for the template's status write to enqueue them again.
        """
        template = self.templates.get(namespace, name)
        if template is None:
            return (
                None,
                None,
                (
                    "TemplateNotFound",
                    f"SandboxTemplate {name} does not exist in namespace {namespace}",
                ),
            )
        status = template.get("status") or {}
        accepted = get_condition(status.get("conditions"), "Accepted")
        generation = template["metadata"].get("generation")
        if accepted is None or (
            generation is not None and status.get("observedGeneration") != generation
        ):
            return template, None, None
        if accepted.get("status") != "True":
            return (
                template,
                None,
                (
                    "TemplateNotAccepted",
                    f"SandboxTemplate {name}: {accepted.get('message') or accepted.get('reason')}",
                ),
            )
        try:
            spec = SandboxTemplateSpec.model_validate(template.get("spec") or {})
        except ValidationError as error:
            return template, None, ("TemplateNotAccepted", f"SandboxTemplate {name}: {error}")
        return template, spec, None

    # -- SandboxTemplate --------------------------------------------------------------------

    async def reconcile_template(self, namespace: str, name: str) -> float | None:
        template = self.templates.get(namespace, name)
        if template is None or template["metadata"].get("deletionTimestamp"):
            return None
        now = datetime.now(UTC)
        current = template.get("status") or {}
        generation = template["metadata"].get("generation")
        conditions = list(current.get("conditions") or [])
        events: list[tuple[EventType, str, str]] = []
        requeue: float | None = None
        desired: dict[str, Any] = {}
        if generation is not None:
            desired["observedGeneration"] = generation

        def put(type_: str, ok: bool, reason: str, message: str) -> None:
            nonlocal conditions
            before = get_condition(conditions, type_)
            conditions = set_condition(
                conditions, type=type_, status="True" if ok else "False", reason=reason,
                message=message, generation=generation, now=now,
            )  # fmt: skip
            changed = before is None or (before.get("status"), before.get("reason")) != (
                "True" if ok else "False",
                reason,
            )
            if changed and not ok:
                events.append(("Warning", reason, message))

        try:
            spec = SandboxTemplateSpec.model_validate(template.get("spec") or {})
            template_hash = sandbox_builder.template_hash(spec)
        except (ValidationError, TemplateError) as error:
            put("Accepted", False, "InvalidTemplate", _error_message(error))
            desired["conditions"] = conditions
            await self._write_status(SANDBOX_TEMPLATE, template, desired)
            await self._post_tuples(template, events)
            return None

        runtime_class = await self.api.get(RUNTIME_CLASS, None, spec.runtime_class_name)
        if runtime_class is None:
            put(
                "Accepted",
                False,
                "RuntimeClassNotFound",
                f"RuntimeClass {spec.runtime_class_name} does not exist: install it (the chart's "
                "kleave-microvm is Kata Containers with Firecracker) or set "
                "spec.runtimeClassName",
            )
            requeue = RUNTIME_CLASS_RECHECK_S
        else:
            put("Accepted", True, "Valid", "sandbox pods can be built from this template")

        # Egress: applied whether or not the template is accepted, so it is there first.
        plan = sandbox_builder.build_network_policy(template, spec)
        await self._apply(
            plan.policy,
            self.policies.get(namespace, plan.policy["metadata"]["name"]),
        )
        baseline = sandbox_builder.build_baseline_network_policy(namespace)
        await self._apply(baseline, self.policies.get(namespace, baseline["metadata"]["name"]))
        if plan.unenforced_hosts:
            put(
                "EgressEnforced",
                False,
                "HostRulesNotEnforced",
                "a NetworkPolicy cannot allow DNS names, so traffic to "
                f"{'; '.join(plan.unenforced_hosts)} stays denied; allow their addresses with "
                "cidr entries, or route through an egress proxy that a cidr entry allows",
            )
        else:
            put(
                "EgressEnforced",
                True,
                "NetworkPolicy",
                f"NetworkPolicy {plan.policy['metadata']['name']} allows DNS and "
                f"{len(spec.egress.allow)} allow-list entries",
            )
        desired |= {"templateHash": template_hash, "conditions": conditions}
        await self._write_status(SANDBOX_TEMPLATE, template, desired)
        await self._post_tuples(template, events)
        return requeue

    async def _post_tuples(
        self, obj: Mapping[str, Any], events: Iterable[tuple[EventType, str, str]]
    ) -> None:
        for type_, reason, message in events:
            await self.recorder.post(obj, type_, reason, message)

    # -- SandboxWarmPool --------------------------------------------------------------------

    async def reconcile_pool(self, namespace: str, name: str) -> float | None:
        pool = self.pools.get(namespace, name)
        if pool is None or pool["metadata"].get("deletionTimestamp"):
            return None
        try:
            SandboxWarmPoolSpec.model_validate(pool.get("spec") or {})
        except ValidationError as error:
            logger.warning("SandboxWarmPool %s/%s: %s", namespace, name, error)
            return None
        template_name = _template_of_pool(pool) or ""
        template, spec, problem = self._template(namespace, template_name)
        if template is not None and spec is None and problem is None:
            return None  # the template's own reconcile comes first, then enqueues this pool
        template_hash = None if spec is None else sandbox_builder.template_hash(spec)
        key = (namespace, name)
        pending_claims = self._claims.get(key, 0)
        claimed = int((pool.get("status") or {}).get("claimed") or 0) + pending_claims
        busy = {n.partition("/")[2] for n in self._busy if n.startswith(f"{namespace}/")}
        plan = sandbox_decisions.plan_pool(
            pool=pool,
            template_hash=template_hash,
            problem=problem,
            pods=self.pods.in_pool(namespace, name),
            busy=busy,
            claimed_total=claimed,
            now=datetime.now(UTC),
        )

        failure: ApiError | None = None
        if plan.create and template is not None and spec is not None:
            failure = await self._create_pool_pods(pool, template, spec, plan.create)
        for pod in plan.delete:
            meta = pod["metadata"]
            await self.api.delete(
                POD, namespace, meta["name"], uid=meta["uid"],
                resource_version=meta.get("resourceVersion"),
            )  # fmt: skip

        await self._write_status(SANDBOX_WARM_POOL, pool, plan.status)
        if pending_claims:
            self._claims[key] -= pending_claims
            if self._claims[key] <= 0:
                del self._claims[key]
        await self._post(pool, plan.events)
        if failure is not None:
            if failure.transient:
                raise failure
            await self.recorder.post(
                pool, "Warning", "FailedCreate", f"creating a sandbox pod failed: {failure}"
            )
            return RUNTIME_CLASS_RECHECK_S
        return None

    async def _create_pool_pods(
        self, pool: Obj, template: Obj, spec: SandboxTemplateSpec, count: int
    ) -> ApiError | None:
        """Create ``count`` pods at once (bounded); returns the first failure, if any."""
        name = pool["metadata"]["name"]
        namespace = pool["metadata"]["namespace"]
        limit = asyncio.Semaphore(CREATE_CONCURRENCY)
        failures: list[ApiError] = []

        async def create_one() -> None:
            async with limit:
                if failures:
                    return  # one refusal (quota, admission) is enough to stop for now
                pod = sandbox_builder.build_pod(template, spec, PodOwner(pool, pool=name))
                try:
                    created = await self.api.create(POD, namespace, pod)
                except ApiError as error:
                    failures.append(error)
                    return
                self.observe("ADDED", created)

        await asyncio.gather(*(create_one() for _ in range(count)))
        return failures[0] if failures else None

    # -- AgentSandbox -----------------------------------------------------------------------

    async def reconcile_sandbox(self, namespace: str, name: str) -> float | None:
        sandbox = self.sandboxes.get(namespace, name)
        if sandbox is None or sandbox["metadata"].get("deletionTimestamp"):
            return None  # its pod goes with it (ownerReference, garbage collection)
        uid = str(sandbox["metadata"]["uid"])
        now = datetime.now(UTC)
        created = sandbox_decisions.creation_estimate(sandbox, self._first_seen.get(uid))
        events: list[Event] = []

        problem: tuple[str, str] | None = None
        spec: AgentSandboxSpec | None = None
        pool_name: str | None = None
        template: Obj | None = None
        template_spec: SandboxTemplateSpec | None = None
        try:
            spec = AgentSandboxSpec.model_validate(sandbox.get("spec") or {})
        except ValidationError as error:
            problem = ("InvalidSpec", _error_message(error))
        if spec is not None and spec.warm_pool_ref is not None:
            pool_name = spec.warm_pool_ref.name
            pool = self.pools.get(namespace, pool_name)
            if pool is None:
                problem = (
                    "WarmPoolNotFound",
                    f"SandboxWarmPool {pool_name} does not exist in namespace {namespace}",
                )
            else:
                template, template_spec, problem = self._template(
                    namespace, _template_of_pool(pool) or ""
                )
        elif spec is not None and spec.template_ref is not None:
            template, template_spec, problem = self._template(namespace, spec.template_ref.name)

        lifetime = template_spec.lifetime if template_spec is not None else Lifetime()
        if spec is not None and spec.lifetime is not None:
            lifetime = spec.lifetime.apply_to(lifetime)
        stamp = sandbox_decisions.parse_time(sandbox["metadata"].get("creationTimestamp"))
        deadlines = sandbox_decisions.deadlines(stamp or created, lifetime)
        if deadlines.delete_at is not None and now >= deadlines.delete_at:
            await self.recorder.post(
                sandbox, "Normal", "Deleted",
                f"finished at {deadlines.expires_at:%Y-%m-%dT%H:%M:%SZ} and kept "
                f"ttlSecondsAfterFinished={lifetime.ttl_seconds_after_finished}s",
            )  # fmt: skip
            await self.api.delete(AGENT_SANDBOX, namespace, name, uid=uid)
            return None
        expired = deadlines.expires_at is not None and now >= deadlines.expires_at

        mine = [p for p in self.pods.of_sandbox(namespace, name) if controller_uid(p) == uid]
        pod = await self._keep_one(sandbox, mine, events)

        if expired:
            for stale in mine:
                if not stale["metadata"].get("deletionTimestamp"):
                    meta = stale["metadata"]
                    await self.api.delete(POD, namespace, meta["name"], uid=meta["uid"])
            if (sandbox.get("status") or {}).get("phase") != "Terminating":
                message = (
                    f"maxLifetimeSeconds={lifetime.max_lifetime_seconds}s ended the sandbox; "
                    "its pod is deleted"
                )
                events.append(Event("Normal", "Expired", message))
            pod = None
        elif pod is None:
            bound = (sandbox.get("status") or {}).get("podName")
            if bound:
                pod = await self._find_bound(namespace, str(bound), name, uid)
                if pod is None:
                    problem = (
                        "PodLost",
                        f"pod {bound} no longer exists; its workspace is gone, create a new "
                        "AgentSandbox",
                    )
            elif problem is None and spec is not None and template is not None and template_spec:
                pod = await self._obtain(
                    sandbox,
                    spec=spec,
                    pool_name=pool_name,
                    template=template,
                    template_spec=template_spec,
                    events=events,
                )

        view = sandbox_decisions.sandbox_status(
            sandbox=sandbox,
            pod=pod,
            problem=problem,
            expires_at=deadlines.expires_at,
            expired=expired,
            created=created,
            runtime_port=None if template_spec is None else template_spec.runtime_port,
            now=datetime.now(UTC),  # after the claim: its latency includes the patch
        )
        await self._write_status(AGENT_SANDBOX, sandbox, view.status)
        await self._post(sandbox, [*events, *view.events])
        if (view.status.get("claim") or {}).get("latencyMs") is not None:
            self._first_seen.pop(uid, None)

        if expired:
            assert deadlines.delete_at is not None
            return max(0.05, (deadlines.delete_at - now).total_seconds())
        if deadlines.expires_at is not None:
            return max(0.05, (deadlines.expires_at - now).total_seconds())
        return None

    async def _keep_one(self, sandbox: Obj, pods: list[Obj], events: list[Event]) -> Obj | None:
        """The sandbox's pod; a second live one (which no path should make) is deleted."""
        live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        if not live:
            return pods[0] if pods else None
        live.sort(
            key=lambda p: (
                not sandbox_decisions.is_ready(p),
                p["metadata"].get("creationTimestamp") or "",
                p["metadata"]["name"],
            )
        )
        keep, *extra = live
        for pod in extra:
            meta = pod["metadata"]
            message = f"deleted pod {meta['name']}: the sandbox runs in {keep['metadata']['name']}"
            events.append(Event("Warning", "DuplicatePod", message))
            await self.api.delete(POD, meta["namespace"], meta["name"], uid=meta["uid"])
        return keep

    async def _find_bound(
        self, namespace: str, pod_name: str, sandbox: str, uid: str
    ) -> Obj | None:
        """The pod status names, read from the API server when the cache does not have it."""
        live = await self.api.get(POD, namespace, pod_name)
        if live is None or label(live, LABEL_SANDBOX) != sandbox or controller_uid(live) != uid:
            return None
        self.observe("MODIFIED", live)
        return self.pods.get(namespace, pod_name)

    async def _obtain(
        self,
        sandbox: Obj,
        *,
        spec: AgentSandboxSpec,
        pool_name: str | None,
        template: Obj,
        template_spec: SandboxTemplateSpec,
        events: list[Event],
    ) -> Obj | None:
        """Adopt a warm pod, else cold-start one; the events say which and why."""
        namespace, name = sandbox["metadata"]["namespace"], sandbox["metadata"]["name"]
        if pool_name is None:
            why = "no warm pool named (spec.templateRef)"
        else:
            why = sandbox_decisions.cold_start_reason(spec, template_spec) or ""
            if not why:
                pod = await self._claim(sandbox, pool_name, template_spec)
                if pod is not None:
                    message = f"adopted warm pod {pod['metadata']['name']} from pool {pool_name}"
                    events.append(Event("Normal", "Claimed", message))
                    return pod
                why = f"warm pool {pool_name} had no ready sandbox"
        started = datetime.now(UTC)
        body = sandbox_builder.build_pod(
            template,
            template_spec,
            PodOwner(sandbox, sandbox=name),
            extra_env=spec.env,
            annotations={
                ANNOTATION_CLAIM_SOURCE: "Cold",
                ANNOTATION_CLAIMED_AT: format_ms(started),
            },
        )
        try:
            created = await self.api.create(POD, namespace, body)
        except ApiError as error:
            if error.status != 409:
                raise
            # A pod of this name exists: ours (a create whose answer was lost), else a
            # same-named sandbox's pod that garbage collection has not removed yet.
            found = await self._find_bound(namespace, name, name, str(sandbox["metadata"]["uid"]))
            if found is None:
                raise
            return found
        self.observe("ADDED", created)
        events.append(Event("Normal", "ColdStarted", f"created pod {name}: {why}"))
        return self.pods.get(namespace, name)

    async def _claim(
        self, sandbox: Obj, pool_name: str, template_spec: SandboxTemplateSpec
    ) -> Obj | None:
        """Adopt one ready pod of the pool; None when none is left to try."""
        namespace = sandbox["metadata"]["namespace"]
        current_hash = sandbox_builder.template_hash(template_spec)
        busy = {n.partition("/")[2] for n in self._busy if n.startswith(f"{namespace}/")}
        candidates = sandbox_decisions.claim_candidates(
            self.pods.in_pool(namespace, pool_name), current_hash, busy
        )
        conflicts = 0
        for pod in candidates[:CLAIM_ATTEMPTS]:
            pod_name = pod["metadata"]["name"]
            token = f"{namespace}/{pod_name}"
            if token in self._busy:
                continue
            self._busy.add(token)
            try:
                patch = sandbox_decisions.claim_patch(pod, sandbox, pool_name, datetime.now(UTC))
                try:
                    claimed = await self.api.merge_patch(POD, namespace, pod_name, patch)
                except ApiError as error:
                    if error.conflict or error.not_found:
                        conflicts += error.conflict
                        continue  # someone else won it, or it is gone: the next one
                    raise
                self.observe("MODIFIED", claimed)
            finally:
                self._busy.discard(token)
            self._claims[(namespace, pool_name)] += 1
            self.queue.add((POOL_KEY, namespace, pool_name))  # refill
            return self.pods.get(namespace, pod_name)
        if conflicts:
            # The pods tried had changed since the cache saw them (or another claimant won
            # them): look again once the watch has caught up, rather than cold-start beside a
            # warm pool. Backoff bounds the retries; an empty pool then cold-starts.
            raise ClaimConflictError(
                f"{conflicts} warm pods of pool {pool_name} changed while claimed"
            )
        return None


def _template_of_pool(pool: Mapping[str, Any]) -> str | None:
    ref = (pool.get("spec") or {}).get("templateRef") or {}
    name = ref.get("name")
    return None if name is None else str(name)


def _error_message(error: Exception) -> str:
    if isinstance(error, ValidationError):
        return "; ".join(
            "spec." + ".".join(str(p) for p in item["loc"]) + f": {item['msg']}"
            for item in error.errors(include_url=False)
        )[:1000]
    return str(error)[:1000]
