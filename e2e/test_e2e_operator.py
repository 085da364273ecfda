"""The operator against the real API server: CRDs, validation, reconcile, status, metrics."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import REPO, Cluster, tool, wait_for
from kleave.api.registry import render_crds
from kleave.devcluster.processes import free_ports

MANIFEST = """
apiVersion: kleave.dev/v1alpha1
kind: InferenceDeployment
metadata: {name: NAME, namespace: default}
spec:
  model: meta-llama/Llama-3.1-8B-Instruct
  topology: PD
"""


@pytest.fixture(scope="module")
def crds(cluster: Cluster) -> None:
    documents = "".join(f"---\n{text}" for text in render_crds().values())
    cluster.kubectl("apply", "--server-side", "--field-manager=kleave", "-f", "-", stdin=documents)
    cluster.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")


@pytest.fixture(scope="module")
def operator(
    cluster: Cluster, crds: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """`kleave operator run` as a user starts it; yields its health/metrics URL."""
    [port] = free_ports(1)
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [
                tool("kleave"), "operator", "run", "--standalone", "--all-namespaces",
                f"--kubeconfig={cluster.kubeconfig}", "--health-host=127.0.0.1",
                f"--health-port={port}", "--log-format=json",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"the operator exited: {log.read_text()[-3000:]}")
            return _get(f"{url}/readyz") == 200

        wait_for(ready, 60, "operator ready")
        yield url
    finally:
        # Delete test objects while the operator runs, so any finalizer it adds can be removed.
        cluster.kubectl(
            "delete", "inferencedeployments", "--all", "-A", "--timeout=60s", check=False
        )
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        assert process.returncode == 0, log.read_text()[-3000:]
        _check_json_logs(log)


def _get(url: str) -> int:
    try:
        return httpx.get(url, timeout=1.0).status_code
    except httpx.HTTPError:
        return 0


def _check_json_logs(log: Path) -> None:
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert lines, "the operator logged nothing"
    for line in lines:
        record = json.loads(line)  # every line is one JSON object
        assert {"level", "message"} <= record.keys()


def _conditions(cluster: Cluster, name: str) -> dict[str, dict[str, str]]:
    status = cluster.get_json("infd", name).get("status") or {}
    return {c["type"]: c for c in status.get("conditions", [])}


def test_operator_reconciles_and_reports_status(cluster: Cluster, operator: str) -> None:
    cluster.apply(MANIFEST.replace("NAME", "llama"))
    accepted = wait_for(
        lambda: _conditions(cluster, "llama").get("Accepted", {}).get("status") == "True",
        30,
        "Accepted=True",
    )
    assert accepted
    infd = cluster.get_json("infd", "llama")
    assert infd["status"]["observedGeneration"] == infd["metadata"]["generation"] == 1
    assert infd["spec"]["engine"] == "builtin"  # the schema's default, applied by the API server

    # A spec change is reconciled: observedGeneration follows the generation.
    cluster.kubectl("patch", "infd", "llama", "--type=merge", "-p", '{"spec":{"engine":"vllm"}}')
    wait_for(
        lambda: cluster.get_json("infd", "llama")["status"].get("observedGeneration") == 2,
        30,
        "observedGeneration 2",
    )
    assert "vllm" in _conditions(cluster, "llama")["Accepted"]["message"]

    # kubectl shows the printer columns.
    table = cluster.kubectl("get", "infd", "llama").stdout
    assert table.split()[:5] == ["NAME", "TOPOLOGY", "ENGINE", "ACCEPTED", "AGE"]
    assert table.splitlines()[1].split()[:4] == ["llama", "PD", "vllm", "True"]

    events = cluster.get_json("events", "--field-selector=involvedObject.name=llama")["items"]
    assert any(e["reason"] == "SpecValid" for e in events), [e["reason"] for e in events]

    metrics = httpx.get(f"{operator}/metrics", timeout=5).text
    assert 'kleave_reconcile_total{kind="InferenceDeployment",result="success"}' in metrics


@pytest.mark.parametrize("mode", ["client-side", "server-side"])
def test_gitops_apply_shows_no_drift_after_reconcile(
    cluster: Cluster, operator: str, tmp_path: Path, mode: str
) -> None:
    """Argo CD diffs client-side by default; Flux applies and diffs server-side."""
    name = f"gitops-{mode}"
    manifest = tmp_path / "infd.yaml"
    manifest.write_text(MANIFEST.replace("NAME", name))
    flags = ["--server-side", "--field-manager=gitops"] if mode == "server-side" else []
    cluster.kubectl("apply", *flags, "-f", str(manifest))
    wait_for(lambda: _conditions(cluster, name).get("Accepted"), 30, "reconciled")
    diff = cluster.kubectl("diff", *flags, "-f", str(manifest), check=False)
    assert diff.returncode == 0, diff.stdout


def test_deleting_removes_the_object(cluster: Cluster, operator: str) -> None:
    cluster.apply(MANIFEST.replace("NAME", "doomed"))
    wait_for(lambda: _conditions(cluster, "doomed").get("Accepted"), 30, "reconciled")
    cluster.kubectl("delete", "infd", "doomed", "--timeout=30s")
    assert cluster.kubectl("get", "infd", "doomed", check=False).returncode != 0


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"engine": "tensorrt"}, 'spec.engine: Unsupported value: "tensorrt"'),
        ({"model": "has spaces"}, "spec.model"),
        ({"topology": "PDAF"}, "spec.topology is immutable"),
    ],
)
def test_api_server_rejects_bad_specs_naming_the_field(
    cluster: Cluster, crds: None, patch: dict[str, str], message: str
) -> None:
    cluster.apply(MANIFEST.replace("NAME", "validated"))
    result = cluster.kubectl(
        "patch", "infd", "validated", "--type=merge", "-p", json.dumps({"spec": patch}), check=False
    )
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert cluster.get_json("infd", "validated")["spec"]["topology"] == "PD"  # nothing lost


def test_checked_in_crds_are_what_the_api_server_serves(cluster: Cluster, crds: None) -> None:
    served = cluster.get_json("crd", "inferencedeployments.kleave.dev")
    assert served["spec"]["names"]["shortNames"] == ["infd"]
    assert (REPO / "crds" / "kleave.dev_inferencedeployments.yaml").exists()
    explain = cluster.kubectl("explain", "infd.spec.topology").stdout
    assert "FIELD: topology" in explain
