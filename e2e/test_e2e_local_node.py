"""The dev cluster's local node end to end: a sandbox runtime pod really runs (on 127.77.0.x,
with emptyDirs and a provisioned volume as directories), is deleted as a kubelet deletes pods,
and pods it cannot run fail with a reason. Through kubectl and the runtime's HTTP API."""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Cluster, wait_for
from kleave.devcluster import processes

NAMESPACE = "local-node"
NODE = "kleave-local-0"
PORT = 18080
PLACEMENT = """
  nodeSelector: {kleave.dev/local-node: "true"}
  tolerations: [{key: kleave.dev/local-node, operator: Exists, effect: NoSchedule}]
"""

CLAIM = f"""
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: snapshots, namespace: {NAMESPACE}}}
spec:
  accessModes: [ReadWriteOnce]
  resources: {{requests: {{storage: 64Mi}}}}
"""

RUNTIME_POD = f"""
apiVersion: v1
kind: Pod
metadata: {{name: runtime, namespace: {NAMESPACE}}}
spec:
{PLACEMENT}
  terminationGracePeriodSeconds: 10
  containers:
  - name: sandbox
    image: kleave/kleave:0.1.0
    command: [kleave, sandbox, runtime]
    args: [--workspace, /workspace, --state-dir, /var/lib/kleave, --host, 0.0.0.0,
           --port, "{PORT}"]
    workingDir: /workspace
    ports: [{{name: runtime, containerPort: {PORT}}}]
    readinessProbe: {{httpGet: {{path: /healthz, port: runtime}}, periodSeconds: 1}}
    volumeMounts:
    - {{name: workspace, mountPath: /workspace}}
    - {{name: state, mountPath: /var/lib/kleave}}
    - {{name: snapshots, mountPath: /var/lib/kleave/snapshots}}
  volumes:
  - {{name: workspace, emptyDir: {{}}}}
  - {{name: state, emptyDir: {{}}}}
  - {{name: snapshots, persistentVolumeClaim: {{claimName: snapshots}}}}
"""


def simple_pod(name: str, container: str, volumes: str = "") -> str:
    return f"""
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {NAMESPACE}}}
spec:
{PLACEMENT}
  restartPolicy: Never
  containers:
  - name: main
    image: registry.invalid/x:1
{container}
{volumes}
"""


def _gone(cluster: Cluster, *what: str) -> bool:
    return cluster.kubectl("get", *what, "-n", NAMESPACE, check=False).returncode != 0


def _pod(cluster: Cluster, name: str) -> dict[str, Any]:
    pod: dict[str, Any] = cluster.get_json("pod", name, "-n", NAMESPACE)
    return pod


def _phase(cluster: Cluster, name: str, phase: str) -> dict[str, Any] | None:
    pod = _pod(cluster, name)
    return pod if pod.get("status", {}).get("phase") == phase else None


@pytest.fixture(scope="module")
def local(cluster: Cluster) -> Iterator[Cluster]:
    cluster.kubectl("create", "namespace", NAMESPACE)
    wait_for(
        lambda: (
            cluster.kubectl("get", "sa", "default", "-n", NAMESPACE, check=False).returncode == 0
        ),
        30,
        "default ServiceAccount",
    )
    try:
        yield cluster
    finally:
        cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
        wait_for(lambda: _gone(cluster, "namespace", NAMESPACE), 120, f"{NAMESPACE} deleted")


def test_the_node_is_ready_tainted_heartbeating_and_not_kwoks(local: Cluster) -> None:
    node = local.get_json("node", NODE)
    assert "kwok.x-k8s.io/node" not in node["metadata"].get("annotations", {})
    assert node["metadata"]["labels"]["kleave.dev/local-node"] == "true"
    assert {"key": "kleave.dev/local-node", "value": "true", "effect": "NoSchedule"} in node[
        "spec"
    ]["taints"]
    # Its own /24 of 127.77.0.0/16: other dev clusters on this host have theirs.
    pod_range = ipaddress.IPv4Network(node["spec"]["podCIDR"])
    assert pod_range.prefixlen == 24
    assert pod_range.subnet_of(ipaddress.IPv4Network("127.77.0.0/16"))
    assert {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"] == "True"
    first = local.get_json("lease", NODE, "-n", "kube-node-lease")["spec"]["renewTime"]
    wait_for(
        lambda: (
            local.get_json("lease", NODE, "-n", "kube-node-lease")["spec"]["renewTime"] != first
        ),
        25,
        "the node's Lease renewed",
    )
    storage = local.get_json("storageclass", "kleave-local")
    assert storage["metadata"]["annotations"]["storageclass.kubernetes.io/is-default-class"] == (
        "true"
    )


def test_a_sandbox_runtime_pod_runs_serves_snapshots_to_its_volume_and_is_deleted(
    local: Cluster,
) -> None:
    cluster = local
    root = cluster.dev.local_node_root
    cluster.apply(CLAIM)
    started = time.monotonic()
    cluster.apply(RUNTIME_POD)
    # The DefaultStorageClass admission plugin gave the class-less claim the default class.
    claim = cluster.get_json("pvc", "snapshots", "-n", NAMESPACE)
    assert claim["spec"]["storageClassName"] == "kleave-local"
    cluster.kubectl("wait", "--for=condition=Ready", "pod/runtime", "-n", NAMESPACE,
                    "--timeout=60s")  # fmt: skip
    ready_s = time.monotonic() - started
    pod = _pod(cluster, "runtime")
    uid = pod["metadata"]["uid"]
    assert pod["spec"]["nodeName"] == NODE
    ip = pod["status"]["podIP"]
    pod_range = cluster.get_json("node", NODE)["spec"]["podCIDR"]
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(pod_range)
    [status] = pod["status"]["containerStatuses"]
    assert status["ready"] and status["started"] and status["restartCount"] == 0
    pid = int(status["containerID"].removeprefix("local://"))
    assert processes.is_alive(pid)
    assert any(str(root) in arg for arg in processes.cmdline(pid))

    volume = cluster.get_json("pvc", "snapshots", "-n", NAMESPACE)["spec"]["volumeName"]
    pv = cluster.get_json("pv", volume)
    assert pv["metadata"]["annotations"]["pv.kubernetes.io/provisioned-by"] == (
        "kleave.dev/local-volumes"
    )
    volume_dir = Path(pv["spec"]["hostPath"]["path"])
    assert volume_dir == root / "volumes" / volume

    workspace = root / "pods" / uid / "volumes" / "workspace"
    with httpx.Client(base_url=f"http://{ip}:{PORT}", timeout=30) as http:
        assert http.get("/healthz").json()["status"] == "ok"
        put = http.put("/v1/files", params={"path": "notes/plan.md"}, content=b"step 1\n")
        assert put.status_code == 200, put.text
        assert (workspace / "notes" / "plan.md").read_bytes() == b"step 1\n"
        snapshot = http.post("/v1/snapshot")
        assert snapshot.status_code == 200, snapshot.text
    snapshot_file = Path(snapshot.json()["path"])
    assert snapshot_file.parent.resolve() == volume_dir.resolve()
    assert snapshot_file.stat().st_size > 0

    deleting = time.monotonic()
    cluster.kubectl("delete", "pod", "runtime", "-n", NAMESPACE, "--wait=true", "--timeout=60s")
    deleted_s = time.monotonic() - deleting
    assert not processes.is_alive(pid)
    assert _gone(cluster, "pod", "runtime")
    assert not workspace.exists()
    print(f"\nlocal node: runtime pod Ready in {ready_s:.2f}s, deleted in {deleted_s:.2f}s")

    # The claim and its data outlive the pod; deleting the claim deletes both.
    assert snapshot_file.exists()
    assert cluster.get_json("pvc", "snapshots", "-n", NAMESPACE)["status"]["phase"] == "Bound"
    cluster.kubectl("delete", "pvc", "snapshots", "-n", NAMESPACE, "--wait=true", "--timeout=60s")
    wait_for(lambda: cluster.kubectl("get", "pv", volume, check=False).returncode != 0, 30,
             "the released volume deleted")  # fmt: skip
    assert not volume_dir.exists()


def test_a_pod_with_another_command_fails_with_unsupported_command(local: Cluster) -> None:
    local.apply(simple_pod("sleeper", "    command: [sleep, '100']"))
    pod = wait_for(lambda: _phase(local, "sleeper", "Failed"), 30, "sleeper Failed")
    assert pod["status"]["reason"] == "UnsupportedCommand"
    assert "runs only `kleave ...` containers" in pod["status"]["message"]
    [status] = pod["status"]["containerStatuses"]
    assert status["state"]["terminated"]["reason"] == "UnsupportedCommand"
    local.kubectl("delete", "pod", "sleeper", "-n", NAMESPACE, "--wait=true", "--timeout=30s")


def test_a_pod_with_an_unsupported_volume_fails_naming_it(local: Cluster) -> None:
    volumes = "  volumes: [{name: host, hostPath: {path: /etc}}]"
    local.apply(simple_pod("hostpath", "    command: [kleave, --version]", volumes))
    pod = wait_for(lambda: _phase(local, "hostpath", "Failed"), 30, "hostpath Failed")
    assert pod["status"]["reason"] == "UnsupportedVolume"
    assert "volume 'host' is of type hostPath" in pod["status"]["message"]
    local.kubectl("delete", "pod", "hostpath", "-n", NAMESPACE, "--wait=true", "--timeout=30s")


def test_a_kleave_command_that_exits_completes_the_pod(local: Cluster) -> None:
    local.apply(simple_pod("version", "    command: [kleave, --version]"))
    pod = wait_for(lambda: _phase(local, "version", "Succeeded"), 60, "version Succeeded")
    [status] = pod["status"]["containerStatuses"]
    assert status["state"]["terminated"]["exitCode"] == 0
    log = local.dev.local_node_root / "pods" / pod["metadata"]["uid"] / "main.log"
    assert "kleave, version" in log.read_text()
    events = json.dumps(pod["status"]["conditions"])
    assert "PodCompleted" in events
    local.kubectl("delete", "pod", "version", "-n", NAMESPACE, "--wait=true", "--timeout=30s")
