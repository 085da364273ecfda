"""Pause, resume and idle timeout end to end, with the runtime really running in the pods.

The dev cluster's local node (``kleave-local-0``, see docs/dev-cluster.md) is a kubelet that
runs sandbox pods as local processes: ``kleave sandbox runtime`` on the pod's IP (127.77.0.x),
emptyDirs as directories, PersistentVolumeClaims as directories of the ``kleave-local``
StorageClass. So here the operator's snapshot, restore and idle calls reach a real runtime,
and the test talks to the same runtime at ``status.endpoint``, as an agent would.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Cluster, wait_for
from kleave.sandbox.audit import AuditHead, verify
from local_sandboxes import local_sandbox_namespace, local_template_manifest

NAMESPACE = "sandbox-pause"


def template_manifest(name: str, idle_seconds: int) -> str:
    return local_template_manifest(name, NAMESPACE, idle_seconds=idle_seconds)


@pytest.fixture(scope="module")
def pause_cluster(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with local_sandbox_namespace(cluster, NAMESPACE, tmp_path_factory.mktemp("pause-operator")):
        yield cluster


def _sandbox(cluster: Cluster, name: str) -> dict[str, Any]:
    found: dict[str, Any] = cluster.get_json("asbx", name, "-n", NAMESPACE)
    return found


def _phase(cluster: Cluster, name: str, phase: str) -> dict[str, Any] | None:
    sandbox = _sandbox(cluster, name)
    return sandbox if (sandbox.get("status") or {}).get("phase") == phase else None


def _conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions", [])}


def _runtime(cluster: Cluster, sandbox: dict[str, Any]) -> httpx.Client:
    """The sandbox's runtime, with the token of its current pod from the sandbox's Secret."""
    secret = cluster.get_json("secret", sandbox["status"]["tokenSecretName"], "-n", NAMESPACE)
    assert base64.b64decode(secret["data"]["pod"]).decode() == sandbox["status"]["podName"]
    token = base64.b64decode(secret["data"]["token"]).decode()
    return httpx.Client(
        base_url=f"http://{sandbox['status']['endpoint']}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )


def _exec(http: httpx.Client, argv: list[str]) -> tuple[int, str]:
    response = http.post("/v1/exec", json={"argv": argv})
    assert response.status_code == 200, response.text
    events = [json.loads(line) for line in response.text.splitlines()]
    stdout = "".join(e.get("data", "") for e in events if e["type"] == "stdout")
    return int(events[-1]["code"]), stdout


def _audit_ok(http: httpx.Client, anchor: dict[str, Any], tmp: Path) -> list[dict[str, Any]]:
    """The sandbox's audit log, verified here against the head the operator anchored."""
    log = http.get("/v1/audit")
    assert log.status_code == 200
    copy = tmp / "audit.jsonl"
    copy.write_bytes(log.content)
    result = verify(copy, AuditHead(int(anchor["seq"]), str(anchor["hash"])))
    assert result.ok, result.error
    return [json.loads(line) for line in log.text.splitlines()]


def test_pause_and_resume_keep_the_workspace_and_the_audit_log(
    pause_cluster: Cluster, tmp_path: Path
) -> None:
    cluster = pause_cluster
    cluster.apply(template_manifest("keeper", idle_seconds=0))
    cluster.apply(
        f"""
apiVersion: kleave.dev/v1alpha1
kind: SandboxWarmPool
metadata: {{name: keeper, namespace: {NAMESPACE}}}
spec: {{templateRef: {{name: keeper}}, replicas: 2}}
"""
    )
    wait_for(
        lambda: (
            (cluster.get_json("sbxwp", "keeper", "-n", NAMESPACE).get("status") or {}).get(
                "readyReplicas"
            )
            == 2
        ),
        120,
        "2 warm sandboxes on the local node",
    )
    cluster.apply(
        f"""
apiVersion: kleave.dev/v1alpha1
kind: AgentSandbox
metadata: {{name: agent, namespace: {NAMESPACE}}}
spec: {{warmPoolRef: {{name: keeper}}}}
"""
    )
    ready = wait_for(lambda: _phase(cluster, "agent", "Ready"), 60, "agent Ready")
    assert ready["status"]["claim"]["source"] == "Warm"
    warm_pod = ready["status"]["podName"]
    assert ready["status"]["endpoint"].startswith("127.77.")
    claim = ready["status"]["volumeClaimName"]
    assert claim == f"{warm_pod}-state"

    anonymous = httpx.get(f"http://{ready['status']['endpoint']}/v1/files/list", timeout=10)
    assert anonymous.status_code == 401  # reachable is not enough: the pod's token is needed
    with _runtime(cluster, ready) as http:
        put = http.put("/v1/files", params={"path": "notes/plan.md"}, content=b"step 1\n")
        assert put.status_code == 200, put.text
        assert _exec(http, ["ls", "notes"]) == (0, "plan.md\n")
        refused = http.post("/v1/exec", json={"argv": ["sh", "-c", "cat ~/.ssh/id_rsa"]})
        assert refused.status_code == 403
    # The claim moved from the warm pod to the sandbox, so the pause cannot take it away.
    pvc = wait_for(
        lambda: (
            (p := cluster.get_json("pvc", claim, "-n", NAMESPACE))["metadata"]["ownerReferences"][
                0
            ]["kind"]
            == "AgentSandbox"
            and p
        ),
        30,
        "the claim owned by the sandbox",
    )
    assert pvc["metadata"]["labels"]["kleave.dev/sandbox"] == "agent"

    cluster.kubectl("patch", "asbx", "agent", "-n", NAMESPACE, "--type=merge",
                    "-p", '{"spec": {"mode": "Paused"}}')  # fmt: skip
    paused = wait_for(lambda: _phase(cluster, "agent", "Paused"), 60, "agent Paused")
    status = paused["status"]
    assert "podName" not in status and "endpoint" not in status
    assert status["snapshot"]["generation"] == 1 and status["snapshot"]["sizeBytes"] > 0
    anchor = status["auditHead"]
    assert _conditions(paused)["Paused"]["reason"] == "Requested"
    assert cluster.kubectl("get", "pod", warm_pod, "-n", NAMESPACE, check=False).returncode != 0
    assert cluster.kubectl("get", "pvc", claim, "-n", NAMESPACE, check=False).returncode == 0
    table = cluster.kubectl("get", "asbx", "agent", "-n", NAMESPACE).stdout.splitlines()
    assert table[1].split()[1:3] == ["Paused", "Paused"]

    started = time.monotonic()
    cluster.kubectl("patch", "asbx", "agent", "-n", NAMESPACE, "--type=merge",
                    "-p", '{"spec": {"mode": "Running"}}')  # fmt: skip
    resumed = wait_for(lambda: _phase(cluster, "agent", "Ready"), 90, "agent resumed")
    resume_s = time.monotonic() - started
    assert resumed["status"]["podName"] == "agent-r1"
    assert resumed["status"]["claim"]["source"] == "Resume"
    # A process start and a restore, not the warm claim's latency left over in status.
    assert resumed["status"]["claim"]["latencyMs"] > ready["status"]["claim"]["latencyMs"]
    assert _conditions(resumed)["Degraded"]["status"] == "False"
    with _runtime(cluster, resumed) as http:
        assert http.get("/v1/files", params={"path": "notes/plan.md"}).content == b"step 1\n"
        entries = _audit_ok(http, anchor, tmp_path)
    actions = [(e["action"], e["outcome"]) for e in entries]
    assert ("file.write", "ok") in actions and ("exec", "refused") in actions
    assert ("restore", "ok") in actions
    events = cluster.get_json(
        "events", "-n", NAMESPACE, "--field-selector=involvedObject.name=agent"
    )["items"]
    reasons = {e["reason"] for e in events}
    assert {"Claimed", "Snapshotted", "Paused", "Resuming", "Resumed"} <= reasons
    print(
        f"\nresume (pod start + restore on the local node): {resume_s:.2f}s, "
        f"operator latencyMs={resumed['status']['claim']['latencyMs']}"
    )


def test_idle_timeout_pauses_and_a_resume_request_resumes(
    pause_cluster: Cluster, tmp_path: Path
) -> None:
    cluster = pause_cluster
    cluster.apply(template_manifest("sleepy", idle_seconds=3))
    cluster.apply(
        f"""
apiVersion: kleave.dev/v1alpha1
kind: AgentSandbox
metadata: {{name: sleeper, namespace: {NAMESPACE}}}
spec: {{templateRef: {{name: sleepy}}}}
"""
    )
    ready = wait_for(lambda: _phase(cluster, "sleeper", "Ready"), 60, "sleeper Ready")
    assert ready["status"]["claim"]["source"] == "Cold"
    assert ready["status"]["volumeClaimName"] == "sleeper-state"
    with _runtime(cluster, ready) as http:
        for _ in range(3):  # busy for ~4.5 s: longer than the idle timeout, never idle for it
            time.sleep(1.5)
            assert http.put("/v1/files", params={"path": "w.txt"}, content=b"x").status_code == 200
    assert _phase(cluster, "sleeper", "Ready") is not None
    paused = wait_for(lambda: _phase(cluster, "sleeper", "Paused"), 30, "sleeper idle-paused")
    assert _conditions(paused)["Paused"]["reason"] == "IdleTimeout"
    assert paused["status"]["idlePausedAt"]
    assert paused["spec"]["mode"] == "Running"  # the spec is the user's
    time.sleep(2)
    assert _phase(cluster, "sleeper", "Paused") is not None  # stays paused until asked

    cluster.kubectl("annotate", "asbx", "sleeper", "-n", NAMESPACE, "--overwrite",
                    "kleave.dev/resume-requested=first")  # fmt: skip
    resumed = wait_for(lambda: _phase(cluster, "sleeper", "Ready"), 90, "sleeper resumed")
    assert resumed["status"]["claim"]["source"] == "Resume"
    assert resumed["status"]["resumeRequest"] == "first"
    with _runtime(cluster, resumed) as http:
        assert http.get("/v1/files", params={"path": "w.txt"}).content == b"x"
        _audit_ok(http, resumed["status"]["auditHead"], tmp_path)
