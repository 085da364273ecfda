"""The Python sandbox SDK end to end: create, use, pause, resume and delete through it.

Sandboxes run on the dev cluster's local node (``kleave-local-0``): a kubelet that runs the
sandbox pods as local processes on 127.77.0.x, so ``status.endpoint`` is reachable from this
process and every SDK call below reaches a real runtime, with the token the operator
publishes per pod. The operator runs as a local process, as in the other e2e modules.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Cluster, wait_for
from kleave.sandbox.client import (
    AsyncSandboxClient,
    RuntimeRefused,
    SandboxClient,
    SandboxError,
)
from local_sandboxes import local_sandbox_namespace, local_template_manifest

NAMESPACE = "sandbox-sdk"


def template_manifest(name: str, idle_seconds: int = 0) -> str:
    return local_template_manifest(
        name, NAMESPACE, idle_seconds=idle_seconds, commands=("ls", "cat", "echo")
    )


def pool_manifest(name: str, replicas: int) -> str:
    return f"""
apiVersion: kleave.dev/v1alpha1
kind: SandboxWarmPool
metadata: {{name: {name}, namespace: {NAMESPACE}}}
spec: {{templateRef: {{name: {name}}}, replicas: {replicas}}}
"""


@pytest.fixture(scope="module")
def sdk_cluster(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """CRDs, the RuntimeClass, the local node Ready, the namespace and a running operator."""
    with local_sandbox_namespace(cluster, NAMESPACE, tmp_path_factory.mktemp("sdk-operator")):
        yield cluster


@pytest.fixture
def client(sdk_cluster: Cluster) -> Iterator[SandboxClient]:
    with SandboxClient(namespace=NAMESPACE, kubeconfig=str(sdk_cluster.kubeconfig)) as sdk:
        yield sdk


def _gone(cluster: Cluster, name: str) -> bool:
    return cluster.kubectl("get", "asbx", name, "-n", NAMESPACE, check=False).returncode != 0


def _phase(cluster: Cluster, name: str) -> str:
    found = cluster.get_json("asbx", name, "-n", NAMESPACE)
    return str((found.get("status") or {}).get("phase") or "")


def test_warm_claim_exec_pause_resume_and_verify_through_the_sdk(
    sdk_cluster: Cluster, client: SandboxClient
) -> None:
    cluster = sdk_cluster
    cluster.apply(template_manifest("sdk"))
    cluster.apply(pool_manifest("sdk", 2))
    wait_for(
        lambda: (
            (cluster.get_json("sbxwp", "sdk", "-n", NAMESPACE).get("status") or {}).get(
                "readyReplicas"
            )
            == 2
        ),
        120,
        "2 warm sandboxes on the local node",
    )

    started = time.monotonic()
    with client.create(warm_pool="sdk", timeout=120) as sbx:
        claim_s = time.monotonic() - started
        name = sbx.name
        assert name.startswith("sbx-")  # generateName
        assert sbx.phase == "Ready" and sbx.status["claim"]["source"] == "Warm"
        assert sbx.endpoint.startswith("http://127.77.")
        warm_pod = sbx.status["podName"]
        assert [s.name for s in client.list()] == [name]

        assert sbx.write_file("notes/plan.md", "step 1\n")["size"] == 7
        assert sbx.exec(["ls", "notes"]).stdout == "plan.md\n"
        with pytest.raises(RuntimeRefused) as refused:
            sbx.exec(["sh", "-c", "cat ~/.ssh/id_rsa"])
        assert refused.value.status == 403 and refused.value.code == "credential-path"

        sbx.pause(timeout=90)
        assert sbx.phase == "Paused"
        assert "endpoint" not in sbx.status and "podName" not in sbx.status
        assert sbx.status["snapshot"]["generation"] == 1
        anchor = sbx.status["auditHead"]

        started = time.monotonic()
        sbx.resume(timeout=120)
        resume_s = time.monotonic() - started
        resume_ms = sbx.status["claim"]["latencyMs"]
        assert sbx.phase == "Ready" and sbx.status["claim"]["source"] == "Resume"
        assert sbx.status["podName"] != warm_pod  # a fresh pod, with its own token
        assert sbx.endpoint.startswith("http://127.77.")

        assert sbx.read_file("notes/plan.md") == b"step 1\n"
        assert sbx.verify_audit()["ok"]  # anchored on the operator's status.auditHead
        assert sbx.verify_audit(anchor)["ok"]  # and on the head taken at the pause
        actions = {(e["action"], e["outcome"]) for e in sbx.audit()}
        assert {("file.write", "ok"), ("exec", "refused"), ("restore", "ok")} <= actions
    wait_for(lambda: _gone(cluster, name), 60, f"{name} deleted by the context manager")
    cluster.kubectl("delete", "sbxwp", "sdk", "-n", NAMESPACE)  # its pods go with it
    print(
        f"\nSDK: warm claim {claim_s * 1000:.0f} ms, resume {resume_s:.2f} s (operator: "
        f"{resume_ms} ms) on the local node"
    )


def test_an_idle_paused_sandbox_resumes_on_its_next_call(
    sdk_cluster: Cluster, client: SandboxClient
) -> None:
    cluster = sdk_cluster
    cluster.apply(template_manifest("sdk-idle", idle_seconds=3))
    sbx = client.create("sdk-sleeper", template="sdk-idle", timeout=120)
    try:
        assert sbx.status["claim"]["source"] == "Cold"
        sbx.write_file("w.txt", "kept")
        # Only the operator notices the idle timeout; this Sandbox still holds "Ready".
        wait_for(lambda: _phase(cluster, "sdk-sleeper") == "Paused", 60, "idle pause")
        assert sbx.phase == "Ready"

        with (
            SandboxClient(
                namespace=NAMESPACE, kubeconfig=str(cluster.kubeconfig), auto_resume=False
            ) as strict,
            pytest.raises(SandboxError, match="call resume"),
        ):
            strict.get("sdk-sleeper").read_file("w.txt")

        # The stale endpoint refuses the connection; the SDK reads the sandbox again, finds
        # it paused, asks for the resume (spec.mode is still Running: the annotation does
        # it), waits for the new pod and repeats the call with that pod's token.
        assert sbx.read_file("w.txt") == b"kept"
        assert sbx.phase == "Ready" and sbx.status["claim"]["source"] == "Resume"
        assert sbx.object["spec"]["mode"] == "Running"
        assert sbx.object["metadata"]["annotations"]["kleave.dev/resume-requested"]
    finally:
        sbx.delete(wait=True, timeout=60)
    assert _gone(cluster, "sdk-sleeper")


def test_the_async_client_creates_runs_and_deletes(sdk_cluster: Cluster, tmp_path: Path) -> None:
    cluster = sdk_cluster
    cluster.apply(template_manifest("sdk-async"))

    async def scenario() -> None:
        async with AsyncSandboxClient(
            namespace=NAMESPACE, kubeconfig=str(cluster.kubeconfig)
        ) as sdk:
            sandboxes = await asyncio.gather(
                *(sdk.create(f"sdk-async-{n}", template="sdk-async") for n in range(3))
            )
            try:
                results = await asyncio.gather(*(s.exec(["echo", s.name]) for s in sandboxes))
                assert [r.stdout for r in results] == [f"sdk-async-{n}\n" for n in range(3)]
                events = [e async for e in sandboxes[0].exec_stream(["echo", "streamed"])]
                assert [e["type"] for e in events] == ["start", "stdout", "exit"]
                again = await sdk.get("sdk-async-1")
                assert again.status["endpoint"] == sandboxes[1].status["endpoint"]
            finally:
                await asyncio.gather(*(s.delete(wait=True, timeout=60) for s in sandboxes))
            assert not [s.name for s in await sdk.list() if s.name.startswith("sdk-async-")]

    asyncio.run(scenario())
