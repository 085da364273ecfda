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

Pause and resume go through the runtime in the pod (:mod:`sandbox_runtime_api`): a pause asks
it for a snapshot on the sandbox's PersistentVolumeClaim, records the snapshot and the audit
head in status, and only then frees the pod; a resume starts a fresh pod on the same claim,
restores the snapshot into it and checks the audit chain against the recorded head before the
sandbox is Ready. The idle clock is the runtime's own record of the agent's last call.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import kopf
from pydantic import ValidationError

from kleave.api.agent_sandbox import AgentSandboxSpec
from kleave.api.sandbox_template import Lifetime, Persistence, SandboxTemplateSpec
from kleave.api.sandbox_warm_pool import SandboxWarmPoolSpec
from kleave.operator import sandbox_builder, sandbox_decisions, sandbox_pause
from kleave.operator.cached_controller import CachedController
from kleave.operator.cached_controller import is_transient as _is_transient_api
from kleave.operator.conditions import get_condition, set_condition
from kleave.operator.events import EventRecorder, EventType
from kleave.operator.kube import (
    AGENT_SANDBOX,
    NETWORK_POLICY,
    PERSISTENT_VOLUME_CLAIM,
    POD,
    RUNTIME_CLASS,
    SANDBOX_TEMPLATE,
    SANDBOX_WARM_POOL,
    SECRET,
    ApiError,
    KubeApi,
    ResourceType,
)
from kleave.operator.naming import (
    ANNOTATION_CLAIM_SOURCE,
    ANNOTATION_CLAIMED_AT,
    ANNOTATION_RESTORED,
    COMPONENT_SANDBOX,
    LABEL_COMPONENT_APP,
    LABEL_SANDBOX,
    LABEL_SANDBOX_TEMPLATE,
    LABEL_WARM_POOL,
    MANAGED_BY,
    MANAGER,
    owner_reference,
)
from kleave.operator.rollout import Event
from kleave.operator.sandbox_builder import PodOwner, TemplateError
from kleave.operator.sandbox_decisions import format_ms, label, parse_time, slim_sandbox_pod
from kleave.operator.sandbox_pause import Intent
from kleave.operator.sandbox_runtime_api import RuntimeApi, RuntimeCallError
from kleave.operator.sandbox_tokens import RuntimeTokens, load_key
from kleave.operator.store import Store, controller_uid
from kleave.operator.warm_pool_autoscaler import WarmPoolAutoscaler

logger = logging.getLogger("kleave.operator.sandbox")

TEMPLATE_KEY = "SandboxTemplate"
POOL_KEY = "SandboxWarmPool"
SANDBOX_KEY = "AgentSandbox"
AUTOSCALE_KEY = "SandboxWarmPoolAutoscale"
RUNTIME_CLASS_RECHECK_S = 30.0
CLAIM_ATTEMPTS = 5
"""Warm pods one reconcile tries before it retries (conflicts) or cold-starts (none left)."""
CREATE_CONCURRENCY = 32
RUNTIME_RETRY_S = 5.0
"""How soon a failed runtime call (snapshot, restore, idle check) is tried again."""
_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # the API server's generateName alphabet

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


@dataclass
class _Step:
    """What one sandbox reconcile's pause, resume and idle steps decided."""

    lifecycle: dict[str, Any]
    """Status fields they set (snapshot, auditHead, volumeClaimName, the idle clock)."""
    requeue: list[float]
    warning: tuple[str, str] | None = None
    paused: bool = False
    pod_after_pause: Obj | None = None
    """The pod while a pause frees it (status shows Pausing until it is gone)."""


def _restoring(pod: Mapping[str, Any]) -> bool:
    """A resumed pod whose snapshot is not restored yet: not Ready, whatever kubelet says."""
    annotations = pod["metadata"].get("annotations") or {}
    return annotations.get(ANNOTATION_CLAIM_SOURCE) == "Resume" and not annotations.get(
        ANNOTATION_RESTORED
    )


def _endpoint(pod: Mapping[str, Any]) -> str | None:
    ip = (pod.get("status") or {}).get("podIP")
    port = (pod.get("spec") or {}).get("runtimePort")
    return f"{ip}:{port}" if ip and port else None


def _pause_reason(status: Mapping[str, Any]) -> str:
    paused = get_condition(status.get("conditions"), "Paused")
    reason = (paused or {}).get("reason")
    return sandbox_pause.IDLE if reason == sandbox_pause.IDLE else sandbox_pause.REQUESTED


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

    def __init__(
        self,
        api: KubeApi,
        *,
        workers: int = 32,
        runtime: RuntimeApi | None = None,
        tokens: RuntimeTokens | None = None,
    ) -> None:
        super().__init__(api, workers=workers)
        self.runtime = runtime or RuntimeApi()
        self.tokens = tokens or RuntimeTokens(load_key())
        self.recorder = EventRecorder(api)
        self.templates = Store("SandboxTemplate")
        self.pools = Store("SandboxWarmPool")
        self.sandboxes = Store("AgentSandbox")
        self.pods = SandboxPods()
        self.policies = Store("NetworkPolicy")
        self.autoscaler = WarmPoolAutoscaler(api, self.pools, self.recorder)
        self._busy: set[str] = set()  # "namespace/pod" a claim is in flight for
        self._claims: dict[Key, int] = defaultdict(int)  # per pool, not yet in its status
        self._first_seen: dict[str, datetime] = {}  # sandbox uid -> first watch event
        self._claims_made: set[str] = set()  # "namespace/claim" known to exist
        self._owned_claims: dict[str, str] = {}  # sandbox uid -> its claim, already re-owned
        self._secrets_made: set[str] = set()  # "namespace/pod" whose token Secret exists

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
                meta = obj["metadata"]
                claim = sandbox_builder.pool_claim_name(str(meta.get("name")))
                self._claims_made.discard(f"{meta.get('namespace')}/{claim}")
                self._secrets_made.discard(f"{meta.get('namespace')}/{meta.get('name')}")
                after_pod: Obj | None = None
            else:
                self.autoscaler.observe_pod(obj)
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
                self._forget_sandbox(obj)
            else:
                self.autoscaler.record_claim(obj)
                if before is None and not (obj.get("status") or {}).get("podName"):
                    self._first_seen.setdefault(uid, datetime.now(UTC))
        if self.queue is not None:
            self._enqueue_for(kind, obj, before, after)

    def _forget_sandbox(self, sandbox: Mapping[str, Any]) -> None:
        """Drop what the controllers remembered of a deleted sandbox (no unbounded growth)."""
        meta = sandbox["metadata"]
        uid = str(meta.get("uid"))
        self._first_seen.pop(uid, None)
        self._owned_claims.pop(uid, None)
        claim = sandbox_builder.sandbox_claim_name(str(meta.get("name")))
        self._claims_made.discard(f"{meta.get('namespace')}/{claim}")

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
            self.queue.add((AUTOSCALE_KEY, namespace, name))
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
        for obj in self.pools.all():
            self.queue.add((AUTOSCALE_KEY, obj["metadata"]["namespace"], obj["metadata"]["name"]))

    async def reconcile(self, key: Hashable) -> float | None:
        kind, namespace, name = cast("tuple[str, str, str]", key)
        if kind == TEMPLATE_KEY:
            return await self.reconcile_template(namespace, name)
        if kind == POOL_KEY:
            return await self.reconcile_pool(namespace, name)
        if kind == AUTOSCALE_KEY:
            return await self.autoscaler.reconcile(namespace, name)
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
        if template is not None and spec is not None:
            await self._ensure_pool_claims(self.pods.in_pool(namespace, name), template, spec)
            if plan.create:
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
        """Create ``count`` pods at once (bounded); returns the first failure, if any.

        Names are chosen here, not by ``generateName``, because a pod with persistence mounts
        a claim named after it; the claim is created right after the pod, owned by it, so a
        pool pod that goes takes its empty claim with it.
        """
        name = pool["metadata"]["name"]
        namespace = pool["metadata"]["namespace"]
        limit = asyncio.Semaphore(CREATE_CONCURRENCY)
        failures: list[ApiError] = []

        async def create_one() -> None:
            async with limit:
                for _ in range(3):  # a name already taken: draw another
                    if failures:
                        return  # one refusal (quota, admission) is enough to stop for now
                    pod_name = f"{name}-{_suffix()}"
                    claim = (
                        sandbox_builder.pool_claim_name(pod_name)
                        if spec.persistence.enabled
                        else None
                    )
                    pod = sandbox_builder.build_pod(
                        template,
                        spec,
                        PodOwner(pool, pool=name),
                        name=pod_name,
                        token=self.tokens.issue(namespace, pod_name),
                        claim_name=claim,
                    )
                    try:
                        created = await self.api.create(POD, namespace, pod)
                    except ApiError as error:
                        if error.status == 409:
                            continue
                        failures.append(error)
                        return
                    self.observe("ADDED", created)
                    await self._ensure_token_secret(created)
                    if claim is not None:
                        await self._create_pool_claim(created, template, spec)
                    return

        await asyncio.gather(*(create_one() for _ in range(count)))
        return failures[0] if failures else None

    async def _create_pool_claim(self, pod: Obj, template: Obj, spec: SandboxTemplateSpec) -> None:
        """The claim a pool pod mounts (it stays Pending until the claim exists and binds)."""
        meta = pod["metadata"]
        claim = sandbox_builder.pool_claim_name(meta["name"])
        token = f"{meta['namespace']}/{claim}"
        if token in self._claims_made:
            return
        body = sandbox_builder.build_state_claim(
            pod, claim, template["metadata"]["name"], spec.persistence
        )
        try:
            await self.api.create(PERSISTENT_VOLUME_CLAIM, meta["namespace"], body)
        except ApiError as error:
            if error.status != 409:
                raise
        self._claims_made.add(token)

    async def _ensure_pool_claims(
        self, pods: Iterable[Obj], template: Obj, spec: SandboxTemplateSpec
    ) -> None:
        """Claims and token Secrets of pool pods that are not running yet: a create whose
        children never followed (an operator restart in between) is completed here."""
        for pod in pods:
            if not sandbox_decisions.is_ready(pod) and sandbox_decisions.is_live(pod):
                await self._ensure_token_secret(pod)
                if pod["spec"].get("claimName"):
                    await self._create_pool_claim(pod, template, spec)

    # -- AgentSandbox -----------------------------------------------------------------------

    async def reconcile_sandbox(self, namespace: str, name: str) -> float | None:
        sandbox = self.sandboxes.get(namespace, name)
        if sandbox is None or sandbox["metadata"].get("deletionTimestamp"):
            return None  # its pod goes with it (ownerReference, garbage collection)
        uid = str(sandbox["metadata"]["uid"])
        now = datetime.now(UTC)
        created = sandbox_decisions.creation_estimate(sandbox, self._first_seen.get(uid))
        current = sandbox.get("status") or {}
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

        step = _Step(lifecycle={}, requeue=[])
        intent = sandbox_pause.intent(spec, sandbox) if spec is not None else Intent(run=True)
        if intent.resume_request is not None:
            step.lifecycle |= {"resumeRequest": intent.resume_request, "idlePausedAt": None}
        if spec is not None and spec.mode == "Paused" and current.get("idlePausedAt"):
            step.lifecycle["idlePausedAt"] = None  # a requested pause takes over
        persistence = (
            None
            if spec is None or template_spec is None
            else sandbox_pause.persistence_of(spec, template_spec)
        )
        if not intent.run and persistence is not None and not persistence.enabled:
            step.warning = (
                "PersistenceDisabled",
                "spec.mode is Paused but persistence is disabled (the template's "
                "spec.persistence.enabled): pausing would lose the sandbox's state, so it keeps "
                "running; delete it instead, or enable persistence",
            )
            intent = Intent(run=True)
        elif not intent.run and persistence is None and pod is not None:
            intent = Intent(run=True)  # cannot tell yet (template missing): leave it as it is

        if expired:
            for stale in mine:
                if not stale["metadata"].get("deletionTimestamp"):
                    meta = stale["metadata"]
                    await self.api.delete(POD, namespace, meta["name"], uid=meta["uid"])
            if current.get("phase") != "Terminating":
                message = (
                    f"maxLifetimeSeconds={lifetime.max_lifetime_seconds}s ended the sandbox; "
                    "its pod is deleted"
                )
                events.append(Event("Normal", "Expired", message))
            pod = None
        elif not intent.run:
            await self._pause(sandbox, pod, intent, step, events)
        elif (
            pod is not None
            and pod["metadata"].get("deletionTimestamp")
            and current.get("phase") in ("Pausing", "Paused")
        ):
            # A resume asked for while the paused pod is still going: its claim frees first.
            intent = Intent(run=False, pause_reason=_pause_reason(current))
        elif pod is None:
            bound = current.get("podName")
            snapshot = current.get("snapshot") or {}
            if snapshot.get("generation") is not None and current.get("volumeClaimName"):
                if current.get("phase") not in ("Pausing", "Paused", "Resuming"):
                    events.append(
                        Event(
                            "Warning",
                            "PodLost",
                            f"pod {bound} is gone; resuming from snapshot "
                            f"{snapshot['generation']} taken at {snapshot.get('takenAt')}: "
                            "work after it is lost",
                        )
                    )
                if problem is None and spec is not None and template is not None and template_spec:
                    pod = await self._start_resume(
                        sandbox,
                        spec=spec,
                        template=template,
                        template_spec=template_spec,
                        generation=int(snapshot["generation"]),
                        events=events,
                    )
            elif bound:
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
                    persistence=persistence,
                    events=events,
                )

        if intent.run and pod is not None and not expired:
            claim = pod["spec"].get("claimName")
            if claim:
                step.lifecycle["volumeClaimName"] = claim
            if _restoring(pod) and sandbox_decisions.is_ready(pod):
                pod = await self._restore(sandbox, pod, step, events)
            if sandbox_decisions.is_ready(pod) and not _restoring(pod):
                if await self._ensure_token_secret(pod):  # made with the pod; after a restart
                    step.lifecycle["tokenSecretName"] = sandbox_builder.token_secret_name(
                        str(pod["metadata"]["name"])
                    )
                idle = (
                    0
                    if spec is None or template_spec is None
                    else sandbox_pause.idle_timeout_of(spec, template_spec)
                )
                if await self._idle(
                    sandbox, pod, idle_timeout_s=idle, step=step, events=events, now=now
                ):
                    intent = Intent(run=False, pause_reason=sandbox_pause.IDLE)
                    step.lifecycle["idlePausedAt"] = format_ms(now)
                    await self._pause(sandbox, pod, intent, step, events)

        source = ((pod or {}).get("metadata", {}).get("annotations") or {}).get(
            ANNOTATION_CLAIM_SOURCE
        )
        if source == "Resume" and pod is not None:
            started = parse_time(pod["metadata"]["annotations"].get(ANNOTATION_CLAIMED_AT))
            created = started or created
        view = sandbox_decisions.sandbox_status(
            sandbox=sandbox,
            pod=step.pod_after_pause if step.paused else pod,
            problem=problem,
            expires_at=deadlines.expires_at,
            expired=expired,
            created=created,
            runtime_port=None if template_spec is None else template_spec.runtime_port,
            now=datetime.now(UTC),  # after the claim: its latency includes the patch
            intent=intent,
            lifecycle=step.lifecycle,
            warning=step.warning,
        )
        await self._write_status(AGENT_SANDBOX, sandbox, view.status)
        await self._post(sandbox, [*events, *view.events])
        if (view.status.get("claim") or {}).get("latencyMs") is not None:
            self._first_seen.pop(uid, None)
        if intent.run and pod is not None and step.lifecycle.get("volumeClaimName"):
            await self._own_claim(sandbox, str(step.lifecycle["volumeClaimName"]))

        if expired:
            assert deadlines.delete_at is not None
            step.requeue.append((deadlines.delete_at - now).total_seconds())
        elif deadlines.expires_at is not None:
            step.requeue.append((deadlines.expires_at - now).total_seconds())
        return max(0.05, min(step.requeue)) if step.requeue else None

    # -- pause, resume, idle ----------------------------------------------------------------

    async def _pause(
        self, sandbox: Obj, pod: Obj | None, intent: Intent, step: _Step, events: list[Event]
    ) -> None:
        """Snapshot the sandbox to its claim, record it, then free the pod.

        The status write comes before the pod's delete, so a crash in between never leaves a
        snapshot status does not know about; the claim is re-owned by the sandbox before the
        pod (its first owner for a warm pod) goes, so the volume outlives it.
        """
        step.paused = True
        step.pod_after_pause = pod
        if pod is None or pod["metadata"].get("deletionTimestamp"):
            return  # nothing runs (or it is going): Paused once its DELETED event arrives
        meta = pod["metadata"]
        namespace = meta["namespace"]
        current = sandbox.get("status") or {}
        was_ready = (
            current.get("podName") == meta["name"]
            and (current.get("claim") or {}).get("latencyMs") is not None
        )
        ready = sandbox_decisions.is_ready(pod) and sandbox_decisions.is_live(pod)
        if not ready and was_ready and not _restoring(pod):
            # It ran and holds work, but its runtime does not answer now (restarting): wait.
            step.warning = (
                "SnapshotFailed",
                f"pod {meta['name']} is not ready, so its state cannot be snapshotted yet; "
                "the pause waits for it",
            )
            step.requeue.append(RUNTIME_RETRY_S)
            return
        claim = pod["spec"].get("claimName")
        if ready and not _restoring(pod):
            endpoint = _endpoint(pod)
            if endpoint is None or claim is None:
                step.warning = (
                    "SnapshotFailed",
                    f"pod {meta['name']} has no "
                    + ("IP" if endpoint is None else "persistent volume")
                    + " to snapshot through; the pause waits",
                )
                step.requeue.append(RUNTIME_RETRY_S)
                return
            await self._own_claim(sandbox, claim)
            try:
                answer = await self.runtime.snapshot(endpoint, self.tokens.for_pod(pod))
            except RuntimeCallError as error:
                step.warning = (
                    "SnapshotFailed",
                    f"snapshot failed, the pod keeps running: {error}",
                )
                step.requeue.append(RUNTIME_RETRY_S)
                return
            taken = format_ms(datetime.now(UTC))
            snapshot = sandbox_pause.snapshot_status(answer, taken)
            step.lifecycle |= {
                "snapshot": snapshot,
                "volumeClaimName": claim,
                "auditHead": sandbox_pause.later_head(
                    current.get("auditHead"), answer.get("auditHead")
                ),
            }
            record = {**step.lifecycle, "phase": "Pausing"}
            await self._write_status(AGENT_SANDBOX, sandbox, record)
            events.append(
                Event(
                    "Normal",
                    "Snapshotted",
                    f"snapshot {snapshot['generation']} ({snapshot['sizeBytes']} bytes) of pod "
                    f"{meta['name']} written to claim {claim}",
                )
            )
        elif claim is not None:
            await self._own_claim(sandbox, claim)
        await self.api.delete(POD, namespace, meta["name"], uid=meta["uid"])
        # Until the watch says so, the cache must not offer this pod for a second snapshot.
        going = {**pod, "metadata": {**meta, "deletionTimestamp": format_ms(datetime.now(UTC))}}
        self.pods.upsert(going)
        step.pod_after_pause = self.pods.get(namespace, meta["name"])
        why = "idle timeout" if intent.pause_reason == sandbox_pause.IDLE else "spec.mode Paused"
        events.append(Event("Normal", "Paused", f"{why}: pod {meta['name']} deleted"))

    async def _ensure_token_secret(self, pod: Obj) -> bool:
        """The Secret with the pod's runtime token (for the sandbox's users); False for a pod
        without a token. Created right after the pod, and here again after an operator
        restart (an existing one is fine: the token is derived, so it is the same)."""
        meta = pod["metadata"]
        key = f"{meta['namespace']}/{meta['name']}"
        if key in self._secrets_made:
            return True
        token = self.tokens.for_pod(pod)
        if token is None:
            return False
        try:
            await self.api.create(
                SECRET, meta["namespace"], sandbox_builder.build_token_secret(pod, token)
            )
        except ApiError as error:
            if error.status != 409:
                raise
        self._secrets_made.add(key)
        return True

    async def _own_claim(self, sandbox: Obj, claim: str) -> None:
        """Make the sandbox the owner of its claim (a warm pod's claim starts out the pod's)."""
        meta = sandbox["metadata"]
        if self._owned_claims.get(str(meta["uid"])) == claim:
            return
        pvc = await self.api.get(PERSISTENT_VOLUME_CLAIM, meta["namespace"], claim)
        if pvc is None:
            return  # not created yet; tried again on the next reconcile
        if controller_uid(pvc) != meta["uid"]:
            patch = {
                "metadata": {
                    "resourceVersion": pvc["metadata"]["resourceVersion"],
                    "labels": {LABEL_SANDBOX: meta["name"]},
                    "ownerReferences": [owner_reference(sandbox)],
                }
            }
            await self.api.merge_patch(PERSISTENT_VOLUME_CLAIM, meta["namespace"], claim, patch)
        self._owned_claims[str(meta["uid"])] = claim

    async def _start_resume(
        self,
        sandbox: Obj,
        *,
        spec: AgentSandboxSpec,
        template: Obj,
        template_spec: SandboxTemplateSpec,
        generation: int,
        events: list[Event],
    ) -> Obj | None:
        """A fresh pod on the sandbox's claim; the snapshot is restored once it is ready."""
        meta = sandbox["metadata"]
        claim = str((sandbox.get("status") or {})["volumeClaimName"])
        pod_name = sandbox_builder.resume_pod_name(meta["name"], generation)
        body = sandbox_builder.build_pod(
            template,
            template_spec,
            PodOwner(sandbox, sandbox=meta["name"]),
            name=pod_name,
            token=self.tokens.issue(meta["namespace"], pod_name),
            claim_name=claim,
            extra_env=spec.env,
            annotations={
                ANNOTATION_CLAIM_SOURCE: "Resume",
                ANNOTATION_CLAIMED_AT: format_ms(datetime.now(UTC)),
            },
        )
        pod = await self._create_own_pod(sandbox, body)
        if pod is not None:
            message = f"created pod {pod_name} on claim {claim} to restore snapshot {generation}"
            events.append(Event("Normal", "Resuming", message))
        return pod

    async def _restore(self, sandbox: Obj, pod: Obj, step: _Step, events: list[Event]) -> Obj:
        """Restore the recorded snapshot into a resumed pod and check the audit chain."""
        status = sandbox.get("status") or {}
        generation = int((status.get("snapshot") or {}).get("generation") or 0)
        meta = pod["metadata"]
        endpoint = _endpoint(pod)
        if endpoint is None:
            step.requeue.append(RUNTIME_RETRY_S)
            return pod
        token = self.tokens.for_pod(pod)
        try:
            try:
                answer = await self.runtime.restore(endpoint, token, generation, fallback=False)
            except RuntimeCallError as error:
                if not error.corrupt:
                    raise
                answer = await self.runtime.restore(endpoint, token, generation, fallback=True)
                step.warning = (
                    "RestoreFailed",
                    f"snapshot {generation} is corrupt ({error}); restored the previous good "
                    f"snapshot {answer.get('generation')} instead: work after it is lost",
                )
            verification = await self.runtime.verify_audit(endpoint, token, status.get("auditHead"))
        except RuntimeCallError as error:
            step.warning = ("RestoreFailed", f"restoring snapshot {generation} failed: {error}")
            step.requeue.append(RUNTIME_RETRY_S)
            return pod
        if verification.ok:
            step.lifecycle["auditHead"] = verification.head.to_dict()
        else:
            step.warning = (
                "AuditVerificationFailed",
                f"the audit log restored into pod {meta['name']} does not contain the anchored "
                f"entry {(status.get('auditHead') or {}).get('seq')}: {verification.error}",
            )
        step.lifecycle["lastActivityTime"] = format_ms(datetime.now(UTC))
        patched = await self.api.merge_patch(
            POD,
            meta["namespace"],
            meta["name"],
            {"metadata": {"annotations": {ANNOTATION_RESTORED: str(answer.get("generation"))}}},
        )
        self.observe("MODIFIED", patched)
        events.append(
            Event(
                "Normal",
                "Resumed",
                f"restored snapshot {answer.get('generation')} ({answer.get('files')} files, "
                f"{answer.get('dataBytes')} bytes) into pod {meta['name']}",
            )
        )
        return self.pods.get(meta["namespace"], meta["name"]) or pod

    async def _idle(
        self,
        sandbox: Obj,
        pod: Obj,
        *,
        idle_timeout_s: int,
        step: _Step,
        events: list[Event],
        now: datetime,
    ) -> bool:
        """Whether the idle timeout has passed; asks the runtime only once it may have."""
        status = sandbox.get("status") or {}
        annotations = pod["metadata"].get("annotations") or {}
        claimed = parse_time(annotations.get(ANNOTATION_CLAIMED_AT))
        recorded = parse_time(status.get("lastActivityTime"))
        if status.get("podName") != pod["metadata"]["name"]:
            recorded = None  # a new pod: its clock starts at its claim
        last = (
            max(t for t in (recorded, claimed, None) if t is not None)
            if (recorded or claimed)
            else now
        )
        if recorded is None:
            step.lifecycle["lastActivityTime"] = format_ms(last)
        due = sandbox_pause.idle_deadline(last, idle_timeout_s)
        if due is None:
            return False
        if now < due:
            step.requeue.append((due - now).total_seconds())
            return False
        endpoint = _endpoint(pod)
        if endpoint is None:
            return False
        try:
            health = await self.runtime.health(endpoint, self.tokens.for_pod(pod))
        except RuntimeCallError as error:
            logger.info("idle check of %s: %s", pod["metadata"]["name"], error)
            step.requeue.append(RUNTIME_RETRY_S)
            return False
        if health.last_activity is not None and health.last_activity > last:
            last = health.last_activity
        step.lifecycle["lastActivityTime"] = format_ms(last)
        head = sandbox_pause.later_head(status.get("auditHead"), health.audit_head)
        if head is not None:
            step.lifecycle["auditHead"] = head
        due = last + timedelta(seconds=idle_timeout_s)
        if health.running_commands or now < due:
            step.requeue.append(max(1.0, (due - now).total_seconds()))
            return False
        message = f"no runtime call for {idle_timeout_s}s (the last at {format_ms(last)}): pausing"
        events.append(Event("Normal", "IdleTimeout", message))
        return True

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
        persistence: Persistence | None,
        events: list[Event],
    ) -> Obj | None:
        """Adopt a warm pod, else cold-start one; the events say which and why."""
        name = sandbox["metadata"]["name"]
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
        claim: str | None = None
        if persistence is not None and persistence.enabled:
            claim = sandbox_builder.sandbox_claim_name(name)
            await self._create_sandbox_claim(sandbox, claim, template, persistence)
        body = sandbox_builder.build_pod(
            template,
            template_spec,
            PodOwner(sandbox, sandbox=name),
            name=name,
            token=self.tokens.issue(sandbox["metadata"]["namespace"], name),
            claim_name=claim,
            extra_env=spec.env,
            annotations={
                ANNOTATION_CLAIM_SOURCE: "Cold",
                ANNOTATION_CLAIMED_AT: format_ms(started),
            },
        )
        pod = await self._create_own_pod(sandbox, body)
        if pod is not None:
            events.append(Event("Normal", "ColdStarted", f"created pod {name}: {why}"))
        return pod

    async def _create_sandbox_claim(
        self, sandbox: Obj, claim: str, template: Obj, persistence: Persistence
    ) -> None:
        """The cold-started sandbox's claim, owned by it; one left by an earlier sandbox of
        the same name (garbage collection pending) is not taken over: its snapshots are not
        this sandbox's."""
        meta = sandbox["metadata"]
        token = f"{meta['namespace']}/{claim}"
        if token in self._claims_made:
            return
        body = sandbox_builder.build_state_claim(
            sandbox, claim, template["metadata"]["name"], persistence
        )
        try:
            await self.api.create(PERSISTENT_VOLUME_CLAIM, meta["namespace"], body)
        except ApiError as error:
            if error.status != 409:
                raise
            existing = await self.api.get(PERSISTENT_VOLUME_CLAIM, meta["namespace"], claim)
            if existing is not None and controller_uid(existing) != meta["uid"]:
                raise ApiError(
                    409,
                    "Conflict",
                    f"PersistentVolumeClaim {claim} belongs to an earlier sandbox of this name; "
                    "waiting for it to be deleted",
                ) from None
        self._claims_made.add(token)

    async def _create_own_pod(self, sandbox: Obj, body: dict[str, Any]) -> Obj | None:
        """Create one of the sandbox's own pods (cold start, resume); an existing pod of the
        same name is taken when it is this sandbox's (a create whose answer was lost)."""
        meta = sandbox["metadata"]
        namespace, pod_name = meta["namespace"], body["metadata"]["name"]
        try:
            created = await self.api.create(POD, namespace, body)
        except ApiError as error:
            if error.status != 409:
                raise
            # A pod of this name exists: ours (a create whose answer was lost), else a
            # same-named sandbox's pod that garbage collection has not removed yet.
            found = await self._find_bound(namespace, pod_name, meta["name"], str(meta["uid"]))
            if found is None:
                raise
            return found
        self.observe("ADDED", created)
        await self._ensure_token_secret(created)
        return self.pods.get(namespace, pod_name)

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


def _suffix() -> str:
    return "".join(secrets.choice(_NAME_ALPHABET) for _ in range(5))


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
