"""Pause, resume and idle timeout: the controllers against the in-memory API server of
test_operator_sandbox_controllers and a real sandbox runtime serving on 127.0.0.1.

Each "pod" of a test is a real ``SandboxRuntime`` with its own workspace and state directory
(the pod's emptyDirs) and a shared snapshot directory (the sandbox's claim), so a resume
really restores into a fresh workspace what the pause wrote.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import socket
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kleave.api.agent_sandbox import AgentSandboxSpec
from kleave.api.sandbox_policy import ToolPolicy
from kleave.api.sandbox_template import SandboxTemplateSpec
from kleave.operator import sandbox_pause
from kleave.operator.kube import (
    AGENT_SANDBOX,
    PERSISTENT_VOLUME_CLAIM,
    POD,
    SANDBOX_TEMPLATE,
    SECRET,
)
from kleave.operator.naming import ANNOTATION_RESTORED, ANNOTATION_RESUME_REQUESTED
from kleave.operator.sandbox_tokens import digest
from kleave.sandbox.runtime import RuntimeConfig, SandboxRuntime
from kleave.sandbox.server import start_server
from test_operator_sandbox_controllers import NS, Harness, template

Obj = dict[str, Any]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Pod:
    """One sandbox pod's runtime: a fresh workspace and state dir, the claim's snapshots,
    and the token digest its pod annotation carries (as the pod's projected file would)."""

    def __init__(self, root: Path, claim: Path, port: int, token: str) -> None:
        self.runtime = SandboxRuntime(
            RuntimeConfig(
                workspace=root / "workspace",
                state_dir=root / "state",
                snapshot_dir=claim,
                policy=ToolPolicy.model_validate({"allowedCommands": ["ls"]}),
                token_sha256=digest(token),
                audit_fsync=False,
            )
        )
        self.port = port
        self.token = token
        self.runner: Any = None

    async def start(self) -> None:
        self.runner, _ = await start_server(self.runtime, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self.runner is None:
            return
        runner, self.runner = self.runner, None
        self.runtime.kill_all()
        await runner.cleanup()
        self.runtime.close()

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"}
        async with (
            aiohttp.ClientSession(headers=headers) as http,
            http.request(method, f"http://127.0.0.1:{self.port}{path}", **kwargs) as response,
        ):
            assert response.status < 300, await response.text()
            return await response.read()


class World:
    """The harness plus the runtimes standing in for the pods' containers."""

    def __init__(self, harness: Harness, tmp: Path) -> None:
        self.h = harness
        self.tmp = tmp
        self.port = _free_port()
        self.claim = tmp / "claim"
        self.pods: list[Pod] = []

    async def start_pod(self, name: str) -> Pod:
        token = self.h.ctl.tokens.for_pod(self.h.get(POD, name))
        assert token is not None
        pod = Pod(self.tmp / name, self.claim, self.port, token)
        await pod.start()
        self.pods.append(pod)
        obj = self.h.get(POD, name)
        obj["status"] = {
            "phase": "Running",
            "podIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": "True"}],
        }
        self.h.kube._stamp(obj)
        self.h.ctl.observe("MODIFIED", copy.deepcopy(obj))
        return pod

    def sandbox(self) -> Obj:
        return self.h.get(AGENT_SANDBOX, "s0")

    def status(self) -> Obj:
        return dict(self.sandbox().get("status") or {})

    def update(self, change: Callable[[Obj], None]) -> None:
        obj = self.sandbox()
        change(obj)
        self.h.kube._stamp(obj)
        self.h.ctl.observe("MODIFIED", copy.deepcopy(obj))

    def set_mode(self, mode: str) -> None:
        self.update(lambda obj: obj["spec"].__setitem__("mode", mode))

    def flush_deleted_pods(self) -> None:
        """The fake deletes at once; the controllers learn it from the DELETED event."""
        for name in list(self.h.ctl.pods._pods):
            if (POD.plural, *name) not in self.h.kube.objects:
                self.h.ctl.observe("DELETED", self.h.ctl.pods._pods[name])

    async def reconcile(self) -> float | None:
        return await self.h.ctl.reconcile_sandbox(NS, "s0")


def run(tmp_path: Path, body: Callable[[World], Awaitable[None]], **template_spec: Any) -> None:
    async def main() -> None:
        harness = Harness()
        world = World(harness, tmp_path)
        try:
            harness.add(SANDBOX_TEMPLATE, template(runtimePort=world.port, **template_spec))
            await harness.ctl.reconcile_template(NS, "coder")
            harness.add(
                AGENT_SANDBOX,
                {
                    "metadata": {"name": "s0", "namespace": NS},
                    "spec": {"templateRef": {"name": "coder"}},
                },
            )
            await body(world)
        finally:
            for pod in world.pods:
                await pod.stop()
            await harness.ctl.runtime.close()
            harness.ctl.queue.close()

    asyncio.run(asyncio.wait_for(main(), timeout=30))


def _conditions(status: Obj) -> dict[str, Obj]:
    return {c["type"]: c for c in status.get("conditions") or ()}


async def _start_ready(world: World) -> Pod:
    await world.reconcile()  # cold start: the claim and the pod
    assert (PERSISTENT_VOLUME_CLAIM.plural, NS, "s0-state") in world.h.kube.objects
    pod = await world.start_pod("s0")
    await world.reconcile()
    assert world.status()["phase"] == "Ready"
    return pod


async def _pause(world: World, pod: Pod) -> None:
    world.set_mode("Paused")
    await world.reconcile()
    status = world.status()
    assert status["phase"] == "Pausing"
    await pod.stop()
    world.flush_deleted_pods()
    await world.reconcile()


def test_pause_snapshots_to_the_claim_and_resume_restores_into_a_fresh_pod(
    tmp_path: Path,
) -> None:
    async def body(world: World) -> None:
        first = await _start_ready(world)
        await first.call("PUT", "/v1/files?path=notes/plan.md", data=b"step 1\n")
        await _pause(world, first)
        status = world.status()
        assert status["phase"] == "Paused" and "podName" not in status
        assert status["snapshot"]["generation"] == 1
        assert status["snapshot"]["checksum"] and status["snapshot"]["sizeBytes"] > 0
        assert status["volumeClaimName"] == "s0-state"
        assert status["auditHead"]["seq"] > 0
        assert _conditions(status)["Paused"]["status"] == "True"
        assert _conditions(status)["Paused"]["reason"] == "Requested"
        assert list(world.claim.glob("snap-*.tar"))  # on the claim, not in the pod
        reasons = [e["reason"] for e in world.h.kube.events]
        assert "Snapshotted" in reasons and "Paused" in reasons and "NotReady" not in reasons

        world.set_mode("Running")
        await world.reconcile()
        resumed = world.h.get(POD, "s0-r1")
        assert resumed["spec"]["volumes"][-1]["persistentVolumeClaim"]["claimName"] == "s0-state"
        assert world.status()["phase"] == "Resuming"
        second = await world.start_pod("s0-r1")
        await world.reconcile()
        status = world.status()
        assert status["phase"] == "Ready", status
        assert status["podName"] == "s0-r1" and status["claim"]["source"] == "Resume"
        assert status["claim"]["latencyMs"] >= 0
        assert world.h.get(POD, "s0-r1")["metadata"]["annotations"][ANNOTATION_RESTORED] == "1"
        assert _conditions(status)["Degraded"]["status"] == "False"
        assert await second.call("GET", "/v1/files?path=notes/plan.md") == b"step 1\n"
        # The sandbox's users find its current pod's token in its Secret.
        secret = world.h.get(SECRET, status["tokenSecretName"])
        assert base64.b64decode(secret["data"]["token"]).decode() == second.token
        assert base64.b64decode(secret["data"]["pod"]).decode() == "s0-r1"
        # The audit log came back with the workspace: the entry of the write is in it.
        log = [json.loads(line) for line in (await second.call("GET", "/v1/audit")).splitlines()]
        assert any(e["action"] == "file.write" for e in log)
        anchored = [e for e in log if e["seq"] == status["auditHead"]["seq"]]
        assert anchored and anchored[0]["hash"] == status["auditHead"]["hash"]
        assert anchored[0]["action"] == "restore"  # anchored after the restore, checked
        await world.reconcile()  # a second reconcile restores nothing again
        assert [e["reason"] for e in world.h.kube.events].count("Resumed") == 1

    run(tmp_path, body)


def test_a_lost_pod_comes_back_from_the_last_snapshot_with_a_warning(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        first = await _start_ready(world)
        await first.call("PUT", "/v1/files?path=kept.txt", data=b"before the pause")
        await _pause(world, first)
        world.set_mode("Running")
        await world.reconcile()
        second = await world.start_pod("s0-r1")
        await world.reconcile()
        assert world.status()["phase"] == "Ready"
        await second.stop()  # the node dies: the pod and its workspace are gone
        lost = world.h.kube.objects.pop((POD.plural, NS, "s0-r1"))
        world.h.ctl.observe("DELETED", lost)
        await world.reconcile()
        warnings = [e for e in world.h.kube.events if e["reason"] == "PodLost"]
        assert warnings and "snapshot 1" in warnings[-1]["message"]
        assert (POD.plural, NS, "s0-r1") in world.h.kube.objects  # a fresh pod, same claim
        third = await world.start_pod("s0-r1")
        await world.reconcile()
        assert world.status()["phase"] == "Ready"
        assert await third.call("GET", "/v1/files?path=kept.txt") == b"before the pause"

    run(tmp_path, body)


def test_a_rewritten_audit_log_is_reported_on_resume(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        first = await _start_ready(world)
        await first.call("PUT", "/v1/files?path=a.txt", data=b"a")
        await _pause(world, first)
        anchor = world.status()["auditHead"]
        # The log restored must contain the anchored entry; this anchor names another hash.
        world.update(
            lambda obj: obj["status"].__setitem__("auditHead", anchor | {"hash": "0" * 64})
        )
        world.set_mode("Running")
        await world.reconcile()
        await world.start_pod("s0-r1")
        await world.reconcile()
        degraded = _conditions(world.status())["Degraded"]
        assert degraded["status"] == "True" and degraded["reason"] == "AuditVerificationFailed"
        assert "rewritten" in degraded["message"]

    run(tmp_path, body)


def test_idle_timeout_pauses_and_a_resume_request_brings_it_back(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        world.update(lambda obj: obj["spec"].__setitem__("lifetime", {"idleTimeoutSeconds": 1}))
        first = await _start_ready(world)
        requeue = await world.reconcile()
        assert requeue is not None and requeue <= 1.0
        await asyncio.sleep(0.6)
        await first.call("GET", "/v1/files/list")  # the agent is busy: the clock restarts
        await asyncio.sleep(0.6)
        await world.reconcile()
        assert world.status()["phase"] == "Ready"
        await asyncio.sleep(1.1)
        await world.reconcile()
        status = world.status()
        assert status["phase"] == "Pausing" and status["idlePausedAt"]
        assert world.sandbox()["spec"].get("mode", "Running") == "Running"  # spec untouched
        await first.stop()
        world.flush_deleted_pods()
        await world.reconcile()
        status = world.status()
        assert status["phase"] == "Paused"
        assert _conditions(status)["Paused"]["reason"] == "IdleTimeout"
        assert "IdleTimeout" in [e["reason"] for e in world.h.kube.events]
        await world.reconcile()
        assert world.status()["phase"] == "Paused"  # stays paused without a request

        world.update(
            lambda obj: (
                obj["metadata"]
                .setdefault("annotations", {})
                .__setitem__(ANNOTATION_RESUME_REQUESTED, "2026-12-02T10:00:00.000Z")
            )
        )
        await world.reconcile()
        await world.start_pod("s0-r1")
        await world.reconcile()
        status = world.status()
        assert status["phase"] == "Ready" and status["claim"]["source"] == "Resume"
        assert "idlePausedAt" not in status
        assert status["resumeRequest"] == "2026-12-02T10:00:00.000Z"

    run(tmp_path, body)


def test_a_pause_without_persistence_keeps_the_sandbox_running(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        await world.reconcile()
        assert (PERSISTENT_VOLUME_CLAIM.plural, NS, "s0-state") not in world.h.kube.objects
        await world.start_pod("s0")
        world.set_mode("Paused")
        await world.reconcile()
        status = world.status()
        assert status["phase"] == "Ready"
        assert _conditions(status)["Degraded"]["reason"] == "PersistenceDisabled"
        assert (POD.plural, NS, "s0") in world.h.kube.objects

    run(tmp_path, body, persistence={"enabled": False})


def test_a_failed_snapshot_keeps_the_pod(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        first = await _start_ready(world)
        await first.stop()  # the runtime stops answering; kubelet has not noticed yet
        world.set_mode("Paused")
        requeue = await world.reconcile()
        status = world.status()
        assert requeue is not None and requeue <= 5
        assert status["phase"] == "Pausing"
        degraded = _conditions(status)["Degraded"]
        assert degraded["reason"] == "SnapshotFailed" and "keeps running" in degraded["message"]
        assert (POD.plural, NS, "s0") in world.h.kube.objects

    run(tmp_path, body)


# -- pure decisions -------------------------------------------------------------------------


def _spec(**fields: Any) -> AgentSandboxSpec:
    return AgentSandboxSpec.model_validate({"templateRef": {"name": "t"}, **fields})


def _obj(status: Obj | None = None, annotations: dict[str, str] | None = None) -> Obj:
    return {"metadata": {"annotations": annotations or {}}, "status": status or {}}


def test_intent_follows_mode_idle_pauses_and_resume_requests() -> None:
    assert sandbox_pause.intent(_spec(), _obj()).run
    paused = sandbox_pause.intent(_spec(mode="Paused"), _obj())
    assert not paused.run and paused.pause_reason == "Requested"
    idle = _obj({"idlePausedAt": "2026-01-01T00:00:00Z"})
    assert sandbox_pause.intent(_spec(), idle).pause_reason == "IdleTimeout"
    asked = _obj({"idlePausedAt": "x"}, {ANNOTATION_RESUME_REQUESTED: "r2"})
    resume = sandbox_pause.intent(_spec(), asked)
    assert resume.run and resume.resume_request == "r2"
    handled = _obj(
        {"idlePausedAt": "x", "resumeRequest": "r2"}, {ANNOTATION_RESUME_REQUESTED: "r2"}
    )
    assert not sandbox_pause.intent(_spec(), handled).run


@pytest.mark.parametrize(
    ("template_fields", "sandbox_fields", "expected"),
    [
        ({}, {}, 900),
        ({"lifetime": {"idleTimeoutSeconds": 60}}, {"lifetime": {"idleTimeoutSeconds": 5}}, 5),
        ({"persistence": {"enabled": False}}, {}, 0),
        ({}, {"persistence": {"enabled": False}}, 0),
    ],
)
def test_idle_timeout_needs_a_volume_to_pause_to(
    template_fields: Obj, sandbox_fields: Obj, expected: int
) -> None:
    template_spec = SandboxTemplateSpec.model_validate({"image": "i", **template_fields})
    assert sandbox_pause.idle_timeout_of(_spec(**sandbox_fields), template_spec) == expected


def test_idle_deadline_and_audit_heads() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert sandbox_pause.idle_deadline(now, 0) is None
    assert sandbox_pause.idle_deadline(now, 30) == now + timedelta(seconds=30)
    old = {"seq": 4, "hash": "a"}
    assert sandbox_pause.later_head(old, {"seq": 9, "hash": "b"}) == {"seq": 9, "hash": "b"}
    assert sandbox_pause.later_head(old, {"seq": 2, "hash": "c"}) == old  # never backwards
    assert sandbox_pause.later_head(None, "junk") is None
    snapshot = sandbox_pause.snapshot_status(
        {"generation": 3, "path": "/v/snap-00000003.tar", "sizeBytes": 10, "sha256": "f"}, "t"
    )
    assert snapshot == {
        "generation": 3,
        "name": "snap-00000003.tar",
        "sizeBytes": 10,
        "checksum": "f",
        "takenAt": "t",
    }
