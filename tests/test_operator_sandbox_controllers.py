"""The sandbox controllers against an in-memory API server that keeps resourceVersions.

The fake answers the calls the controllers make (create, merge patch with a resourceVersion
precondition, delete with preconditions, status patch, apply, get) the way the API server
does, including 409 on a stale resourceVersion, so claims race as they would for real.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kleave.operator.kube import (
    AGENT_SANDBOX,
    NETWORK_POLICY,
    POD,
    RUNTIME_CLASS,
    SANDBOX_TEMPLATE,
    SANDBOX_WARM_POOL,
    ApiError,
    ResourceType,
    resource_of,
)
from kleave.operator.naming import (
    ANNOTATION_CLAIM_SOURCE,
    LABEL_SANDBOX,
    LABEL_WARM_POOL,
)
from kleave.operator.sandbox_controllers import (
    POOL_KEY,
    ClaimConflictError,
    SandboxControllers,
)
from kleave.operator.sandbox_tokens import RuntimeTokens
from kleave.operator.workqueue import WorkQueue

Obj = dict[str, Any]
NS = "ns"


def _merge(target: Obj, patch: Mapping[str, Any]) -> Obj:
    """RFC 7386 JSON merge patch."""
    out = dict(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class FakeKube:
    """Just enough of the API server for the sandbox controllers."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], Obj] = {}
        self._rv = itertools.count(100)
        self._uid = itertools.count(1)
        self.events: list[Obj] = []
        self.calls: list[tuple[str, str, str]] = []
        self.fail_patch: Callable[[str], bool] = lambda _name: False
        self.runtime_classes = {"kleave-microvm"}

    def _stamp(self, obj: Obj) -> Obj:
        obj["metadata"]["resourceVersion"] = str(next(self._rv))
        return obj

    def put(self, rt: ResourceType, obj: Obj) -> Obj:
        meta = obj["metadata"]
        meta.setdefault("uid", f"uid-{next(self._uid)}")
        meta.setdefault("creationTimestamp", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        meta.setdefault("generation", 1)
        obj.setdefault("apiVersion", rt.api_version)
        obj.setdefault("kind", rt.kind)
        self.objects[(rt.plural, meta.get("namespace") or "", meta["name"])] = self._stamp(obj)
        return copy.deepcopy(obj)

    def pods(self) -> list[Obj]:
        return [o for (plural, _, _), o in self.objects.items() if plural == "pods"]

    # -- the KubeApi surface ------------------------------------------------------------------

    async def create(self, rt: ResourceType, namespace: str | None, obj: Any) -> Obj:
        await asyncio.sleep(0)
        if rt.kind == "Event":
            self.events.append(obj)
            return dict(obj)
        obj = copy.deepcopy(obj)
        meta = obj["metadata"]
        if "name" not in meta:
            meta["name"] = meta.pop("generateName") + f"{next(self._uid):05d}"
        key = (rt.plural, namespace or "", meta["name"])
        if key in self.objects:
            raise ApiError(409, "AlreadyExists", f"{meta['name']} already exists")
        self.calls.append(("create", rt.kind, meta["name"]))
        return self.put(rt, obj)

    async def merge_patch(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        patch: Mapping[str, Any],
        subresource: str = "",
    ) -> Obj:
        await asyncio.sleep(0)
        key = (rt.plural, namespace or "", name)
        current = self.objects.get(key)
        if current is None:
            raise ApiError(404, "NotFound", name)
        wanted = patch.get("metadata", {}).get("resourceVersion")
        if self.fail_patch(name) or (
            wanted is not None and wanted != current["metadata"]["resourceVersion"]
        ):
            raise ApiError(409, "Conflict", "the object has been modified")
        self.calls.append(("patch", rt.kind, name))
        updated = _merge(current, patch)
        self.objects[key] = self._stamp(updated)
        return copy.deepcopy(updated)

    async def patch_status(
        self, rt: ResourceType, namespace: str | None, name: str, status: Mapping[str, Any]
    ) -> Obj:
        return await self.merge_patch(rt, namespace, name, {"status": dict(status)})

    async def apply(self, obj: Mapping[str, Any], **_: Any) -> Obj:
        rt = resource_of(obj)
        self.calls.append(("apply", rt.kind, obj["metadata"]["name"]))
        return self.put(rt, copy.deepcopy(dict(obj)))

    async def get(self, rt: ResourceType, namespace: str | None, name: str) -> Obj | None:
        if rt is RUNTIME_CLASS:
            return {"metadata": {"name": name}} if name in self.runtime_classes else None
        found = self.objects.get((rt.plural, namespace or "", name))
        return copy.deepcopy(found) if found else None

    async def delete(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        *,
        uid: str | None = None,
        resource_version: str | None = None,
    ) -> bool:
        await asyncio.sleep(0)
        key = (rt.plural, namespace or "", name)
        current = self.objects.get(key)
        if current is None:
            return False
        meta = current["metadata"]
        if (uid and meta["uid"] != uid) or (
            resource_version and meta["resourceVersion"] != resource_version
        ):
            return False
        self.calls.append(("delete", rt.kind, name))
        del self.objects[key]
        return True


def template(name: str = "coder", **spec: Any) -> Obj:
    return {"metadata": {"name": name, "namespace": NS}, "spec": {"image": "img:1", **spec}}


def pool(name: str = "pool", replicas: int = 3, tmpl: str = "coder") -> Obj:
    return {
        "metadata": {"name": name, "namespace": NS},
        "spec": {"templateRef": {"name": tmpl}, "replicas": replicas},
    }


def sandbox(name: str, *, pool_ref: str | None = "pool", **spec: Any) -> Obj:
    ref = {"warmPoolRef": {"name": pool_ref}} if pool_ref else {"templateRef": {"name": "coder"}}
    return {"metadata": {"name": name, "namespace": NS}, "spec": {**ref, **spec}}


class Harness:
    def __init__(self) -> None:
        self.kube = FakeKube()
        self.ctl = SandboxControllers(
            self.kube,  # type: ignore[arg-type]
            tokens=RuntimeTokens(b"k" * 32),
        )
        self.ctl.queue = WorkQueue()

    def add(self, rt: ResourceType, obj: Obj) -> Obj:
        stored = self.kube.put(rt, obj)
        self.ctl.observe("ADDED", stored)
        return stored

    def get(self, rt: ResourceType, name: str) -> Obj:
        return self.kube.objects[(rt.plural, NS, name)]

    def make_pods_ready(self) -> None:
        for pod in self.kube.pods():
            if (pod.get("status") or {}).get("phase") != "Running":
                pod["status"] = {
                    "phase": "Running",
                    "podIP": "10.0.0.9",
                    "conditions": [{"type": "Ready", "status": "True"}],
                }
                self.kube._stamp(pod)
                self.ctl.observe("MODIFIED", copy.deepcopy(pod))

    async def setup_pool(self, replicas: int = 3) -> None:
        self.add(SANDBOX_TEMPLATE, template())
        await self.ctl.reconcile_template(NS, "coder")
        self.add(SANDBOX_WARM_POOL, pool(replicas=replicas))
        await self.ctl.reconcile_pool(NS, "pool")
        self.make_pods_ready()
        await self.ctl.reconcile_pool(NS, "pool")


def run(body: Callable[[Harness], Awaitable[None]]) -> None:
    async def main() -> None:
        harness = Harness()
        try:
            await body(harness)
        finally:
            harness.ctl.queue.close()

    asyncio.run(asyncio.wait_for(main(), timeout=20))


def unclaimed(kube: FakeKube) -> list[Obj]:
    return [p for p in kube.pods() if LABEL_WARM_POOL in p["metadata"]["labels"]]


def bound(kube: FakeKube) -> dict[str, str]:
    """pod -> sandbox, for every pod bound to a sandbox."""
    return {
        p["metadata"]["name"]: p["metadata"]["labels"][LABEL_SANDBOX]
        for p in kube.pods()
        if LABEL_SANDBOX in p["metadata"]["labels"]
    }


def test_template_gets_its_hash_conditions_and_network_policies() -> None:
    async def body(h: Harness) -> None:
        egress = {"allow": [{"host": "pkg.example.com", "ports": [{"port": 443}]}]}
        h.add(SANDBOX_TEMPLATE, template(egress=egress))
        assert await h.ctl.reconcile_template(NS, "coder") is None
        status = h.get(SANDBOX_TEMPLATE, "coder")["status"]
        assert len(status["templateHash"]) == 10
        conds = {c["type"]: c for c in status["conditions"]}
        assert conds["Accepted"]["status"] == "True"
        assert conds["EgressEnforced"]["status"] == "False"
        assert "pkg.example.com" in conds["EgressEnforced"]["message"]
        assert ("NetworkPolicy", "coder-sandbox") in {
            (k, n) for _, k, n in h.kube.calls if _ == "apply"
        }
        assert (NETWORK_POLICY.plural, NS, "kleave-sandbox-baseline") in h.kube.objects
        assert [e["reason"] for e in h.kube.events] == ["HostRulesNotEnforced"]
        # A second reconcile writes nothing.
        h.kube.calls.clear()
        await h.ctl.reconcile_template(NS, "coder")
        assert h.kube.calls == []

    run(body)


def test_a_missing_runtime_class_stops_the_pool_from_creating_pods() -> None:
    async def body(h: Harness) -> None:
        h.kube.runtime_classes.clear()
        h.add(SANDBOX_TEMPLATE, template())
        assert await h.ctl.reconcile_template(NS, "coder") == 30.0
        accepted = h.get(SANDBOX_TEMPLATE, "coder")["status"]["conditions"][0]
        assert (accepted["type"], accepted["reason"]) == ("Accepted", "RuntimeClassNotFound")
        h.add(SANDBOX_WARM_POOL, pool())
        await h.ctl.reconcile_pool(NS, "pool")
        assert h.kube.pods() == []
        degraded = {c["type"]: c for c in h.get(SANDBOX_WARM_POOL, "pool")["status"]["conditions"]}
        assert degraded["Degraded"]["reason"] == "TemplateNotAccepted"

    run(body)


def test_pool_fills_owns_its_pods_and_reports_status() -> None:
    async def body(h: Harness) -> None:
        await h.setup_pool(replicas=4)
        pods = unclaimed(h.kube)
        assert len(pods) == 4
        for pod in pods:
            assert pod["metadata"]["ownerReferences"][0]["kind"] == "SandboxWarmPool"
            assert pod["metadata"]["name"].startswith("pool-")
        status = h.get(SANDBOX_WARM_POOL, "pool")["status"]
        assert (status["replicas"], status["readyReplicas"]) == (4, 4)
        assert status["templateHash"] == h.get(SANDBOX_TEMPLATE, "coder")["status"]["templateHash"]

    run(body)


def test_claims_are_warm_until_the_pool_is_empty_then_cold() -> None:
    async def body(h: Harness) -> None:
        await h.setup_pool(replicas=3)
        for n in range(4):
            h.add(AGENT_SANDBOX, sandbox(f"s{n}"))
            await h.ctl.reconcile_sandbox(NS, f"s{n}")
        sources = {n: h.get(AGENT_SANDBOX, f"s{n}")["status"]["claim"]["source"] for n in range(4)}
        assert sources == {0: "Warm", 1: "Warm", 2: "Warm", 3: "Cold"}
        cold = h.get(POD, "s3")
        assert cold["metadata"]["ownerReferences"][0]["name"] == "s3"
        assert cold["metadata"]["annotations"][ANNOTATION_CLAIM_SOURCE] == "Cold"
        warm_status = h.get(AGENT_SANDBOX, "s0")["status"]
        assert warm_status["phase"] == "Ready"
        assert warm_status["endpoint"] == "10.0.0.9:8080"
        assert warm_status["claim"]["latencyMs"] >= 0
        pod = h.get(POD, warm_status["podName"])
        assert pod["metadata"]["ownerReferences"] == [
            {
                "apiVersion": "kleave.dev/v1alpha1",
                "kind": "AgentSandbox",
                "name": "s0",
                "uid": h.get(AGENT_SANDBOX, "s0")["metadata"]["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert h.get(AGENT_SANDBOX, "s3")["status"]["phase"] == "Starting"
        reasons = [e["reason"] for e in h.kube.events]
        assert reasons.count("Claimed") == 3 and reasons.count("ColdStarted") == 1
        # The claims enqueued the pool, which refills and counts them.
        await h.ctl.reconcile_pool(NS, "pool")
        assert len(unclaimed(h.kube)) == 3
        assert h.get(SANDBOX_WARM_POOL, "pool")["status"]["claimed"] == 3
        # Reconciling again changes nothing: no pod is claimed twice, none created.
        h.kube.calls.clear()
        for n in range(4):
            await h.ctl.reconcile_sandbox(NS, f"s{n}")
        assert [c for c in h.kube.calls if c[0] != "patch" or c[1] != "AgentSandbox"] == []

    run(body)


def test_concurrent_claims_never_share_a_pod() -> None:
    async def body(h: Harness) -> None:
        await h.setup_pool(replicas=10)
        for n in range(50):
            h.add(AGENT_SANDBOX, sandbox(f"s{n}"))
        await asyncio.gather(*(h.ctl.reconcile_sandbox(NS, f"s{n}") for n in range(50)))
        pods = bound(h.kube)
        assert sorted(pods.values()) == sorted(f"s{n}" for n in range(50))  # one pod each
        names = [h.get(AGENT_SANDBOX, f"s{n}")["status"]["podName"] for n in range(50)]
        assert len(set(names)) == 50
        sources = [h.get(AGENT_SANDBOX, f"s{n}")["status"]["claim"]["source"] for n in range(50)]
        assert sources.count("Warm") == 10 and sources.count("Cold") == 40

    run(body)


def test_a_lost_race_moves_on_to_the_next_pod() -> None:
    async def body(h: Harness) -> None:
        await h.setup_pool(replicas=3)
        first = sorted(p["metadata"]["name"] for p in unclaimed(h.kube))[0]
        # Another claimant changes the first candidate after this cache read it: 409.
        h.kube.fail_patch = lambda name: name == first
        h.add(AGENT_SANDBOX, sandbox("s0"))
        await h.ctl.reconcile_sandbox(NS, "s0")
        status = h.get(AGENT_SANDBOX, "s0")["status"]
        assert status["claim"]["source"] == "Warm" and status["podName"] != first

    run(body)


def test_when_every_candidate_conflicts_the_claim_retries_instead_of_cold_starting() -> None:
    async def body(h: Harness) -> None:
        await h.setup_pool(replicas=2)
        h.kube.fail_patch = lambda name: True
        h.add(AGENT_SANDBOX, sandbox("s0"))
        with pytest.raises(ClaimConflictError):
            await h.ctl.reconcile_sandbox(NS, "s0")
        assert bound(h.kube) == {} and h.ctl._busy == set()
        h.kube.fail_patch = lambda name: False
        await h.ctl.reconcile_sandbox(NS, "s0")  # the retry
        assert h.get(AGENT_SANDBOX, "s0")["status"]["claim"]["source"] == "Warm"

    run(body)


def test_a_claim_whose_status_write_was_lost_is_found_again() -> None:
    async def body(h: Harness) -> None:
        await h.setup_pool(replicas=2)
        h.add(AGENT_SANDBOX, sandbox("s0"))
        await h.ctl.reconcile_sandbox(NS, "s0")
        pod_name = h.get(AGENT_SANDBOX, "s0")["status"]["podName"]
        # An operator restart before the status write: the sandbox has no status at all.
        h.get(AGENT_SANDBOX, "s0").pop("status")
        restarted = SandboxControllers(h.kube)  # type: ignore[arg-type]
        restarted.queue = h.ctl.queue
        for _rt, objs in (
            (SANDBOX_TEMPLATE, [h.get(SANDBOX_TEMPLATE, "coder")]),
            (SANDBOX_WARM_POOL, [h.get(SANDBOX_WARM_POOL, "pool")]),
            (AGENT_SANDBOX, [h.get(AGENT_SANDBOX, "s0")]),
            (POD, h.kube.pods()),
        ):
            for obj in objs:
                restarted.observe("ADDED", copy.deepcopy(obj))
        h.kube.calls.clear()
        await restarted.reconcile_sandbox(NS, "s0")
        status = h.get(AGENT_SANDBOX, "s0")["status"]
        assert status["podName"] == pod_name and status["claim"]["source"] == "Warm"
        assert [c for c in h.kube.calls if c[1] == "Pod"] == []  # nothing claimed or created
        assert list(bound(h.kube).values()) == ["s0"]

    run(body)


def test_the_pool_never_deletes_a_pod_claimed_meanwhile() -> None:
    async def body(h: Harness) -> None:
        await h.setup_pool(replicas=2)
        stale_view = [copy.deepcopy(p) for p in h.ctl.pods.in_pool(NS, "pool")]
        h.add(AGENT_SANDBOX, sandbox("s0"))
        await h.ctl.reconcile_sandbox(NS, "s0")
        claimed = h.get(AGENT_SANDBOX, "s0")["status"]["podName"]
        # The pool, scaled to 0, acts on a view from before the claim: the delete carries
        # the old resourceVersion and fails, so the claimed pod survives.
        for pod in stale_view:
            meta = pod["metadata"]
            await h.kube.delete(
                POD, NS, meta["name"], uid=meta["uid"], resource_version=meta["resourceVersion"]
            )
        assert (POD.plural, NS, claimed) in h.kube.objects
        assert list(bound(h.kube)) == [claimed]

    run(body)


def test_scale_down_and_template_roll_leave_claimed_pods_alone() -> None:
    async def body(h: Harness) -> None:
        await h.setup_pool(replicas=3)
        h.add(AGENT_SANDBOX, sandbox("s0"))
        await h.ctl.reconcile_sandbox(NS, "s0")
        claimed = h.get(AGENT_SANDBOX, "s0")["status"]["podName"]
        await h.ctl.reconcile_pool(NS, "pool")
        h.make_pods_ready()
        # The template changes: new pods first, old ones go once the new are ready.
        changed = h.get(SANDBOX_TEMPLATE, "coder")
        changed["spec"]["image"] = "img:2"
        changed["metadata"]["generation"] = 2
        h.ctl.observe("MODIFIED", copy.deepcopy(changed))
        await h.ctl.reconcile_template(NS, "coder")
        new_hash = h.get(SANDBOX_TEMPLATE, "coder")["status"]["templateHash"]
        await h.ctl.reconcile_pool(NS, "pool")
        assert len(unclaimed(h.kube)) == 6  # 3 old (still adoptable) + 3 new
        h.make_pods_ready()
        await h.ctl.reconcile_pool(NS, "pool")
        hashes = {p["metadata"]["labels"]["kleave.dev/template-hash"] for p in unclaimed(h.kube)}
        assert hashes == {new_hash} and len(unclaimed(h.kube)) == 3
        # Scale to 0: every unclaimed pod goes, the claimed one stays.
        scaled = h.get(SANDBOX_WARM_POOL, "pool")
        scaled["spec"]["replicas"] = 0
        h.ctl.observe("MODIFIED", copy.deepcopy(scaled))
        await h.ctl.reconcile_pool(NS, "pool")
        assert unclaimed(h.kube) == []
        assert list(bound(h.kube)) == [claimed]
        assert h.get(POD, claimed)["spec"]["containers"][0]["image"] == "img:1"

    run(body)


def test_template_ref_sandboxes_and_extra_env_cold_start() -> None:
    async def body(h: Harness) -> None:
        await h.setup_pool(replicas=2)
        h.add(AGENT_SANDBOX, sandbox("direct", pool_ref=None))
        await h.ctl.reconcile_sandbox(NS, "direct")
        h.add(AGENT_SANDBOX, sandbox("env", env=[{"name": "TASK", "value": "1"}]))
        await h.ctl.reconcile_sandbox(NS, "env")
        for name in ("direct", "env"):
            assert h.get(AGENT_SANDBOX, name)["status"]["claim"]["source"] == "Cold"
        env = h.get(POD, "env")["spec"]["containers"][0]["env"]
        assert {"name": "TASK", "value": "1"} in env
        assert len(unclaimed(h.kube)) == 2  # the pool was not touched
        messages = [e["message"] for e in h.kube.events if e["reason"] == "ColdStarted"]
        assert any("spec.templateRef" in m for m in messages)
        assert any("TASK" in m for m in messages)

    run(body)


def test_missing_pool_or_template_leaves_the_sandbox_pending_until_it_appears() -> None:
    async def body(h: Harness) -> None:
        h.add(AGENT_SANDBOX, sandbox("s0"))
        await h.ctl.reconcile_sandbox(NS, "s0")
        status = h.get(AGENT_SANDBOX, "s0")["status"]
        assert status["phase"] == "Pending"
        assert {c["type"]: c for c in status["conditions"]}["Degraded"]["reason"] == (
            "WarmPoolNotFound"
        )
        h.ctl.queue = WorkQueue()
        await h.setup_pool(replicas=1)
        queued = set(h.ctl.queue._queued)
        assert ("AgentSandbox", NS, "s0") in queued and (POOL_KEY, NS, "pool") in queued
        await h.ctl.reconcile_sandbox(NS, "s0")
        assert h.get(AGENT_SANDBOX, "s0")["status"]["claim"]["source"] == "Warm"

    run(body)


def test_max_lifetime_deletes_the_pod_then_the_sandbox_after_its_ttl() -> None:
    async def body(h: Harness) -> None:
        await h.setup_pool(replicas=1)
        lifetime = {"maxLifetimeSeconds": 60, "ttlSecondsAfterFinished": 600}
        h.add(AGENT_SANDBOX, sandbox("s0", lifetime=lifetime))
        requeue = await h.ctl.reconcile_sandbox(NS, "s0")
        assert requeue is not None and requeue > 0
        pod_name = h.get(AGENT_SANDBOX, "s0")["status"]["podName"]

        def age(seconds: int) -> None:
            created = datetime.now(UTC) - timedelta(seconds=seconds)
            obj = h.get(AGENT_SANDBOX, "s0")
            obj["metadata"]["creationTimestamp"] = created.strftime("%Y-%m-%dT%H:%M:%SZ")
            h.ctl.observe("MODIFIED", copy.deepcopy(obj))

        age(120)  # past maxLifetimeSeconds
        requeue = await h.ctl.reconcile_sandbox(NS, "s0")
        assert requeue is not None and 400 < requeue <= 540
        status = h.get(AGENT_SANDBOX, "s0")["status"]
        assert status["phase"] == "Terminating" and "podName" not in status
        assert (POD.plural, NS, pod_name) not in h.kube.objects
        assert "Expired" in [e["reason"] for e in h.kube.events]
        age(700)  # past the TTL too
        await h.ctl.reconcile_sandbox(NS, "s0")
        assert (AGENT_SANDBOX.plural, NS, "s0") not in h.kube.objects

    run(body)


def test_a_deleted_pod_fails_the_sandbox_instead_of_replacing_it_silently() -> None:
    async def body(h: Harness) -> None:
        await h.setup_pool(replicas=1)
        h.add(AGENT_SANDBOX, sandbox("s0"))
        await h.ctl.reconcile_sandbox(NS, "s0")
        pod = h.get(AGENT_SANDBOX, "s0")["status"]["podName"]
        removed = h.kube.objects.pop((POD.plural, NS, pod))
        h.ctl.observe("DELETED", removed)
        await h.ctl.reconcile_sandbox(NS, "s0")
        status = h.get(AGENT_SANDBOX, "s0")["status"]
        assert status["phase"] == "Failed"
        assert {c["type"]: c for c in status["conditions"]}["Degraded"]["reason"] == "PodLost"
        assert list(bound(h.kube)) == []  # no replacement pod

    run(body)
