"""The planner end to end: a real Prometheus scrapes a load generator replaying a trace as
vLLM-named metrics; an InferenceDeployment with `mode: forecast` follows the load; stopping
Prometheus degrades the planner and holds replicas; starting it again recovers."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Cluster, tool, wait_for
from kleave.devcluster.processes import free_ports
from kleave.devcluster.prometheus import PrometheusServer, ScrapeTarget
from test_e2e_operator import Operator, crds

pytestmark = pytest.mark.e2e
__all__ = ["crds"]  # the CRD fixture, shared with the operator tests

NAME = "planned"
INTERVAL_S = 5

MANIFEST = f"""
apiVersion: kleave.dev/v1alpha1
kind: InferenceDeployment
metadata: {{name: {NAME}, namespace: default}}
spec:
  model: meta-llama/Llama-3.1-8B-Instruct
  engine: vllm
  topology: PD
  slo: {{ttftMs: 2000, tpotMs: 100}}
  autoscaling:
    mode: forecast
    intervalSeconds: {INTERVAL_S}
    startupSeconds: 10
    historySeconds: 600
    cooldownSeconds: 10
    burstWindowSeconds: 2
    burstMemorySeconds: 20
    prometheus: {{url: PROMETHEUS_URL}}
  pools:
    prefill: {{replicas: 1, gpuType: H100-SXM, scaling: Planner, minReplicas: 1, maxReplicas: 8}}
    decode: {{replicas: 1, gpuType: H100-SXM, scaling: Planner, minReplicas: 1, maxReplicas: 8}}
"""


def _trace(path: Path) -> Path:
    """Quiet, a burst of 30 req/s of 2000-token prompts for 80 s, then quiet again."""
    rows = ["window_start_s,window_s,request_rate,mean_input_tokens,mean_output_tokens"]
    rates = [2.0] * 4 + [30.0] * 8 + [2.0] * 60
    rows += [f"{i * 10},10,{rate},2000,200" for i, rate in enumerate(rates)]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def operator(
    cluster: Cluster, crds: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Operator]:
    running = Operator(cluster, tmp_path_factory.mktemp("planner-operator"))
    running.start()
    try:
        yield running
    finally:
        cluster.kubectl("delete", "infd", NAME, "--timeout=60s", check=False)
        running.stop()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _replicas(cluster: Cluster, role: str) -> int:
    """The pool's desired replicas (0 before the operator created it)."""
    found = cluster.kubectl(
        "get", "infp", f"{NAME}-{role}", "-o", "jsonpath={.spec.replicas}", check=False
    )
    return int(found.stdout) if found.returncode == 0 and found.stdout else 0


def _planner_condition(cluster: Cluster) -> dict[str, Any]:
    infd = cluster.get_json("infd", NAME)
    for condition in infd.get("status", {}).get("conditions", []):
        if condition["type"] == "PlannerDegraded":
            found: dict[str, Any] = condition
            return found
    return {}


def test_forecast_planner_follows_load_and_degrades_without_prometheus(
    cluster: Cluster, operator: Operator, tmp_path: Path
) -> None:
    [port] = free_ports(1)
    loadgen = subprocess.Popen(
        [
            tool("kleave"), "loadgen", f"--trace={_trace(tmp_path / 'burst.csv')}",
            f"--port={port}", f"--kubeconfig={cluster.kubeconfig}", "--namespace=default",
            f"--deployment={NAME}", "--seed=1", "--decode-capacity-rps=20",
        ],
        stdout=(tmp_path / "loadgen.log").open("w"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    prometheus = PrometheusServer(
        tmp_path / "prometheus",
        [
            ScrapeTarget(
                f"127.0.0.1:{port}",
                job="loadgen",
                labels={"namespace": "default", "kleave_dev_inference_deployment": NAME},
            )
        ],
    )
    try:
        wait_for(lambda: _healthy(f"http://127.0.0.1:{port}/healthz"), 30, "load generator up")
        prometheus.start()
        cluster.kubectl(
            "apply", "-f", "-", stdin=MANIFEST.replace("PROMETHEUS_URL", prometheus.url)
        )

        # The burst: both pools grow, and status says why.
        wait_for(lambda: _replicas(cluster, "prefill") >= 3, 150, "prefill scaled up for the burst")
        infd = cluster.get_json("infd", NAME)
        planner = infd["status"]["planner"]
        assert planner["mode"] == "forecast"
        assert planner["forecaster"]
        assert planner["provisionedFor"]["rateRps"] > 5
        assert planner["pools"]["prefill"]["reason"]
        assert "prefill:" in planner["pools"]["prefill"]["message"]
        assert _planner_condition(cluster)["status"] == "False"
        events = cluster.get_json(
            "events", "--field-selector", f"involvedObject.name={NAME},reason=PlannerScaled"
        )["items"]
        assert events, "no PlannerScaled event"

        # After the burst: back down (hysteresis, cooldown and step limits slow it, not stop it).
        wait_for(lambda: _replicas(cluster, "prefill") <= 2, 180, "prefill scaled down")

        # Prometheus gone: PlannerDegraded, replicas held.
        prometheus.stop()
        wait_for(
            lambda: _planner_condition(cluster).get("status") == "True",
            60,
            "PlannerDegraded after Prometheus stopped",
        )
        condition = _planner_condition(cluster)
        assert condition["reason"] == "PrometheusUnreachable", condition
        assert "held" in condition["message"]
        held = {role: _replicas(cluster, role) for role in ("prefill", "decode")}
        time.sleep(3 * INTERVAL_S)
        assert {role: _replicas(cluster, role) for role in ("prefill", "decode")} == held

        # Prometheus back: the planner recovers on its own.
        prometheus.start()
        wait_for(
            lambda: _planner_condition(cluster).get("status") == "False",
            120,
            "PlannerDegraded cleared after Prometheus restarted",
        )
    finally:
        prometheus.stop()
        loadgen.terminate()
        loadgen.wait(timeout=30)
