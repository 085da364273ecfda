"""The Helm chart: it lints, renders what the design asks for, and its RBAC is enough.

The RBAC test installs the chart's CRDs, ServiceAccount and roles, then runs the operator as
a local process with a token of that ServiceAccount (kwok cannot run the chart's Deployment),
applies the examples and waits until the operator has reconciled each of them. A missing
permission shows up as a condition that never comes, or a 403 in the operator's log.
"""

from __future__ import annotations

import base64
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from conftest import REPO, Cluster, tool, wait_for
from kleave.devcluster import kubeconfig
from kleave.devcluster.paths import Binaries, cache_dir
from kleave.devcluster.processes import free_ports

CHART = REPO / "charts" / "kleave"
RELEASE = "kleave"
NAMESPACE = "kleave-system"
SERVICE_ACCOUNT = "kleave"  # the chart's full name for release "kleave"
APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]

RECONCILED_CONDITIONS = ("Accepted", "Ready")
"""Conditions every example must reach with status True; add "Ready" once the operator
creates pools and workers, and the test then proves the RBAC covers the full reconcile."""

LOG_PERMISSION_ERRORS = re.compile(r"Forbidden|\b403\b|Not enough permissions", re.IGNORECASE)

# Asked as the ServiceAccount, these must all be denied: least privilege beyond the rules.
DENIED = [
    ("get", "secrets", "", ""),
    ("list", "secrets", "", ""),
    ("watch", "secrets", "", ""),
    ("delete", "secrets", "", ""),
    ("patch", "secrets", "", ""),
    ("create", "inferencedeployments.kleave.dev", "", ""),
    ("delete", "inferencedeployments.kleave.dev", "", ""),
    ("update", "inferencedeployments.kleave.dev", "", ""),
    ("create", "pods", "exec", ""),  # sandbox pods are created, never exec'd into
    ("update", "pods", "ephemeralcontainers", ""),
    ("update", "pods", "", ""),
    ("delete", "persistentvolumeclaims", "", ""),  # they go with their sandbox (GC)
    ("list", "persistentvolumeclaims", "", ""),
    ("create", "persistentvolumes", "", ""),
    ("create", "agentsandboxes.kleave.dev", "", ""),
    ("patch", "agentsandboxes.kleave.dev", "", ""),
    ("patch", "sandboxtemplates.kleave.dev", "", ""),
    ("list", "runtimeclasses.node.k8s.io", "", ""),
    ("patch", "nodes", "", ""),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", "", ""),
    ("create", "customresourcedefinitions.apiextensions.k8s.io", "", ""),
    ("impersonate", "serviceaccounts", "", ""),
    ("create", "leases.coordination.k8s.io", "", "default"),  # only in the release namespace
    ("delete", "leases.coordination.k8s.io", "", NAMESPACE),
]


def helm() -> str:
    """The helm that `kleave dev-cluster build` compiles next to kube-apiserver."""
    path = Binaries(cache_dir()).helm
    if not path.is_file():
        pytest.fail(f"helm is not built ({path} is missing): run `make control-plane`")
    return str(path)


def run_helm(*args: str) -> str:
    result = subprocess.run(
        [helm(), *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"helm {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def render(*extra: str) -> list[dict[str, Any]]:
    output = run_helm(
        "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--include-crds", *extra
    )
    return [doc for doc in yaml.safe_load_all(output) if doc]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [doc] = of_kind(docs, kind)
    return doc


def manifest(docs: list[dict[str, Any]]) -> str:
    return "".join(f"---\n{yaml.safe_dump(doc, sort_keys=False)}" for doc in docs)


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    return render()


# ----- lint and render ----------------------------------------------------------------------
def test_helm_lint_passes() -> None:
    output = run_helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in output, output


def test_template_includes_every_crd_of_the_repository(rendered: list[dict[str, Any]]) -> None:
    files = sorted((REPO / "crds").glob("*.yaml"))
    assert files
    expected = {
        doc["metadata"]["name"]: doc for doc in (yaml.safe_load(p.read_text()) for p in files)
    }
    served = {crd["metadata"]["name"]: crd for crd in of_kind(rendered, "CustomResourceDefinition")}
    assert served.keys() == expected.keys()
    for name, crd in served.items():
        assert crd == expected[name], f"{name} differs from crds/"


def test_deployment_runs_two_leader_elected_hardened_replicas(
    rendered: list[dict[str, Any]],
) -> None:
    deployment = one(rendered, "Deployment")
    assert deployment["metadata"]["namespace"] == NAMESPACE
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == SERVICE_ACCOUNT
    assert pod["automountServiceAccountToken"] is True
    [container] = pod["containers"]
    assert container["image"] == f"kleave/kleave:{APP_VERSION}"
    assert "." not in container["image"].split("/")[0]  # no registry host baked in
    command = [*container["command"], *container["args"]]
    assert command[:4] == ["kleave", "operator", "run", "--all-namespaces"]
    assert "--leader-elect" in command
    assert _flag(command, "--leader-election-namespace") == "$(POD_NAMESPACE)"
    assert _flag(command, "--log-format") == "json"
    assert _flag(command, "--health-port") == "8080"
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"

    [port] = container["ports"]
    assert (port["name"], port["containerPort"]) == ("http-metrics", 8080)
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http-metrics"}

    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert security["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert {"requests", "limits"} <= container["resources"].keys()

    [term] = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    selector = spec["selector"]["matchLabels"]
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == selector

    pdb = one(rendered, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    service = one(rendered, "Service")
    assert service["spec"]["selector"] == selector
    assert service["spec"]["ports"] == [
        {"name": "http-metrics", "port": 8080, "targetPort": "http-metrics", "protocol": "TCP"}
    ]


def test_the_runtime_token_key_is_a_kept_secret_mounted_read_only(
    rendered: list[dict[str, Any]],
) -> None:
    [secret] = of_kind(rendered, "Secret")
    assert secret["metadata"]["name"] == "kleave-runtime-token-key"
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert len(base64.b64decode(secret["data"]["key"])) >= 32
    deployment = one(rendered, "Deployment")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    key = _flag([*container["command"], *container["args"]], "--runtime-token-key-file")
    assert key == "/etc/kleave-operator/runtime-token.key"
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["runtime-token-key"]["secret"]["secretName"] == "kleave-runtime-token-key"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["runtime-token-key"]["readOnly"] is True
    own = render("--set", "sandbox.runtimeTokenKey.existingSecret=mine")
    assert not of_kind(own, "Secret")
    volumes = {v["name"]: v for v in one(own, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["runtime-token-key"]["secret"]["secretName"] == "mine"


def test_every_object_carries_the_standard_labels(rendered: list[dict[str, Any]]) -> None:
    for doc in rendered:
        if doc["kind"] == "CustomResourceDefinition":
            continue  # crds/ is not templated
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "kleave", doc["kind"]
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/version"] == APP_VERSION
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"].startswith("kleave-")


def test_rbac_is_least_privilege(rendered: list[dict[str, Any]]) -> None:
    rules = one(rendered, "ClusterRole")["rules"]
    for rule in rules:
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[key], rule
        if "secrets" in rule["resources"]:  # sandbox tokens: written, never read
            assert rule["resources"] == ["secrets"] and rule["verbs"] == ["create"]
        assert "leases" not in rule["resources"], "leases belong in the namespaced Role"
    [lease_rule] = one(rendered, "Role")["rules"]
    assert lease_rule == {
        "apiGroups": ["coordination.k8s.io"],
        "resources": ["leases"],
        "verbs": ["get", "create", "update"],
    }
    role_binding = one(rendered, "RoleBinding")
    assert role_binding["metadata"]["namespace"] == NAMESPACE
    for binding in (role_binding, one(rendered, "ClusterRoleBinding")):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": NAMESPACE}
        ]


def test_sandbox_runtime_class_and_optional_service_monitor(
    rendered: list[dict[str, Any]],
) -> None:
    runtime_class = one(rendered, "RuntimeClass")
    assert runtime_class["metadata"]["name"] == "kleave-microvm"
    assert runtime_class["handler"] == "kata-fc"
    assert runtime_class["overhead"]["podFixed"] == {"memory": "130Mi", "cpu": "250m"}
    assert not of_kind(rendered, "ServiceMonitor")

    toggled = render(
        "--set", "metrics.serviceMonitor.enabled=true", "--set", "sandbox.runtimeClass.create=false"
    )
    assert not of_kind(toggled, "RuntimeClass")
    [endpoint] = one(toggled, "ServiceMonitor")["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http-metrics", "/metrics")


# ----- the chart's RBAC against the real API server -----------------------------------------
@pytest.fixture(scope="module")
def installed(cluster: Cluster, rendered: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """What `helm install` would create, minus the Deployment that kwok cannot run."""
    crds = of_kind(rendered, "CustomResourceDefinition")
    cluster.kubectl(
        "apply", "--server-side", "--field-manager=kleave", "-f", "-", stdin=manifest(crds)
    )
    cluster.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
    cluster.kubectl("create", "namespace", NAMESPACE)
    rbac_kinds = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
    rbac = [doc for doc in rendered if doc["kind"] in rbac_kinds]
    try:
        cluster.kubectl(
            "apply", "--server-side", "--field-manager=helm", "-f", "-", stdin=manifest(rbac)
        )
        # The rest must at least pass the API server's validation.
        rest = [doc for doc in rendered if doc not in crds and doc not in rbac]
        cluster.kubectl(
            "apply", "--server-side", "--dry-run=server", "-f", "-", stdin=manifest(rest)
        )
        yield rbac
    finally:
        for doc in rbac:
            if doc["kind"].startswith("Cluster"):
                cluster.kubectl(
                    "delete", doc["kind"], doc["metadata"]["name"], "--wait=false", check=False
                )
        cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)


def _can_i(cluster: Cluster, verb: str, resource: str, subresource: str, namespace: str) -> bool:
    scope = [f"--namespace={namespace}"] if namespace else ["--all-namespaces"]
    sub = [f"--subresource={subresource}"] if subresource else []
    result = cluster.kubectl(
        "auth", "can-i", verb, resource, *sub, *scope,
        f"--as=system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}",
        check=False,
    )  # fmt: skip
    answer = result.stdout.strip()
    assert answer in ("yes", "no"), result.stderr
    return answer == "yes"


def test_service_account_has_exactly_the_chart_permissions(
    cluster: Cluster, installed: list[dict[str, Any]]
) -> None:
    granted = []
    for doc in installed:
        if doc["kind"] not in ("ClusterRole", "Role"):
            continue
        namespace = doc["metadata"].get("namespace", "")
        for rule in doc["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    name, _, sub = resource.partition("/")
                    qualified = f"{name}.{group}" if group else name
                    granted += [(verb, qualified, sub, namespace) for verb in rule["verbs"]]
    assert len(granted) > 40
    missing = [g for g in granted if not _can_i(cluster, *g)]
    assert not missing, f"granted by the chart but denied: {missing}"
    allowed = [d for d in DENIED if _can_i(cluster, *d)]
    assert not allowed, f"allowed beyond the chart's rules: {allowed}"


@pytest.fixture(scope="module")
def sa_kubeconfig(
    cluster: Cluster, installed: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A kubeconfig for the chart's ServiceAccount: what the operator's pod would mount."""
    token = cluster.kubectl(
        "create", "token", SERVICE_ACCOUNT, f"--namespace={NAMESPACE}", "--duration=1h"
    ).stdout.strip()
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    server = admin["clusters"][0]["cluster"]
    ca_pem = base64.b64decode(server["certificate-authority-data"])
    path = tmp_path_factory.mktemp("chart-operator") / "kubeconfig"
    return kubeconfig.write(
        path, kubeconfig.render(server["server"], ca_pem, token, user=SERVICE_ACCOUNT)
    )


def _leader_election_flags() -> list[str]:
    """Leader election as the chart's Deployment runs it, where this build has the flag."""
    help_text = subprocess.run(
        [tool("kleave"), "operator", "run", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    if "--leader-elect" in help_text:
        return ["--leader-elect", f"--leader-election-namespace={NAMESPACE}"]
    return ["--standalone"]


@pytest.fixture(scope="module")
def chart_operator(
    cluster: Cluster, sa_kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """`kleave operator run` with only the chart's permissions; yields its log file."""
    [port] = free_ports(1)
    log = tmp_path_factory.mktemp("chart-operator-log") / "operator.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [
                tool("kleave"), "operator", "run", "--all-namespaces", *_leader_election_flags(),
                f"--kubeconfig={sa_kubeconfig}", "--health-host=127.0.0.1",
                f"--health-port={port}", "--log-format=json",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"the operator exited: {log.read_text()[-3000:]}")
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1.0).is_success
            except httpx.HTTPError:
                return False

        wait_for(ready, 60, "operator ready")
        yield log
    finally:
        crashed = process.poll() is not None
        # Delete the examples while the operator runs, so it can remove its finalizer.
        cluster.kubectl(
            "delete", "-f", str(REPO / "examples"), "--ignore-not-found", "--timeout=60s",
            check=False,
        )  # fmt: skip
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        if not crashed:  # a crash is reported by the failure that saw it
            assert process.returncode == 0, log.read_text()[-3000:]


def _reconciled(infd: dict[str, Any]) -> bool:
    status = infd.get("status") or {}
    if status.get("observedGeneration") != infd["metadata"]["generation"]:
        return False
    conditions = {c["type"]: c.get("status") for c in status.get("conditions", [])}
    return all(conditions.get(kind) == "True" for kind in RECONCILED_CONDITIONS)


def test_operator_reconciles_the_examples_with_the_chart_rbac(
    cluster: Cluster, chart_operator: Path
) -> None:
    cluster.kubectl("apply", "-f", str(REPO / "examples"))
    expected = {
        (doc["metadata"]["namespace"], doc["metadata"]["name"])
        for path in sorted((REPO / "examples").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc["kind"] == "InferenceDeployment"
    }
    assert len(expected) == 3

    def pending() -> list[str]:
        items = cluster.get_json("inferencedeployments", "--all-namespaces")["items"]
        done = {
            (i["metadata"]["namespace"], i["metadata"]["name"]) for i in items if _reconciled(i)
        }
        return sorted(f"{ns}/{name}" for ns, name in expected - done)

    try:
        wait_for(lambda: not pending(), 60, f"{', '.join(RECONCILED_CONDITIONS)}=True")
    except AssertionError as error:
        raise AssertionError(
            f"{error}; not reconciled: {pending()}\noperator log:\n"
            + chart_operator.read_text()[-3000:]
        ) from None

    denied = [
        line
        for line in chart_operator.read_text().splitlines()
        if LOG_PERMISSION_ERRORS.search(line)
    ]
    assert not denied, "\n".join(denied[:10])

    if "--leader-elect" in _leader_election_flags():
        leases = cluster.get_json("leases", f"--namespace={NAMESPACE}")["items"]
        assert any(lease["spec"].get("holderIdentity") for lease in leases), leases


def _flag(command: list[str], name: str) -> str:
    """The value after `name` (`--name value` or `--name=value`)."""
    for index, arg in enumerate(command):
        if arg == name:
            return command[index + 1]
        if arg.startswith(f"{name}="):
            return arg.partition("=")[2]
    raise AssertionError(f"{name} is not in {command}")
