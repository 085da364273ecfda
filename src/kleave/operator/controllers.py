"""The InferenceDeployment and InferencePool controllers: watch, queue, reconcile, apply.

kopf delivers watch events into :class:`~kleave.operator.store.Store` caches and enqueues the
affected object; workers reconcile keys from the caches with the pure decisions in
:mod:`rollout` and :mod:`pool_status`, apply with server-side apply (field manager
``kleave``), and write status. Each reconcile is idempotent and reads no events, so a restart,
a dropped event or a duplicate is harmless: the next reconcile converges.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Hashable, Mapping
from datetime import UTC, datetime
from typing import Any, cast

import kopf
from pydantic import ValidationError

from kleave.api.inference_deployment import InferenceDeploymentSpec
from kleave.api.inference_pool import ROLES
from kleave.api.vocabulary import Role
from kleave.operator import deployment_builder, engines, pool_builder, pool_status, rollout
from kleave.operator.cached_controller import CachedController, contains, status_patch
from kleave.operator.conditions import set_condition
from kleave.operator.events import EventRecorder
from kleave.operator.kube import (
    CONFIGMAP,
    DEPLOYMENT,
    INFERENCE_DEPLOYMENT,
    INFERENCE_POOL,
    NODE,
    POD,
    SERVICE,
    STATEFULSET,
    KubeApi,
    ResourceType,
)
from kleave.operator.naming import (
    LABEL_DEPLOYMENT,
    LABEL_POOL,
    LABEL_REVISION,
    MANAGED_BY,
    MANAGER,
    plan_configmap_name,
    pool_name,
    router_name,
)
from kleave.operator.planner_runner import PlannerRunner, merge_planner_status
from kleave.operator.serving_plan import build_plan
from kleave.operator.store import Store

logger = logging.getLogger("kleave.operator.controllers")

DEPLOYMENT_KEY = "InferenceDeployment"
POOL_KEY = "InferencePool"
MANAGED = {MANAGED_BY: MANAGER}
WATCHED: tuple[tuple[ResourceType, bool], ...] = (
    # (resource, only objects labelled managed-by=kleave)
    (INFERENCE_DEPLOYMENT, False),
    (INFERENCE_POOL, False),
    (DEPLOYMENT, True),
    (STATEFULSET, True),
    (SERVICE, True),
    (CONFIGMAP, True),
    (POD, True),
    (NODE, False),
)


class Controllers(CachedController):
    """Caches, the work queue, and the two reconcilers."""

    log = logger

    def __init__(self, api: KubeApi, *, workers: int = 16) -> None:
        super().__init__(api, workers=workers)
        self.recorder = EventRecorder(api)
        self.stores = {
            rt.kind: Store(rt.kind, index_label=LABEL_POOL if rt is POD else None)
            for rt, _ in WATCHED
        }
        self._gpu_nodes = pool_status.gpu_products(())
        self._primed = asyncio.Event()
        self.planner = PlannerRunner(
            api,
            self.stores["InferenceDeployment"],
            self.stores["InferencePool"],
            self.recorder,
            lambda namespace, name: self.queue.add((DEPLOYMENT_KEY, namespace, name)),
        )

    # -- watching ---------------------------------------------------------------------------

    def register(self, registry: kopf.OperatorRegistry) -> None:
        for rt, managed_only in WATCHED:
            kopf.on.event(
                rt.group,
                rt.version,
                rt.plural,
                registry=registry,
                id=f"cache-{rt.plural}",
                labels=MANAGED if managed_only else None,
            )(self._on_event)

    async def _on_event(self, event: Mapping[str, Any], **_: Any) -> None:
        obj = event.get("object")
        if not isinstance(obj, Mapping) or "metadata" not in obj:
            return
        self.observe(str(event.get("type") or ""), obj)

    def observe(self, event_type: str, obj: Mapping[str, Any]) -> None:
        """Update the cache with one watched object and enqueue whoever must react."""
        store = self.stores.get(str(obj.get("kind")))
        if store is None:
            return
        before = store.get(*Store.key_of(obj))
        if event_type == "DELETED":
            store.remove(obj)
            stored: Mapping[str, Any] = obj
        else:
            stored = store.upsert(obj)
            if store.kind in ("Pod", "Node") and before == stored:
                return  # a heartbeat or an unrelated field: nothing kleave reads changed
        if self.queue is not None:
            self._enqueue_for(stored)

    def _enqueue_for(self, obj: Mapping[str, Any]) -> None:
        kind = obj.get("kind")
        meta = obj["metadata"]
        namespace = meta.get("namespace") or ""
        labels = meta.get("labels") or {}
        if kind == "InferenceDeployment":
            self.queue.add((DEPLOYMENT_KEY, namespace, meta["name"]))
        elif kind == "InferencePool":
            self.queue.add((POOL_KEY, namespace, meta["name"]))
            if LABEL_DEPLOYMENT in labels:
                self.queue.add((DEPLOYMENT_KEY, namespace, labels[LABEL_DEPLOYMENT]))
        elif kind == "Node":
            products = pool_status.gpu_products(self.stores["Node"].all())
            if products != self._gpu_nodes:
                self._gpu_nodes = products
                for pool in self.stores["InferencePool"].all():
                    self.queue.add(
                        (POOL_KEY, pool["metadata"]["namespace"], pool["metadata"]["name"])
                    )
        elif LABEL_POOL in labels:
            self.queue.add((POOL_KEY, namespace, labels[LABEL_POOL]))
        elif LABEL_DEPLOYMENT in labels:  # the router, its Service, the plan ConfigMaps
            self.queue.add((DEPLOYMENT_KEY, namespace, labels[LABEL_DEPLOYMENT]))

    async def prime(self) -> None:
        """List everything once, so the first reconciles see complete caches."""
        for rt, managed_only in WATCHED:
            selector = f"{MANAGED_BY}={MANAGER}" if managed_only else ""
            items = [item async for item in self.api.list(rt, label_selector=selector)]
            self.stores[rt.kind].replace_all(items)
        self._gpu_nodes = pool_status.gpu_products(self.stores["Node"].all())

    async def run(self) -> None:
        try:
            await super().run()
        finally:
            self.planner.stop()

    def _enqueue_all(self) -> None:
        for kind, key_kind in (
            ("InferenceDeployment", DEPLOYMENT_KEY),
            ("InferencePool", POOL_KEY),
        ):
            for obj in self.stores[kind].all():
                self.queue.add((key_kind, obj["metadata"]["namespace"], obj["metadata"]["name"]))

    async def reconcile(self, key: Hashable) -> float | None:
        kind, namespace, name = cast("tuple[str, str, str]", key)
        if kind == DEPLOYMENT_KEY:
            return await self.reconcile_deployment(namespace, name)
        return await self.reconcile_pool(namespace, name)

    # -- InferenceDeployment ----------------------------------------------------------------

    async def reconcile_deployment(self, namespace: str, name: str) -> float | None:
        owner = self.stores["InferenceDeployment"].get(namespace, name)
        if owner is None or owner["metadata"].get("deletionTimestamp"):
            self.planner.sync(namespace, name, None)
            return None
        try:
            spec = InferenceDeploymentSpec.model_validate(owner.get("spec") or {})
            revision, plan = build_plan(spec, name=name, namespace=namespace)
        except (ValidationError, engines.EngineConfigError) as error:
            self.planner.sync(namespace, name, None)
            await self._reject(owner, error)
            return None
        self.planner.sync(namespace, name, spec)

        pools: dict[Role, Mapping[str, Any] | None] = {
            role: self.stores["InferencePool"].get(namespace, pool_name(name, role))
            for role in ROLES
        }
        router = self.stores["Deployment"].get(namespace, router_name(name))
        decision = rollout.decide(
            owner=owner,
            spec=spec,
            revision=revision,
            pools={role: pools[role] for role in spec.pools.defined()},
            router=router,
            now=datetime.now(UTC),
        )

        configmaps = self.stores["ConfigMap"]
        plan_cm = deployment_builder.build_plan_configmap(owner, revision, plan)
        await self._apply(plan_cm, configmaps.get(namespace, plan_configmap_name(name, revision)))

        for role, pool in spec.pools.defined().items():
            pool_plan = decision.pools[role]
            desired = deployment_builder.build_pool(
                owner,
                spec,
                role,
                pool,
                revision=revision,
                retain_revision=pool_plan.retain_revision,
                replicas=pool_plan.replicas,
            )
            current = pools[role]
            # A dropped field (retainRevision after a rollout) is invisible to `contains`.
            stale = current is not None and "retainRevision" in current.get("spec", {})
            if stale and "retainRevision" not in desired["spec"]:
                current = None
            elif pool_plan.conditional and current is not None:
                if contains(current, desired):
                    continue
                desired["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            await self._apply(desired, current)

        await self._apply(
            deployment_builder.build_router_service(owner, spec),
            self.stores["Service"].get(namespace, router_name(name)),
        )
        await self._apply(
            deployment_builder.build_router(
                owner, spec, revision=decision.router_revision, replicas=decision.router_replicas
            ),
            router,
        )

        # Pools of roles the spec no longer has, and plans of revisions nothing runs.
        uid = owner["metadata"]["uid"]
        for child in self.stores["InferencePool"].owned_by(uid):
            if child["spec"].get("role") not in spec.pools.defined():
                await self.api.delete(
                    INFERENCE_POOL, namespace, child["metadata"]["name"],
                    uid=child["metadata"]["uid"],
                )  # fmt: skip
        for cm in configmaps.owned_by(uid):
            if (cm["metadata"].get("labels") or {}).get(LABEL_REVISION) not in (
                decision.keep_revisions
            ):
                await self.api.delete(
                    CONFIGMAP, namespace, cm["metadata"]["name"], uid=cm["metadata"]["uid"]
                )

        planner_status, degraded = self.planner.status(namespace, name)
        status = merge_planner_status(
            decision.status,
            active=self.planner.active(namespace, name),
            planner=planner_status,
            degraded=degraded,
            generation=owner["metadata"].get("generation"),
            now=datetime.now(UTC),
        )
        await self._write_status(INFERENCE_DEPLOYMENT, owner, status)
        for event in decision.events:
            target = owner if event.on_pool is None else pools.get(event.on_pool)
            if target is not None:
                await self.recorder.post(target, event.type, event.reason, event.message)
        return None

    async def _reject(self, owner: Mapping[str, Any], error: Exception) -> None:
        """A spec the API server let through but kleave cannot serve: say why, do not retry."""
        if isinstance(error, ValidationError):
            message = "; ".join(
                "spec." + ".".join(str(p) for p in item["loc"]) + f": {item['msg']}"
                for item in error.errors(include_url=False)
            )
            reason = "InvalidSpec"
        else:
            message, reason = str(error), "UnsupportedConfiguration"
        status = owner.get("status") or {}
        generation = owner["metadata"].get("generation")
        conditions = set_condition(
            status.get("conditions"), type="Accepted", status="False", reason=reason,
            message=message[:1000], generation=generation, now=datetime.now(UTC),
        )  # fmt: skip
        desired: dict[str, Any] = {"conditions": conditions}
        if generation is not None:
            desired["observedGeneration"] = generation
        if status_patch(status, desired):
            await self.recorder.post(owner, "Warning", reason, message)
        await self._write_status(INFERENCE_DEPLOYMENT, owner, desired)

    # -- InferencePool ----------------------------------------------------------------------

    async def reconcile_pool(self, namespace: str, name: str) -> float | None:
        pool = self.stores["InferencePool"].get(namespace, name)
        if pool is None or pool["metadata"].get("deletionTimestamp"):
            return None
        uid = pool["metadata"]["uid"]
        workloads = [
            *self.stores["Deployment"].owned_by(uid),
            *self.stores["StatefulSet"].owned_by(uid),
        ]
        pods = self.stores["Pod"].labelled(namespace, name)
        decision = pool_status.decide(
            pool=pool, workloads=workloads, pods=pods, gpu_nodes=self._gpu_nodes,
            now=datetime.now(UTC),
        )  # fmt: skip

        revision = decision.revision
        desired = pool_builder.build_workload(pool, revision, decision.replicas)
        store = self.stores[desired["kind"]]
        await self._apply(desired, store.get(namespace, desired["metadata"]["name"]))
        service = pool_builder.build_service(pool, revision)
        await self._apply(
            service, self.stores["Service"].get(namespace, service["metadata"]["name"])
        )

        keep = {revision, pool["spec"].get("retainRevision")}
        for workload in decision.delete:
            meta = workload["metadata"]
            rt = STATEFULSET if workload["kind"] == "StatefulSet" else DEPLOYMENT
            await self.api.delete(rt, namespace, meta["name"], uid=meta["uid"])
        for svc in self.stores["Service"].owned_by(uid):
            if (svc["metadata"].get("labels") or {}).get(LABEL_REVISION) not in keep:
                meta = svc["metadata"]
                await self.api.delete(SERVICE, namespace, meta["name"], uid=meta["uid"])

        await self._write_status(INFERENCE_POOL, pool, decision.status)
        for event in decision.events:
            await self.recorder.post(pool, event.type, event.reason, event.message)
        ready = decision.status["readyReplicas"] >= decision.replicas
        return None if ready else pool_status.NOT_READY_GRACE_S
