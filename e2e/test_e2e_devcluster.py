"""The local control plane as a user sees it: GPU nodes, scheduling, GC, and the CLI."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from conftest import Cluster, tool, wait_for
from kleave.devcluster import processes

GPU_DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: gpu-smoke, namespace: default}
spec:
  replicas: 3
  selector: {matchLabels: {app: gpu-smoke}}
  template:
    metadata: {labels: {app: gpu-smoke}}
    spec:
      tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
      nodeSelector: {nvidia.com/gpu.product: H20}
      containers:
      - name: worker
        image: registry.invalid/worker:1
        resources: {limits: {nvidia.com/gpu: 1}}
"""


def test_gpu_nodes_are_ready_with_gpu_allocatable(cluster: Cluster) -> None:
    nodes = cluster.get_json("nodes")["items"]
    by_product: dict[str, int] = {}
    for node in nodes:
        ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
        assert ready == "True", node["metadata"]["name"]
        if node["metadata"]["labels"].get("kleave.dev/local-node") == "true":
            continue  # the local node (e2e/test_e2e_local_node.py) runs pods, has no GPUs
        product = node["metadata"]["labels"].get("nvidia.com/gpu.product", "cpu")
        by_product[product] = by_product.get(product, 0) + 1
        if product != "cpu":
            assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert by_product == {"H100-SXM": 4, "H20": 4, "cpu": 2}
    local = [n["metadata"]["name"] for n in nodes if n["metadata"]["labels"]["type"] == "local"]
    assert local == ["kleave-local-0"]


def test_gpu_pods_are_scheduled_onto_the_right_gpu_and_run(cluster: Cluster) -> None:
    cluster.apply(GPU_DEPLOYMENT)

    def running() -> list[str]:
        pods = cluster.get_json("pods", "-l", "app=gpu-smoke")["items"]
        up = [p["spec"]["nodeName"] for p in pods if p["status"].get("phase") == "Running"]
        return up if len(up) == 3 else []

    nodes = wait_for(running, 30, "3 GPU pods Running")
    assert all(name.startswith("kwok-h20-") for name in nodes)
    # Garbage collection (controller-manager) removes the pods with their owner.
    cluster.kubectl("delete", "deployment", "gpu-smoke", "--wait=false")
    wait_for(
        lambda: not cluster.get_json("pods", "-l", "app=gpu-smoke")["items"], 30, "pods collected"
    )


def test_status_and_kubeconfig_commands(cluster: Cluster) -> None:
    flag = f"--state-dir={cluster.dev.state_dir}"
    status = subprocess.run(
        [tool("kleave"), "dev-cluster", "status", flag], capture_output=True, text=True, check=False
    )
    assert status.returncode == 0, status.stdout + status.stderr
    assert "nodes:      11/11 Ready" in status.stdout  # 10 fake nodes and the local node
    assert "local-node" in status.stdout
    path = subprocess.run(
        [tool("kleave"), "dev-cluster", "kubeconfig", flag],
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(path.stdout.strip()) == cluster.kubeconfig


def _kleave(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("kleave"), "dev-cluster", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_lifecycle_idempotent_up_stale_state_and_clean_down(tmp_path: Path) -> None:
    state_dir = tmp_path / "second"
    flag = f"--state-dir={state_dir}"
    first = _kleave("up", flag, "--nodes=1xH100-SXM:8")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == str(state_dir / "kubeconfig")
    again = _kleave("up", flag)
    assert again.returncode == 0 and "already running" in again.stderr

    etcd = next(c for c in _state_components(state_dir) if c[0] == "etcd")
    processes.stop([etcd[1]])
    stale = _kleave("up", flag)
    assert stale.returncode == 1
    assert stale.stderr.strip().splitlines()[-1].startswith("error: stale dev-cluster state")
    assert "kleave dev-cluster down" in stale.stderr

    down = _kleave("down", flag)
    assert down.returncode == 0, down.stderr
    assert processes.processes_mentioning(f"{state_dir}/") == []
    assert not state_dir.exists()


def test_port_in_use_is_a_one_line_error_with_nothing_left_running(tmp_path: Path) -> None:
    state_dir = tmp_path / "busy"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = _kleave("up", f"--state-dir={state_dir}", f"--apiserver-port={port}")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: port {port} on 127.0.0.1 is in use by another process: stop it or pick another "
        "with --apiserver-port (0 picks a free one)"
    )
    assert processes.processes_mentioning(f"{state_dir}/") == []


def _state_components(state_dir: Path) -> list[tuple[str, int]]:
    from kleave.devcluster.cluster import ClusterState

    state = ClusterState.load(state_dir / "state.json")
    return [(c.name, c.pid) for c in state.components]
