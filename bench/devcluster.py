"""The local control plane: start-up time, and how long Deployments of GPU pods take to be
Running compared with CPU-only pods of the same count (the baseline), in one cluster."""

from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from kubernetes import client, config

from kleave.devcluster.cluster import DevCluster

SIZES = (8, 32, 64)
"""Replica counts; 64 fills every GPU of the default cluster (4 x 8 H100-SXM + 4 x 8 H20)."""


def _deployment(name: str, replicas: int, gpu: bool) -> dict[str, Any]:
    resources: dict[str, Any] = (
        {"limits": {"nvidia.com/gpu": "1"}} if gpu else {"requests": {"cpu": "10m"}}
    )
    spec: dict[str, Any] = {
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "containers": [{"name": "c", "image": "registry.invalid/x:1", "resources": resources}],
    }
    if not gpu:
        spec["nodeSelector"] = {"type": "kwok"}
        spec["affinity"] = {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {"key": "nvidia.com/gpu.present", "operator": "DoesNotExist"}
                            ]
                        }
                    ]
                }
            }
        }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": spec},
        },
    }


def _time_to_running(api: client.ApiClient, name: str, replicas: int, gpu: bool) -> float:
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    started = time.perf_counter()
    apps.create_namespaced_deployment("default", _deployment(name, replicas, gpu))  # type: ignore[arg-type]
    while True:
        pods = core.list_namespaced_pod("default", label_selector=f"app={name}").items
        if sum(1 for p in pods if p.status and p.status.phase == "Running") == replicas:
            elapsed = time.perf_counter() - started
            break
        if time.perf_counter() - started > 300:
            raise RuntimeError(f"{name}: {replicas} pods not Running after 300s")
        time.sleep(0.05)
    apps.delete_namespaced_deployment(name, "default")
    return elapsed


def main() -> str:
    with tempfile.TemporaryDirectory(prefix="kleave-bench-") as tmp:
        cluster = DevCluster(state_dir=Path(tmp) / "cluster", progress=lambda _line: None)
        started = time.perf_counter()
        state = cluster.up()
        up_seconds = time.perf_counter() - started
        rows = []
        try:
            with config.new_client_from_config(config_file=state.kubeconfig) as api:  # type: ignore[no-untyped-call]
                for size in SIZES:
                    cpu = _time_to_running(api, f"cpu-{size}", size, gpu=False)
                    gpu = _time_to_running(api, f"gpu-{size}", size, gpu=True)
                    rows.append((size, cpu, gpu))
        finally:
            cluster.down()
    lines = [
        f"### Local control plane ({platform.machine()}, {_cpus()} CPUs)",
        "",
        f"`kleave dev-cluster up` (binaries cached, 10 nodes): {up_seconds:.1f} s",
        "",
        "| pods | CPU-only pods to Running (baseline) | GPU pods to Running | ratio GPU/CPU |",
        "|---:|---:|---:|---:|",
    ]
    lines += [f"| {n} | {cpu:.2f} s | {gpu:.2f} s | {gpu / cpu:.2f} |" for n, cpu, gpu in rows]
    return "\n".join(lines)


def _cpus() -> int:
    return os.cpu_count() or 0
