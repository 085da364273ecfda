"""Agent sandboxes end to end: warm pools, claims, cold starts and the claim race.

The operator runs as a local process against the dev cluster (as in test_e2e_operator.py).
kwok marks pods Ready without running them, so nothing runs inside the sandbox pods here:
these tests cover what the operator does with pods (build, pool, claim, bind, report), not
the in-sandbox runtime (tests/test_sandbox_*.py run that as a local process).

Sandbox pods go to kwok nodes this module adds (tainted, so nothing else lands there), and
use a ``kleave-microvm`` RuntimeClass this module creates when the cluster lacks one: the API
server refuses pods whose runtime class does not exist.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config

from conftest import Cluster, wait_for
from kleave.api.registry import render_crds
from kleave.operator.warm_pool_sizing import decode_counts, warm_for_rate
from kleave.sandbox.bench_stats import summarize
from test_e2e_operator import Operator

NODE_LABEL = "kleave.dev/e2e-sandbox-node"
TAINT_KEY = "kleave.dev/e2e-sandbox"
NODES = 4
RUNTIME_CLASS = "kleave-microvm"
NAMESPACE = "sandboxes"
RACE_NAMESPACE = "sandbox-race"
TWO_NAMESPACE = "sandbox-two-operators"
SCALE_NAMESPACE = "sandbox-autoscale"
NAMESPACES = (NAMESPACE, RACE_NAMESPACE, TWO_NAMESPACE, SCALE_NAMESPACE)


def template_manifest(name: str, namespace: str, *, persistence: bool = True) -> str:
    """With persistence each pool pod gets a claim (the dev cluster's kleave-local class)."""
    return f"""
apiVersion: kleave.dev/v1alpha1
kind: SandboxTemplate
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  image: kleave/kleave:0.1.0
  resources:
    limits: {{cpu: 100m, memory: 64Mi}}
  workspace: {{sizeLimit: 512Mi, mountPath: /workspace}}
  egress:
    allow:
      - cidr: 10.20.0.0/16
        ports: [{{port: 443}}]
      - host: pkg.example.com
        ports: [{{port: 443}}]
  tools: {{allowedCommands: [python3, ls]}}
  lifetime: {{maxLifetimeSeconds: 3600}}
  persistence: {{enabled: {"true" if persistence else "false"}}}
  nodeSelector: {{{NODE_LABEL}: "true"}}
  tolerations:
    - {{key: {TAINT_KEY}, operator: Exists, effect: NoSchedule}}
"""


def pool_manifest(name: str, namespace: str, template: str, replicas: int) -> str:
    return f"""
apiVersion: kleave.dev/v1alpha1
kind: SandboxWarmPool
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  templateRef: {{name: {template}}}
  replicas: {replicas}
"""


def sandbox_body(name: str, namespace: str, pool: str) -> dict[str, Any]:
    return {
        "apiVersion": "kleave.dev/v1alpha1",
        "kind": "AgentSandbox",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"warmPoolRef": {"name": pool}},
    }


def _node(index: int) -> dict[str, Any]:
    name = f"kwok-sandbox-{index}"
    resources = {"cpu": "1000", "memory": "4Ti", "pods": "600"}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {NODE_LABEL: "true", "type": "kwok", "kubernetes.io/hostname": name},
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {"taints": [{"key": TAINT_KEY, "value": "true", "effect": "NoSchedule"}]},
        "status": {"capacity": dict(resources), "allocatable": dict(resources)},
    }


def _gone(cluster: Cluster, kind: str, name: str) -> bool:
    return cluster.kubectl("get", kind, name, check=False).returncode != 0


def _has_default_account(cluster: Cluster, namespace: str) -> bool:
    return cluster.kubectl("get", "sa", "default", "-n", namespace, check=False).returncode == 0


@pytest.fixture(scope="module")
def sandbox_cluster(cluster: Cluster) -> Iterator[Cluster]:
    """CRDs, the RuntimeClass and the sandbox nodes."""
    documents = "".join(f"---\n{text}" for text in render_crds().values())
    cluster.kubectl("apply", "--server-side", "--field-manager=kleave", "-f", "-", stdin=documents)
    cluster.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
    created_class = cluster.kubectl("get", "runtimeclass", RUNTIME_CLASS, check=False).returncode
    if created_class:
        runtime_class = {
            "apiVersion": "node.k8s.io/v1",
            "kind": "RuntimeClass",
            "metadata": {"name": RUNTIME_CLASS},
            "handler": "kata-fc",
        }
        cluster.kubectl("create", "-f", "-", stdin=json.dumps(runtime_class))
    nodes = [_node(i) for i in range(NODES)]
    for node in nodes:
        cluster.kubectl("create", "-f", "-", stdin=json.dumps(node))
    for namespace in NAMESPACES:
        cluster.kubectl("create", "namespace", namespace)
    names = [f"node/{node['metadata']['name']}" for node in nodes]
    cluster.kubectl("wait", "--for=condition=Ready", *names, "--timeout=60s")
    for namespace in NAMESPACES:  # pods are refused until it exists
        wait_for(partial(_has_default_account, cluster, namespace), 30, "default ServiceAccount")
    try:
        yield cluster
    finally:
        # Wait until the namespaces (and their 1,100 pods) are gone, so the next module's
        # operator does not see objects of a namespace that is being terminated.
        for namespace in NAMESPACES:
            cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        for namespace in NAMESPACES:
            wait_for(partial(_gone, cluster, "namespace", namespace), 300, f"{namespace} deleted")
        for node in nodes:
            cluster.kubectl("delete", "node", node["metadata"]["name"], "--wait=false", check=False)
        if created_class:
            cluster.kubectl("delete", "runtimeclass", RUNTIME_CLASS, check=False)


@pytest.fixture(scope="module")
def operator(
    sandbox_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Operator]:
    running = Operator(sandbox_cluster, tmp_path_factory.mktemp("sandbox-operator"))
    running.start()
    try:
        yield running
    finally:
        running.stop()


def _items(cluster: Cluster, kind: str, namespace: str, *selector: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = cluster.get_json(kind, "-n", namespace, *selector)["items"]
    return items


def _live_pods(cluster: Cluster, namespace: str, selector: str) -> list[dict[str, Any]]:
    pods = _items(cluster, "pods", namespace, "-l", selector)
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def _ready(pod: dict[str, Any]) -> bool:
    return any(
        c["type"] == "Ready" and c["status"] == "True"
        for c in (pod.get("status") or {}).get("conditions", [])
    )


def _conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions", [])}


def _pool_ready(cluster: Cluster, namespace: str, pool: str, replicas: int) -> bool:
    status = cluster.get_json("sbxwp", pool, "-n", namespace).get("status") or {}
    pods = _live_pods(cluster, namespace, f"kleave.dev/warm-pool={pool}")
    return (
        status.get("readyReplicas") == replicas
        and len(pods) == replicas
        and all(_ready(p) for p in pods)
    )


def _report(what: str, values: list[int]) -> str:
    if not values:
        return f"{what}: none"
    stats = summarize(values)  # the bench's definition, so the numbers compare
    return f"{what}: n={stats.n} p50={stats.p50:.0f}ms p99={stats.p99:.0f}ms max={stats.max:.0f}ms"


def test_warm_pool_of_ten_claims_warm_then_cold_with_isolated_pods(
    sandbox_cluster: Cluster, operator: Operator
) -> None:
    cluster = sandbox_cluster
    cluster.apply(template_manifest("coder", NAMESPACE))
    cluster.apply(pool_manifest("coder", NAMESPACE, "coder", 10))
    started = time.monotonic()
    wait_for(lambda: _pool_ready(cluster, NAMESPACE, "coder", 10), 90, "10 warm sandboxes")
    fill_s = time.monotonic() - started

    template = cluster.get_json("sbxt", "coder", "-n", NAMESPACE)
    template_hash = template["status"]["templateHash"]
    conditions = _conditions(template)
    assert conditions["Accepted"]["status"] == "True"
    assert conditions["EgressEnforced"]["status"] == "False"
    assert "pkg.example.com" in conditions["EgressEnforced"]["message"]
    pool = cluster.get_json("sbxwp", "coder", "-n", NAMESPACE)
    assert pool["status"]["templateHash"] == template_hash
    assert pool["status"]["selector"] == (
        "app.kubernetes.io/managed-by=kleave,kleave.dev/warm-pool=coder"
    )

    docs = "".join(
        f"---\n{yaml.safe_dump(sandbox_body(f'agent-{n}', NAMESPACE, 'coder'))}" for n in range(10)
    )
    cluster.kubectl("apply", "-f", "-", stdin=docs)

    def all_ready() -> list[dict[str, Any]] | None:
        items = _items(cluster, "asbx", NAMESPACE)
        ready = [s for s in items if (s.get("status") or {}).get("phase") == "Ready"]
        return items if len(ready) == len(items) == 10 else None

    sandboxes = wait_for(all_ready, 60, "10 sandboxes Ready")
    assert [s["status"]["claim"]["source"] for s in sandboxes] == ["Warm"] * 10
    pod_names = {s["status"]["podName"] for s in sandboxes}
    assert len(pod_names) == 10
    warm_latencies = [int(s["status"]["claim"]["latencyMs"]) for s in sandboxes]
    print(f"\nfill 10: {fill_s:.1f}s; {_report('warm claim latency', warm_latencies)}")
    for sandbox in sandboxes:
        pod = cluster.get_json("pod", sandbox["status"]["podName"], "-n", NAMESPACE)
        labels = pod["metadata"]["labels"]
        assert labels["kleave.dev/sandbox"] == sandbox["metadata"]["name"]
        assert "kleave.dev/warm-pool" not in labels
        [owner] = pod["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["uid"]) == ("AgentSandbox", sandbox["metadata"]["uid"])
        assert sandbox["status"]["endpoint"] == f"{pod['status']['podIP']}:8080"
        assert sandbox["status"]["templateHash"] == template_hash
        assert _conditions(sandbox)["Ready"]["status"] == "True"
        assert sandbox["status"]["volumeClaimName"] == f"{pod['metadata']['name']}-state"

    # Each adopted pod's claim moves to its sandbox (the pause would otherwise lose it).
    def claims_owned() -> bool:
        for sandbox in sandboxes:
            pvc = cluster.get_json("pvc", sandbox["status"]["volumeClaimName"], "-n", NAMESPACE)
            [owner] = pvc["metadata"]["ownerReferences"]
            if owner["uid"] != sandbox["metadata"]["uid"]:
                return False
        return True

    wait_for(claims_owned, 30, "every claim owned by its sandbox")

    # The pool refills to 10 unclaimed sandboxes and counts the claims.
    wait_for(lambda: _pool_ready(cluster, NAMESPACE, "coder", 10), 60, "the pool refilled")
    wait_for(
        lambda: cluster.get_json("sbxwp", "coder", "-n", NAMESPACE)["status"]["claimed"] == 10,
        30,
        "claimed=10",
    )

    # An empty pool: the 11th sandbox cold-starts from the pool's template.
    cluster.kubectl("scale", "sbxwp/coder", "-n", NAMESPACE, "--replicas=0")
    wait_for(
        lambda: not _live_pods(cluster, NAMESPACE, "kleave.dev/warm-pool=coder"),
        60,
        "the pool emptied",
    )
    assert len(_live_pods(cluster, NAMESPACE, "kleave.dev/sandbox")) == 10  # claims untouched
    cluster.apply(yaml.safe_dump(sandbox_body("agent-10", NAMESPACE, "coder")))
    eleventh = wait_for(
        lambda: (
            (s := cluster.get_json("asbx", "agent-10", "-n", NAMESPACE))
            .get("status", {})
            .get("phase")
            == "Ready"
            and s
        ),
        60,
        "the 11th sandbox Ready",
    )
    assert eleventh["status"]["claim"]["source"] == "Cold"
    assert eleventh["status"]["podName"] == "agent-10"
    assert eleventh["status"]["volumeClaimName"] == "agent-10-state"
    print(_report("cold start latency (kwok)", [int(eleventh["status"]["claim"]["latencyMs"])]))
    events = _items(cluster, "events", NAMESPACE, "--field-selector=involvedObject.name=agent-10")
    assert "ColdStarted" in [e["reason"] for e in events]
    table = cluster.kubectl("get", "asbx", "agent-10", "agent-0", "-n", NAMESPACE).stdout
    lines = table.splitlines()
    assert lines[0].split()[:6] == ["NAME", "MODE", "PHASE", "POD", "SOURCE", "LATENCY(MS)"]
    assert lines[1].split()[:5] == ["agent-10", "Running", "Ready", "agent-10", "Cold"]
    assert lines[2].split()[4] == "Warm"

    # Every sandbox pod, warm or cold, is isolated as the template says.
    for pod in _live_pods(cluster, NAMESPACE, "kleave.dev/sandbox"):
        spec = pod["spec"]
        assert spec["runtimeClassName"] == RUNTIME_CLASS
        assert spec["automountServiceAccountToken"] is False
        assert not [v for v in spec["volumes"] if v["name"].startswith("kube-api-access")]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == 65532
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        [container] = spec["containers"]
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert container["resources"]["limits"] == {"cpu": "100m", "memory": "64Mi"}
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/workspace", "/tmp"} <= mounts
        assert not [m for m in mounts if m.startswith("/var/run/secrets")]
        policy = json.loads(pod["metadata"]["annotations"]["kleave.dev/tool-policy"])
        assert policy["allowedCommands"] == ["python3", "ls"]

    # Egress: the template's NetworkPolicy (DNS + the CIDR rule) and the namespace baseline.
    policy = cluster.get_json("networkpolicy", "coder-sandbox", "-n", NAMESPACE)["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert policy["podSelector"]["matchLabels"]["kleave.dev/sandbox-template"] == "coder"
    dns, cidr = policy["egress"]
    assert {p["port"] for p in dns["ports"]} == {53}
    assert dns["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    assert cidr == {
        "to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}],
        "ports": [{"protocol": "TCP", "port": 443}],
    }
    assert policy["ingress"] == [{"ports": [{"protocol": "TCP", "port": 8080}]}]
    baseline = cluster.get_json("networkpolicy", "kleave-sandbox-baseline", "-n", NAMESPACE)
    assert len(baseline["spec"]["egress"]) == 1

    # Deleting a sandbox deletes its pod (ownerReference, garbage collector).
    gone = eleventh["status"]["podName"]
    cluster.kubectl("delete", "asbx", "agent-10", "-n", NAMESPACE, "--wait=false")
    wait_for(
        lambda: cluster.kubectl("get", "pod", gone, "-n", NAMESPACE, check=False).returncode != 0,
        60,
        "the cold pod garbage-collected",
    )


def _kube_client(kubeconfig: Path) -> client.CustomObjectsApi:
    configuration = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)  # type: ignore[no-untyped-call]
    configuration.connection_pool_maxsize = 64
    return client.CustomObjectsApi(client.ApiClient(configuration))


def test_a_thousand_concurrent_claims_against_a_pool_of_100(
    sandbox_cluster: Cluster, operator: Operator
) -> None:
    cluster = sandbox_cluster
    ns = RACE_NAMESPACE
    cluster.apply(template_manifest("race", ns, persistence=False))  # claims, not volumes
    cluster.apply(pool_manifest("race", ns, "race", 100))
    started = time.monotonic()
    wait_for(lambda: _pool_ready(cluster, ns, "race", 100), 180, "100 warm sandboxes")
    fill_s = time.monotonic() - started

    api = _kube_client(cluster.kubeconfig)
    names = [f"race-{n:04d}" for n in range(1000)]

    def create(name: str) -> None:
        api.create_namespaced_custom_object(
            "kleave.dev", "v1alpha1", ns, "agentsandboxes", sandbox_body(name, ns, "race")
        )

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=50) as pool:
        list(pool.map(create, names))
    create_s = time.monotonic() - started

    def all_ready() -> list[dict[str, Any]] | None:
        items = _items(cluster, "asbx", ns)
        phases = Counter((s.get("status") or {}).get("phase") for s in items)
        return items if phases.get("Ready") == len(names) else None

    sandboxes: list[dict[str, Any]] = wait_for(all_ready, 420, "1000 sandboxes Ready")
    ready_s = time.monotonic() - started

    # None lost, none doubled: each sandbox names its own pod, and that pod names it back.
    assert sorted(s["metadata"]["name"] for s in sandboxes) == names
    _check_one_pod_each(cluster, ns, sandboxes)
    sources = Counter(s["status"]["claim"]["source"] for s in sandboxes)
    assert sources["Warm"] + sources["Cold"] == 1000 and sources["Warm"] >= 100, sources
    # The pool refills afterwards, and counted each warm claim.
    wait_for(lambda: _pool_ready(cluster, ns, "race", 100), 180, "the pool refilled")
    wait_for(
        lambda: cluster.get_json("sbxwp", "race", "-n", ns)["status"]["claimed"] == sources["Warm"],
        60,
        "claimed counts every warm claim",
    )

    warm = [
        int(s["status"]["claim"]["latencyMs"])
        for s in sandboxes
        if s["status"]["claim"]["source"] == "Warm"
    ]
    cold = [
        int(s["status"]["claim"]["latencyMs"])
        for s in sandboxes
        if s["status"]["claim"]["source"] == "Cold"
    ]
    print(
        f"\npool of 100 filled in {fill_s:.1f}s; 1000 creates in {create_s:.1f}s; all Ready "
        f"{ready_s:.1f}s after the first create; {dict(sources)}\n"
        f"{_report('warm', warm)}\n{_report('cold (kwok)', cold)}"
    )


def _check_one_pod_each(cluster: Cluster, ns: str, sandboxes: list[dict[str, Any]]) -> None:
    """Each sandbox names its own pod, that pod names it back, and no pod is shared."""
    by_pod = Counter(s["status"]["podName"] for s in sandboxes)
    assert len(by_pod) == len(sandboxes), by_pod.most_common(3)
    pods = {p["metadata"]["name"]: p for p in _live_pods(cluster, ns, "kleave.dev/sandbox")}
    assert len(pods) == len(sandboxes)
    for sandbox in sandboxes:
        pod = pods[sandbox["status"]["podName"]]
        assert pod["metadata"]["labels"]["kleave.dev/sandbox"] == sandbox["metadata"]["name"]
        assert "kleave.dev/warm-pool" not in pod["metadata"]["labels"]
        [owner] = pod["metadata"]["ownerReferences"]
        assert owner["uid"] == sandbox["metadata"]["uid"]


def test_two_operators_racing_for_the_same_pods_never_share_one(
    sandbox_cluster: Cluster, operator: Operator, tmp_path: Path
) -> None:
    """A second operator (as during a botched leader handover) claims from the same pool.

    Within one operator, claims in flight are serialized in memory; across two, only the
    resourceVersion compare-and-swap on the pod keeps a pod from being bound twice. A sandbox
    that both bound (each to another pod) keeps one; the other pod is deleted.
    """
    cluster = sandbox_cluster
    ns = TWO_NAMESPACE
    cluster.apply(template_manifest("two", ns, persistence=False))
    cluster.apply(pool_manifest("two", ns, "two", 50))
    wait_for(lambda: _pool_ready(cluster, ns, "two", 50), 120, "50 warm sandboxes")
    second = Operator(cluster, tmp_path)
    second.start()
    try:
        api = _kube_client(cluster.kubeconfig)
        names = [f"two-{n:03d}" for n in range(300)]

        def create(name: str) -> None:
            api.create_namespaced_custom_object(
                "kleave.dev", "v1alpha1", ns, "agentsandboxes", sandbox_body(name, ns, "two")
            )

        with ThreadPoolExecutor(max_workers=50) as pool:
            list(pool.map(create, names))

        def settled() -> list[dict[str, Any]] | None:
            items = _items(cluster, "asbx", ns)
            if Counter((s.get("status") or {}).get("phase") for s in items)["Ready"] != 300:
                return None
            bound = _live_pods(cluster, ns, "kleave.dev/sandbox")
            return items if len(bound) == 300 else None  # duplicates cleaned up

        sandboxes: list[dict[str, Any]] = wait_for(settled, 300, "300 sandboxes, one pod each")
        _check_one_pod_each(cluster, ns, sandboxes)
    finally:
        second.stop()
    logs = [operator.log.read_text(), *(p.read_text() for p in tmp_path.glob("operator-*.log"))]
    conflicts = sum(log.count("changed while claimed") for log in logs)
    duplicates = sum(log.count("DuplicatePod") for log in logs)
    sources = Counter(s["status"]["claim"]["source"] for s in sandboxes)
    print(
        f"\ntwo operators: {dict(sources)}; claims retried after 409s: {conflicts}; "
        f"sandboxes bound twice and cleaned up: {duplicates}"
    )


AUTOSCALED_POOL = f"""
apiVersion: kleave.dev/v1alpha1
kind: SandboxWarmPool
metadata: {{name: scaled, namespace: {SCALE_NAMESPACE}}}
spec:
  templateRef: {{name: scaled}}
  min: 1
  max: 40
  autoscaling:
    mode: reactive
    intervalSeconds: 5
    startupSeconds: 2
    burstMemorySeconds: 0
    scaleDownDelaySeconds: 0
"""


def test_warm_pool_autoscaling_follows_the_claim_rate(
    sandbox_cluster: Cluster, operator: Operator
) -> None:
    """Claims raise the pool through /scale within one window; a quiet window lowers it.

    The manifest leaves replicas out (as in Git, when kleave owns them): the first decision
    raises the pool to min.
    """
    cluster = sandbox_cluster
    ns = SCALE_NAMESPACE
    unbounded = AUTOSCALED_POOL.replace("  max: 40\n", "")
    refused = cluster.kubectl("apply", "-f", "-", stdin=unbounded, check=False)
    assert refused.returncode != 0 and "spec.max: Invalid value" in refused.stderr, refused.stderr
    assert "spec.max is required when spec.autoscaling.mode is reactive" in refused.stderr

    cluster.apply(template_manifest("scaled", ns, persistence=False))
    cluster.apply(AUTOSCALED_POOL)
    wait_for(lambda: _pool_ready(cluster, ns, "scaled", 1), 60, "one warm sandbox")
    # No claims yet (no window ended, or only empty ones): held at min.
    first = _autoscaling(cluster)
    assert first["reason"] in ("NoClaims", "AtMin") and first["replicas"] == 1, first

    api = _kube_client(cluster.kubeconfig)
    names = [f"scaled-{n:02d}" for n in range(30)]
    with ThreadPoolExecutor(max_workers=30) as pool:
        list(
            pool.map(
                lambda name: api.create_namespaced_custom_object(
                    "kleave.dev", "v1alpha1", ns, "agentsandboxes", sandbox_body(name, ns, "scaled")
                ),
                names,
            )
        )

    def scaled_up() -> dict[str, Any] | None:
        status = _autoscaling(cluster)
        return status if (status.get("replicas") or 0) > 1 else None

    status = wait_for(scaled_up, 30, "the autoscaler scaling the pool up")
    claims_per_s = status["observedClaimsPerMinute"] / 60.0
    want = warm_for_rate(claims_per_s, 2.0, 0.99)  # the Poisson size for what it saw
    assert status["reason"] == "Reactive" and status["replicas"] == want, status
    assert sum(decode_counts(status["history"]["claims"])) <= len(names)
    pool_obj = cluster.get_json("sbxwp", "scaled", "-n", ns)
    assert pool_obj["spec"]["replicas"] >= want  # a later window may have raised it again
    wait_for(
        lambda: _pool_ready(
            cluster, ns, "scaled", cluster.get_json("sbxwp", "scaled", "-n", ns)["spec"]["replicas"]
        ),
        90,
        "the pool filled to the new size",
    )
    events = _items(cluster, "events", ns, "--field-selector=involvedObject.name=scaled")
    scaled = [e["message"] for e in events if e["reason"] == "WarmPoolScaled"]
    assert any(m.startswith("scaled up from 1 to ") for m in scaled), scaled
    over = cluster.kubectl("scale", "sbxwp/scaled", "-n", ns, "--replicas=41", check=False)
    assert over.returncode != 0 and "spec.replicas must be at most spec.max" in over.stderr
    wide = cluster.kubectl("get", "sbxwp", "scaled", "-n", ns, "-o", "wide").stdout.split("\n")
    assert "AUTOSCALE" in wide[0].split()

    # Quiet windows since: with no scale-down delay the pool returns to min.
    wait_for(lambda: _autoscaling(cluster).get("reason") == "AtMin", 60, "scaled down to min")
    wait_for(
        lambda: cluster.get_json("sbxwp", "scaled", "-n", ns)["spec"]["replicas"] == 1,
        10,
        "spec.replicas back to 1",
    )
    wait_for(lambda: _pool_ready(cluster, ns, "scaled", 1), 60, "one warm sandbox again")
    final = _autoscaling(cluster)
    counted = sum(c for c in decode_counts(final["history"]["claims"]) if math.isfinite(c))
    assert counted == len(names), final["history"]  # each claim counted once
    print(
        f"\nautoscaled warm pool: up to {status['replicas']} for "
        f"{status['observedClaimsPerMinute']}/min, then {final['message']}"
    )


def _autoscaling(cluster: Cluster) -> dict[str, Any]:
    pool = cluster.get_json("sbxwp", "scaled", "-n", SCALE_NAMESPACE)
    return dict((pool.get("status") or {}).get("autoscaling") or {})
