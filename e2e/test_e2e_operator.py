"""InferenceDeployment end to end: the operator against the real API server, through kubectl."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from conftest import REPO, Cluster, tool, wait_for
from kleave.api.registry import render_crds
from kleave.devcluster.processes import free_ports

EXAMPLES = sorted(
    path
    for path in (REPO / "examples").glob("*.yaml")
    if any(
        (doc or {}).get("kind") == "InferenceDeployment"
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8"))
    )
)
"""The InferenceDeployment examples (the sandbox kinds' examples have their own test)."""
GPU_LABEL = "nvidia.com/gpu.product"

SMALL = """
apiVersion: kleave.dev/v1alpha1
kind: InferenceDeployment
metadata: {name: NAME, namespace: default}
spec:
  model: meta-llama/Llama-3.1-8B-Instruct
  engine: vllm
  topology: PD
  pools:
    prefill: {replicas: 1, gpuType: H100-SXM}
    decode: {replicas: 1, gpuType: H20, scaling: External, maxReplicas: 6}
"""


class Operator:
    """`kleave operator run` as a user starts it, restartable for the resilience test."""

    def __init__(self, cluster: Cluster, log_dir: Path) -> None:
        self.cluster = cluster
        self.log_dir = log_dir
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.log = log_dir / "operator-0.log"
        self.starts = 0

    def start(self) -> None:
        [port] = free_ports(1)
        self.url = f"http://127.0.0.1:{port}"
        self.log = self.log_dir / f"operator-{self.starts}.log"
        self.starts += 1
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                [
                    tool("kleave"), "operator", "run", "--standalone", "--all-namespaces",
                    f"--kubeconfig={self.cluster.kubeconfig}", "--health-host=127.0.0.1",
                    f"--health-port={port}", "--log-format=json",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"the operator exited: {self.log.read_text()[-3000:]}")
            return _get(f"{self.url}/readyz") == 200

        wait_for(ready, 60, "operator ready")

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=30)

    def stop(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        assert self.process.returncode == 0, self.log.read_text()[-3000:]
        _check_json_logs(self.log)


@pytest.fixture(scope="module")
def crds(cluster: Cluster) -> None:
    documents = "".join(f"---\n{text}" for text in render_crds().values())
    cluster.kubectl("apply", "--server-side", "--field-manager=kleave", "-f", "-", stdin=documents)
    cluster.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")


@pytest.fixture(scope="module")
def operator(
    cluster: Cluster, crds: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Operator]:
    running = Operator(cluster, tmp_path_factory.mktemp("operator"))
    running.start()
    try:
        yield running
    finally:
        cluster.kubectl("delete", "infd", "--all", "-A", "--timeout=60s", check=False)
        running.stop()


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


def _conditions(obj: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions", [])}


def _ready(cluster: Cluster, name: str) -> bool:
    infd = cluster.get_json("infd", name)
    ok = _conditions(infd).get("Ready", {}).get("status") == "True"
    return ok and infd["status"].get("observedGeneration") == infd["metadata"]["generation"]


def _pods(cluster: Cluster, selector: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = cluster.get_json("pods", "-l", selector)["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def _events(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = cluster.get_json(
        "events", f"--field-selector=involvedObject.name={name}"
    )["items"]
    return items


def _settled(cluster: Cluster, name: str) -> bool:
    """Ready, nothing progressing, and every pool's pods exactly as desired."""
    if not _ready(cluster, name):
        return False
    infd = cluster.get_json("infd", name)
    if _conditions(infd).get("Progressing", {}).get("status") != "False":
        return False
    return all(
        p["readyReplicas"] == p["replicas"] for p in infd["status"].get("pools", {}).values()
    )


def test_examples_become_ready_on_their_gpu_types(cluster: Cluster, operator: Operator) -> None:
    for example in EXAMPLES:
        cluster.kubectl("apply", "-f", str(example))
    names = [path.stem for path in EXAMPLES]
    for name in names:
        wait_for(partial(_settled, cluster, name), 90, f"{name} Ready")

    nodes = {n["metadata"]["name"]: n for n in cluster.get_json("nodes")["items"]}
    for name in names:
        infd = cluster.get_json("infd", name)
        for role, pool in infd["spec"]["pools"].items():
            pods = _pods(cluster, f"kleave.dev/inference-pool={name}-{role}")
            assert len(pods) == pool["replicas"], (name, role)
            for pod in pods:
                assert pod["status"]["phase"] == "Running"
                node = nodes[pod["spec"]["nodeName"]]
                assert node["metadata"]["labels"][GPU_LABEL] == pool["gpuType"], (name, role)
                limits = pod["spec"]["containers"][0]["resources"]["limits"]
                assert limits["nvidia.com/gpu"] == str(pool.get("gpusPerReplica", 1))
        router = _pods(
            cluster, f"kleave.dev/inference-deployment={name},kleave.dev/component=router"
        )
        assert router and all(p["status"]["phase"] == "Running" for p in router)
        plan_cm = f"{name}-plan-{infd['status']['servingRevision']}"
        plan = json.loads(cluster.get_json("configmap", plan_cm)["data"]["plan.json"])
        assert set(plan["pools"]) == set(infd["spec"]["pools"])

    # The PDAF example's FFN pool runs ranked workers (a StatefulSet).
    assert cluster.get_json("statefulsets", "-l", "kleave.dev/inference-pool=deepseek-v3-pdaf-ffn")[
        "items"
    ]

    table = cluster.kubectl("get", "infd", "llama-8b-pd").stdout.splitlines()
    assert table[0].split() == ["NAME", "READY", "TOPOLOGY", "P", "D", "A", "F", "AGE"]
    assert table[1].split()[:5] == ["llama-8b-pd", "True", "PD", "2/2", "3/3"]
    pdaf = cluster.kubectl("get", "infd", "deepseek-v3-pdaf").stdout.splitlines()[1].split()
    assert pdaf[:6] == ["deepseek-v3-pdaf", "True", "PDAF", "1/1", "2/2", "2/2"]

    pools = cluster.kubectl("get", "infp", "llama-8b-pd-decode").stdout.splitlines()
    assert pools[0].split() == ["NAME", "ROLE", "GPU", "READY", "DESIRED", "AGE"]
    assert pools[1].split()[:5] == ["llama-8b-pd-decode", "decode", "H20", "3", "3"]

    metrics = httpx.get(f"{operator.url}/metrics", timeout=5).text
    assert 'kleave_reconcile_total{kind="InferenceDeployment",result="success"}' in metrics


def test_scale_external_pool_and_revert_static_pool(cluster: Cluster, operator: Operator) -> None:
    cluster.apply(SMALL.replace("NAME", "scaled"))
    wait_for(lambda: _settled(cluster, "scaled"), 60, "scaled Ready")

    cluster.kubectl("scale", "infp/scaled-decode", "--replicas=4")
    wait_for(
        lambda: (
            len(_pods(cluster, "kleave.dev/inference-pool=scaled-decode")) == 4
            and _settled(cluster, "scaled")
        ),
        60,
        "4 decode pods",
    )
    assert cluster.get_json("infd", "scaled")["status"]["pools"]["decode"]["summary"] == "4/4"

    # Beyond maxReplicas the API server refuses the scale.
    result = cluster.kubectl("scale", "infp/scaled-decode", "--replicas=9", check=False)
    assert result.returncode != 0 and "maxReplicas" in result.stderr, result.stderr

    # prefill is Static: the operator puts its replicas back and says why.
    cluster.kubectl("scale", "infp/scaled-prefill", "--replicas=3")
    wait_for(
        lambda: any(e["reason"] == "ReplicasReverted" for e in _events(cluster, "scaled-prefill")),
        30,
        "ReplicasReverted event",
    )
    wait_for(
        lambda: (
            cluster.get_json("infp", "scaled-prefill")["spec"]["replicas"] == 1
            and len(_pods(cluster, "kleave.dev/inference-pool=scaled-prefill")) == 1
        ),
        30,
        "prefill back at 1",
    )
    [event] = [e for e in _events(cluster, "scaled-prefill") if e["reason"] == "ReplicasReverted"]
    assert "scaling Static" in event["message"]


INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("no model", {"model": None}, "spec.model: Required value"),
    ("bad engine", {"engine": "tensorrt"}, 'spec.engine: Unsupported value: "tensorrt"'),
    ("model with spaces", {"model": "has spaces"}, "spec.model"),
    (
        "PD without decode",
        {"pools": {"decode": None}},
        "topology PD requires spec.pools.prefill and spec.pools.decode",
    ),
    (
        "PD with ffn",
        {"pools": {"ffn": {"gpuType": "H20"}}},
        "spec.pools.attention and spec.pools.ffn are only allowed with topology PDAF",
    ),
    (
        "PDAF on vllm",
        {
            "topology": "PDAF",
            "pools": {"decode": None, "attention": {"gpuType": "H20"}, "ffn": {"gpuType": "H20"}},
        },
        "spec.engine must be builtin for topology PDAF",
    ),
    (
        "PDAF without ffn",
        {
            "engine": "builtin",
            "topology": "PDAF",
            "pools": {"decode": None, "attention": {"gpuType": "H20"}},
        },
        "topology PDAF requires spec.pools.prefill, spec.pools.attention and spec.pools.ffn",
    ),
    (
        "Colocated with prefill",
        {"topology": "Colocated"},
        "topology Colocated serves prefill and decode in one pool",
    ),
    (
        "parallelism does not divide GPUs",
        {"pools": {"decode": {"gpusPerReplica": 2, "parallelism": {"tensor": 4}}}},
        'spec.pools.decode.parallelism: Invalid value: "object": parallelism.tensor x '
        "parallelism.expert must divide gpusPerReplica",
    ),
    (
        "replicas above max",
        {"pools": {"decode": {"replicas": 9, "maxReplicas": 4}}},
        'spec.pools.decode.replicas: Invalid value: "object": replicas must be at most maxReplicas',
    ),
    (
        "min above max",
        {"pools": {"decode": {"replicas": 3, "minReplicas": 5, "maxReplicas": 4}}},
        "minReplicas must not exceed maxReplicas",
    ),
    ("negative replicas", {"pools": {"decode": {"replicas": -1}}}, "spec.pools.decode.replicas"),
    (
        "GPUs in resources",
        {"pools": {"decode": {"resources": {"limits": {"nvidia.com/gpu": 2}}}}},
        "nvidia.com/gpu is set from gpusPerReplica",
    ),
    (
        "KV backend the engine lacks",
        {"kvTransfer": {"backend": "tcp"}},
        "spec.kvTransfer.backend: Invalid value",
    ),
    (
        "no GPU type",
        {"pools": {"decode": {"gpuType": None}}},
        "spec.pools.decode.gpuType: Required",
    ),
    ("bad scaling", {"pools": {"decode": {"scaling": "Auto"}}}, "spec.pools.decode.scaling"),
    ("unknown field", {"pools": {"decode": {"gpuTyp": "H20"}}}, 'unknown field "spec.pools'),
]


def _merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


@pytest.mark.parametrize(("case", "patch", "message"), INVALID, ids=[c[0] for c in INVALID])
def test_api_server_rejects_invalid_manifests_naming_the_field(
    cluster: Cluster, crds: None, case: str, patch: dict[str, Any], message: str
) -> None:
    manifest = yaml.safe_load(SMALL.replace("NAME", "invalid"))
    manifest["spec"] = _merge(manifest["spec"], patch)
    result = cluster.kubectl("apply", "-f", "-", stdin=json.dumps(manifest), check=False)
    assert result.returncode != 0, case
    assert message in result.stderr, result.stderr
    assert cluster.kubectl("get", "infd", "invalid", check=False).returncode != 0


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"topology": "Colocated"}, "spec.topology is immutable"),
        ({"engine": "sglang"}, "spec.engine is immutable"),
    ],
)
def test_immutable_fields_stay_put(
    cluster: Cluster, crds: None, patch: dict[str, str], message: str
) -> None:
    cluster.apply(SMALL.replace("NAME", "immutable"))
    result = cluster.kubectl(
        "patch", "infd", "immutable", "--type=merge", "-p", json.dumps({"spec": patch}), check=False
    )
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert cluster.get_json("infd", "immutable")["spec"]["topology"] == "PD"  # nothing lost


def _generations(cluster: Cluster, name: str) -> dict[str, int]:
    items = cluster.get_json(
        "deployments,statefulsets", "-l", f"kleave.dev/inference-deployment={name}"
    )
    return {i["metadata"]["name"]: i["metadata"]["generation"] for i in items["items"]}


def test_gitops_server_side_apply_has_no_conflict_or_drift(
    cluster: Cluster, operator: Operator, tmp_path: Path
) -> None:
    text = (REPO / "examples" / "llama-8b-pd.yaml").read_text().replace("llama-8b-pd", "gitops")
    manifest = tmp_path / "infd.yaml"
    manifest.write_text(text)
    flags = ["--server-side", "--field-manager=argocd"]
    cluster.kubectl("apply", *flags, "-f", str(manifest))
    wait_for(lambda: _settled(cluster, "gitops"), 60, "gitops Ready")
    cluster.kubectl("apply", *flags, "-f", str(manifest))  # no conflict with kleave's writes
    _no_drift(cluster, flags, manifest)
    before = _generations(cluster, "gitops")

    # A change outside the serving plan (decode's env) rolls only the decode workers.
    args = 'args: ["--max-num-seqs", "256"]'
    manifest.write_text(text.replace(args, args + "\n      env: [{name: LOG, value: debug}]"))
    cluster.kubectl("apply", *flags, "-f", str(manifest))
    wait_for(lambda: _settled(cluster, "gitops"), 60, "gitops Ready after change")
    after = _generations(cluster, "gitops")
    changed = {name for name in before if after.get(name) != before[name]}
    assert len(changed) == 1 and "-decode-" in changed.pop(), (before, after)
    _no_drift(cluster, flags, manifest)


def _no_drift(cluster: Cluster, flags: list[str], manifest: Path) -> None:
    """`kubectl diff` is empty. It reads the live object and then dry-runs the apply, so a
    status write in between (a rollout's ready counts) shows as a one-off difference: only a
    difference that persists is drift."""
    for _ in range(10):
        diff = cluster.kubectl("diff", *flags, "-f", str(manifest), check=False)
        if diff.returncode == 0:
            return
        time.sleep(1)
    raise AssertionError(f"kubectl diff shows drift:\n{diff.stdout}")


def test_plan_change_rolls_pools_together_then_moves_the_router(
    cluster: Cluster, operator: Operator
) -> None:
    cluster.apply(SMALL.replace("NAME", "coordinated"))
    wait_for(lambda: _settled(cluster, "coordinated"), 60, "coordinated Ready")
    old = cluster.get_json("infd", "coordinated")["status"]["servingRevision"]

    patch = {"spec": {"kvTransfer": {"backend": "nccl"}}}  # part of the serving plan
    cluster.kubectl("patch", "infd", "coordinated", "--type=merge", "-p", json.dumps(patch))
    new = wait_for(
        lambda: (
            (r := cluster.get_json("infd", "coordinated")["status"]["planRevision"]) != old and r
        ),
        30,
        "a new plan revision",
    )
    wait_for(
        lambda: (
            cluster.get_json("infd", "coordinated")["status"]["servingRevision"] == new
            and _settled(cluster, "coordinated")
        ),
        90,
        "router on the new revision",
    )
    # Old revision's workers and plan are gone; the router's pods address the new revision.
    selector = "kleave.dev/inference-deployment=coordinated,kleave.dev/component=worker"
    wait_for(
        lambda: (
            {p["metadata"]["labels"]["kleave.dev/revision"] for p in _pods(cluster, selector)}
            == {new}
        ),
        60,
        "only new-revision workers",
    )
    router = cluster.get_json("deployment", "coordinated-router")
    assert router["metadata"]["annotations"]["kleave.dev/revision"] == new
    assert cluster.kubectl("get", "configmap", f"coordinated-plan-{old}", check=False).returncode
    reasons = [e["reason"] for e in _events(cluster, "coordinated")]
    assert "RolloutStarted" in reasons and "RolloutComplete" in reasons, reasons


def test_no_nodes_for_gpu_type_degrades_then_recovers(cluster: Cluster, operator: Operator) -> None:
    manifest = SMALL.replace("NAME", "b200").replace("gpuType: H20", "gpuType: B200")
    cluster.apply(manifest)
    wait_for(
        lambda: (
            _conditions(cluster.get_json("infd", "b200")).get("Degraded", {}).get("reason")
            == "NoNodesForGPUType"
        ),
        30,
        "Degraded NoNodesForGPUType",
    )
    assert _conditions(cluster.get_json("infp", "b200-decode"))["Degraded"]["status"] == "True"
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": "kwok-b200-0",
            "labels": {GPU_LABEL: "B200", "type": "kwok", "kubernetes.io/hostname": "kwok-b200-0"},
            "annotations": {"kwok.x-k8s.io/node": "fake"},
        },
        "status": {"capacity": {"nvidia.com/gpu": "8", "cpu": "64", "memory": "512Gi",
                                "pods": "110"},
                   "allocatable": {"nvidia.com/gpu": "8", "cpu": "64", "memory": "512Gi",
                                   "pods": "110"}},
    }  # fmt: skip
    cluster.kubectl("create", "-f", "-", stdin=json.dumps(node))
    try:
        wait_for(lambda: _settled(cluster, "b200"), 60, "b200 recovers")
        assert _conditions(cluster.get_json("infd", "b200"))["Degraded"]["status"] == "False"
    finally:
        cluster.kubectl("delete", "infd", "b200", "--timeout=30s", check=False)
        cluster.kubectl("delete", "node", "kwok-b200-0", check=False)


def _children(cluster: Cluster, selector: str) -> list[str]:
    kinds = "inferencepools,deployments,statefulsets,services,configmaps"
    items = cluster.get_json(kinds, "-n", "resilience", "-l", selector)["items"]
    return sorted(f"{i['kind']}/{i['metadata']['name']}" for i in items)


def test_operator_killed_mid_reconcile_converges_without_duplicates(
    cluster: Cluster, operator: Operator
) -> None:
    # 20 deployments x 2 GPUs need the dev cluster's GPUs: free those earlier tests hold.
    cluster.kubectl("delete", "infd", "--all", "-n", "default", "--timeout=60s")
    wait_for(lambda: not _pods(cluster, "kleave.dev/component=worker"), 60, "earlier workers gone")
    cluster.kubectl("create", "namespace", "resilience")
    docs = "".join(
        "---\n" + SMALL.replace("NAME", f"r{n}").replace("default", "resilience") for n in range(20)
    )
    cluster.kubectl("apply", "-f", "-", stdin=docs)
    wait_for(
        lambda: len(cluster.get_json("infp", "-n", "resilience")["items"]) >= 6, 30, "some pools"
    )
    operator.kill()
    operator.start()
    for n in range(20):
        wait_for(partial(_ready_in, cluster, f"r{n}"), 120, f"r{n} Ready")
    for n in range(20):
        children = _children(cluster, f"kleave.dev/inference-deployment=r{n}")
        kinds = [c.split("/")[0] for c in children]
        # 2 pools, 2 workloads + the router, 2 pool Services + the router's, 1 plan.
        assert kinds.count("InferencePool") == 2, children
        assert kinds.count("Deployment") == 3, children
        assert kinds.count("Service") == 3, children
        assert kinds.count("ConfigMap") == 1, children
    pods = cluster.get_json("pods", "-n", "resilience")["items"]
    assert len([p for p in pods if not p["metadata"].get("deletionTimestamp")]) == 20 * 3

    # Deleting an InferenceDeployment removes everything it owned.
    cluster.kubectl("delete", "infd", "r0", "-n", "resilience", "--timeout=30s")
    wait_for(
        lambda: not _children(cluster, "kleave.dev/inference-deployment=r0")
        and not cluster.get_json("pods", "-n", "resilience", "-l",
                                 "kleave.dev/inference-deployment=r0")["items"],
        60,
        "r0's children garbage-collected",
    )  # fmt: skip
    cluster.kubectl("delete", "namespace", "resilience", "--wait=false")


def _ready_in(cluster: Cluster, name: str) -> bool:
    infd = cluster.get_json("infd", name, "-n", "resilience")
    ok = _conditions(infd).get("Ready", {}).get("status") == "True"
    return ok and all(
        p["readyReplicas"] == p["replicas"] for p in infd["status"].get("pools", {}).values()
    )


def test_checked_in_crds_are_what_the_api_server_serves(cluster: Cluster, crds: None) -> None:
    served = cluster.get_json("crd", "inferencedeployments.kleave.dev")
    assert served["spec"]["names"]["shortNames"] == ["infd"]
    pools = cluster.get_json("crd", "inferencepools.kleave.dev")
    assert pools["spec"]["names"]["shortNames"] == ["infp"]
    assert pools["spec"]["versions"][0]["subresources"]["scale"]["labelSelectorPath"]
    explain = cluster.kubectl("explain", "infd.spec.pools.decode").stdout
    assert "gpuType" in explain and "nvidia.com/gpu.product" in explain
