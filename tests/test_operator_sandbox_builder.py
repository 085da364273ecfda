"""Pure builders of sandbox pods and NetworkPolicies from a SandboxTemplate."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from kleave.api.sandbox_policy import ToolPolicy
from kleave.api.sandbox_template import EnvVar, SandboxTemplateSpec
from kleave.operator.naming import (
    ANNOTATION_TOOL_POLICY,
    LABEL_SANDBOX,
    LABEL_SANDBOX_TEMPLATE,
    LABEL_TEMPLATE_HASH,
    LABEL_WARM_POOL,
    MANAGED_BY,
)
from kleave.operator.sandbox_builder import (
    BASELINE_POLICY_NAME,
    POLICY_FILE,
    SANDBOX_UID,
    STATE_DIR,
    PodOwner,
    TemplateError,
    build_baseline_network_policy,
    build_network_policy,
    build_pod,
    build_state_claim,
    build_token_secret,
    policy_document,
    pool_claim_name,
    pool_selector,
    resume_pod_name,
    sandbox_claim_name,
    selector_string,
    template_hash,
)
from kleave.operator.sandbox_tokens import PodToken, RuntimeTokens, digest

TOKEN = PodToken(nonce="n0", digest="d" * 64)
TEMPLATE: dict[str, Any] = {
    "apiVersion": "kleave.dev/v1alpha1",
    "kind": "SandboxTemplate",
    "metadata": {"name": "coder", "namespace": "ns", "uid": "t-uid"},
}
POOL: dict[str, Any] = {
    "apiVersion": "kleave.dev/v1alpha1",
    "kind": "SandboxWarmPool",
    "metadata": {"name": "coder-pool", "namespace": "ns", "uid": "p-uid"},
}
SANDBOX: dict[str, Any] = {
    "apiVersion": "kleave.dev/v1alpha1",
    "kind": "AgentSandbox",
    "metadata": {"name": "task-1", "namespace": "ns", "uid": "s-uid"},
}


def spec(**fields: Any) -> SandboxTemplateSpec:
    return SandboxTemplateSpec.model_validate({"image": "kleave/kleave:0.1.0", **fields})


def pool_pod(template: SandboxTemplateSpec | None = None) -> dict[str, Any]:
    template = template or spec()
    claim = "coder-pool-x7k2q-state" if template.persistence.enabled else None
    return build_pod(
        TEMPLATE,
        template,
        PodOwner(POOL, pool="coder-pool"),
        name="coder-pool-x7k2q",
        token=TOKEN,
        claim_name=claim,
    )


def test_pool_pod_is_isolated_by_default() -> None:
    pod = pool_pod()
    body = pod["spec"]
    assert body["runtimeClassName"] == "kleave-microvm"
    assert body["automountServiceAccountToken"] is False
    assert body["enableServiceLinks"] is False
    assert body["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": SANDBOX_UID,
        "runAsGroup": SANDBOX_UID,
        "fsGroup": SANDBOX_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    [container] = body["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["privileged"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["runAsNonRoot"] is True
    assert container["resources"] == {"limits": {"cpu": "1", "memory": "1Gi"}}
    assert "hostNetwork" not in body and "hostPID" not in body


def test_volumes_workspace_state_tmp_and_the_policy_file() -> None:
    template = spec(workspace={"sizeLimit": "2Gi", "mountPath": "/home/agent/work"})
    body = pool_pod(template)["spec"]
    volumes = {v["name"]: v for v in body["volumes"]}
    assert volumes["workspace"] == {"name": "workspace", "emptyDir": {"sizeLimit": "2Gi"}}
    assert volumes["tmp"]["emptyDir"] == {"sizeLimit": "64Mi"}
    assert volumes["state"]["emptyDir"] == {}
    item, _token = volumes["policy"]["downwardAPI"]["items"]
    assert item["fieldRef"]["fieldPath"] == f"metadata.annotations['{ANNOTATION_TOOL_POLICY}']"
    [container] = body["containers"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["workspace"]["mountPath"] == "/home/agent/work"
    assert mounts["tmp"]["mountPath"] == "/tmp"
    assert mounts["state"]["mountPath"] == STATE_DIR
    assert mounts["policy"]["readOnly"] is True
    assert container["workingDir"] == "/home/agent/work"
    assert {m["name"] for m in container["volumeMounts"]} == set(volumes)


def test_runtime_command_port_and_readiness_probe() -> None:
    template = spec(runtimePort=9090)
    [container] = pool_pod(template)["spec"]["containers"]
    assert container["command"] == ["kleave", "sandbox", "runtime"]
    args = container["args"]
    assert args[args.index("--port") + 1] == "9090"
    assert args[args.index("--policy") + 1] == POLICY_FILE
    assert args[args.index("--workspace") + 1] == "/workspace"
    assert args[args.index("--host") + 1] == "0.0.0.0"
    assert container["ports"] == [{"name": "runtime", "containerPort": 9090, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "runtime"}


def test_a_template_command_replaces_the_default_and_keeps_the_layout_in_env() -> None:
    template = spec(command=["/entrypoint"], args=["serve"])
    [container] = pool_pod(template)["spec"]["containers"]
    assert container["command"] == ["/entrypoint"] and container["args"] == ["serve"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["KLEAVE_POLICY_FILE"] == POLICY_FILE
    assert env["KLEAVE_RUNTIME_PORT"] == "8080"
    assert env["KLEAVE_WORKSPACE"] == "/workspace"
    only_args = spec(args=["--verbose"])
    [container] = pool_pod(only_args)["spec"]["containers"]
    assert "command" not in container and container["args"] == ["--verbose"]


def test_policy_annotation_is_the_templates_tool_policy() -> None:
    template = spec(tools={"allowedCommands": ["python3", "git"], "maxExecSeconds": 60})
    pod = pool_pod(template)
    document = pod["metadata"]["annotations"][ANNOTATION_TOOL_POLICY]
    assert document == policy_document(template)
    policy = ToolPolicy.model_validate(json.loads(document))
    assert policy.allowed_commands == ["python3", "git"]
    assert policy.max_exec_seconds == 60


def test_limits_requests_scheduling_and_env() -> None:
    template = spec(
        resources={"requests": {"cpu": "250m"}, "limits": {"cpu": 2, "memory": "2Gi"}},
        nodeSelector={"sandbox": "true"},
        tolerations=[{"key": "sandbox", "operator": "Exists", "effect": "NoSchedule"}],
        env=[{"name": "A", "value": "template"}],
    )
    pod = build_pod(
        TEMPLATE,
        template,
        PodOwner(SANDBOX, sandbox="task-1"),
        name="task-1",
        token=TOKEN,
        extra_env=[EnvVar(name="A", value="sandbox"), EnvVar(name="B", value="b")],
    )
    body = pod["spec"]
    [container] = body["containers"]
    assert container["resources"] == {
        "requests": {"cpu": "250m"},
        "limits": {"cpu": "2", "memory": "2Gi"},
    }
    assert body["nodeSelector"] == {"sandbox": "true"}
    assert body["tolerations"] == [{"key": "sandbox", "operator": "Exists", "effect": "NoSchedule"}]
    env = [(e["name"], e["value"]) for e in container["env"] if not e["name"].startswith("KLEAVE")]
    assert env == [("A", "template"), ("B", "b")]  # the template's value wins


def test_labels_and_owner_of_pool_and_cold_pods() -> None:
    template = spec()
    pooled = pool_pod(template)
    meta = pooled["metadata"]
    assert meta["name"] == "coder-pool-x7k2q" and "generateName" not in meta
    assert meta["labels"] == {
        MANAGED_BY: "kleave",
        "app.kubernetes.io/name": "kleave",
        "app.kubernetes.io/component": "sandbox",
        LABEL_SANDBOX_TEMPLATE: "coder",
        LABEL_TEMPLATE_HASH: template_hash(template),
        LABEL_WARM_POOL: "coder-pool",
    }
    [ref] = meta["ownerReferences"]
    assert (ref["kind"], ref["uid"], ref["controller"]) == ("SandboxWarmPool", "p-uid", True)

    cold = build_pod(
        TEMPLATE,
        template,
        PodOwner(SANDBOX, sandbox="task-1"),
        name="task-1",
        token=TOKEN,
        claim_name="coder-pool-x7k2q-state",
    )
    meta = cold["metadata"]
    assert meta["name"] == "task-1" and "generateName" not in meta
    assert meta["labels"][LABEL_SANDBOX] == "task-1"
    assert LABEL_WARM_POOL not in meta["labels"]
    assert meta["ownerReferences"][0]["uid"] == "s-uid"
    assert cold["spec"] == pooled["spec"]  # same template and claim, same pod

    with pytest.raises(ValueError, match="exactly one"):
        build_pod(TEMPLATE, template, PodOwner(SANDBOX), name="x", token=TOKEN)


def test_persistence_mounts_the_claim_where_the_runtime_writes_snapshots() -> None:
    pod = pool_pod()
    [container] = pod["spec"]["containers"]
    assert {"name": "persist", "mountPath": "/var/lib/kleave/snapshots"} in container[
        "volumeMounts"
    ]
    assert {
        "name": "persist",
        "persistentVolumeClaim": {"claimName": "coder-pool-x7k2q-state"},
    } in pod["spec"]["volumes"]
    without = spec(persistence={"enabled": False})
    bare = pool_pod(without)
    assert all(v["name"] != "persist" for v in bare["spec"]["volumes"])
    # Turning persistence on or off changes pods (rolls pools); its size does not.
    assert template_hash(without) != template_hash(spec())
    assert template_hash(spec(persistence={"size": "5Gi"})) == template_hash(spec())


def test_state_claims_belong_to_the_pod_then_the_sandbox() -> None:
    persistence = spec(persistence={"size": "2Gi", "storageClassName": "fast"}).persistence
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "ns", "uid": "u"},
    }
    claim = build_state_claim(pod, pool_claim_name("p"), "coder", persistence)
    assert claim["metadata"]["name"] == "p-state"
    assert claim["metadata"]["ownerReferences"][0]["uid"] == "u"
    assert LABEL_SANDBOX not in claim["metadata"]["labels"]
    assert claim["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "2Gi"}},
        "storageClassName": "fast",
    }
    own = build_state_claim(SANDBOX, sandbox_claim_name("task-1"), "coder", persistence)
    assert own["metadata"]["name"] == "task-1-state"
    assert own["metadata"]["labels"][LABEL_SANDBOX] == "task-1"
    assert resume_pod_name("task-1", 3) == "task-1-r3"


def test_pool_selector_matches_only_unclaimed_pool_pods() -> None:
    labels = pool_pod()["metadata"]["labels"]
    selector = pool_selector("coder-pool")
    assert all(labels[k] == v for k, v in selector.items())
    assert selector_string(selector) == (
        "app.kubernetes.io/managed-by=kleave,kleave.dev/warm-pool=coder-pool"
    )


def test_template_hash_is_stable_and_follows_what_shapes_pods() -> None:
    base: dict[str, Any] = {
        "image": "img:1",
        "env": [{"name": "A", "value": "1"}],
        "runtimePort": 8080,
    }
    first = template_hash(SandboxTemplateSpec.model_validate(base))
    reordered = {"runtimePort": 8080, "env": [{"name": "A", "value": "1"}], "image": "img:1"}
    assert template_hash(SandboxTemplateSpec.model_validate(reordered)) == first
    assert len(first) == 10 and first.isalnum()
    # Fields that do not shape pods do not roll the pool...
    same: list[dict[str, Any]] = [
        {"egress": {"allow": [{"cidr": "10.0.0.0/8"}]}},
        {"lifetime": {"maxLifetimeSeconds": 60}},
        {"persistence": {"size": "5Gi"}},
    ]
    for extra in same:
        assert template_hash(SandboxTemplateSpec.model_validate(base | extra)) == first, extra
    # ...and every field that does, does.
    different: list[dict[str, Any]] = [
        {"image": "img:2"},
        {"env": [{"name": "A", "value": "2"}]},
        {"runtimePort": 9000},
        {"tools": {"allowedCommands": ["ls"]}},
        {"resources": {"limits": {"cpu": "2", "memory": "1Gi"}}},
        {"runtimeClassName": "gvisor"},
        {"workspace": {"sizeLimit": "3Gi"}},
        {"nodeSelector": {"a": "b"}},
    ]
    hashes = {template_hash(SandboxTemplateSpec.model_validate(base | d)) for d in different}
    assert first not in hashes and len(hashes) == len(different)


@pytest.mark.parametrize("mount", ["/var/lib/kleave", "/var", "/etc", "/tmp", "/tmp/work"])
def test_workspace_may_not_overlap_the_runtimes_own_mounts(mount: str) -> None:
    with pytest.raises(TemplateError, match=r"spec\.workspace\.mountPath"):
        template_hash(spec(workspace={"mountPath": mount}))
    with pytest.raises(TemplateError):
        pool_pod(spec(workspace={"mountPath": mount}))


def test_network_policy_allows_dns_cidrs_and_reports_hosts() -> None:
    template = spec(
        runtimePort=9000,
        egress={
            "allow": [
                {"cidr": "10.1.0.0/16", "ports": [{"port": 5432}]},
                {"cidr": "192.168.0.0/24"},
                {"host": "pkg.example.com", "ports": [{"port": 443}]},
                {"cidr": "2001:db8::/32", "ports": [{"port": 53, "protocol": "UDP"}]},
            ]
        },
    )
    plan = build_network_policy(TEMPLATE, template)
    policy = plan.policy
    assert policy["metadata"]["name"] == "coder-sandbox"
    assert policy["metadata"]["ownerReferences"][0]["uid"] == "t-uid"
    body = policy["spec"]
    assert body["podSelector"]["matchLabels"] == {
        MANAGED_BY: "kleave",
        LABEL_SANDBOX_TEMPLATE: "coder",
    }
    assert body["policyTypes"] == ["Ingress", "Egress"]
    assert body["ingress"] == [{"ports": [{"protocol": "TCP", "port": 9000}]}]
    dns, *rules = body["egress"]
    [peer] = dns["to"]
    assert peer["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "kube-system"
    }
    assert peer["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    assert dns["ports"] == [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]
    assert rules == [
        {
            "to": [{"ipBlock": {"cidr": "10.1.0.0/16"}}],
            "ports": [{"protocol": "TCP", "port": 5432}],
        },
        {"to": [{"ipBlock": {"cidr": "192.168.0.0/24"}}]},
        {
            "to": [{"ipBlock": {"cidr": "2001:db8::/32"}}],
            "ports": [{"protocol": "UDP", "port": 53}],
        },
    ]
    assert plan.unenforced_hosts == ["pkg.example.com (443/TCP)"]
    # The template's pods are what it selects.
    labels = pool_pod(template)["metadata"]["labels"]
    assert all(labels[k] == v for k, v in body["podSelector"]["matchLabels"].items())


def test_default_template_allows_only_dns() -> None:
    plan = build_network_policy(TEMPLATE, spec())
    assert len(plan.policy["spec"]["egress"]) == 1 and not plan.unenforced_hosts


def test_baseline_policy_denies_all_but_dns_for_every_sandbox_pod() -> None:
    policy = build_baseline_network_policy("ns")
    assert policy["metadata"]["name"] == BASELINE_POLICY_NAME
    assert "ownerReferences" not in policy["metadata"]
    body = policy["spec"]
    assert body["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in body
    [dns] = body["egress"]
    assert dns["ports"][0]["port"] == 53
    labels = pool_pod()["metadata"]["labels"]
    assert all(labels[k] == v for k, v in body["podSelector"]["matchLabels"].items())


def test_pods_carry_a_token_digest_never_the_token() -> None:
    tokens = RuntimeTokens(b"k" * 32)
    issued = tokens.issue("ns", "coder-pool-x7k2q")
    pod = build_pod(
        TEMPLATE, spec(), PodOwner(POOL, pool="coder-pool"), name="coder-pool-x7k2q", token=issued
    )
    token = tokens.for_pod(pod)
    assert token is not None and digest(token) == issued.digest
    annotations = pod["metadata"]["annotations"]
    assert annotations["kleave.dev/runtime-token-sha256"] == issued.digest
    assert token not in json.dumps(pod)
    [container] = pod["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--token-sha256-file") + 1] == "/etc/kleave/token.sha256"
    [policy] = [v for v in pod["spec"]["volumes"] if v["name"] == "policy"]
    assert {i["path"] for i in policy["downwardAPI"]["items"]} == {"policy.json", "token.sha256"}
    # Another pod of the same name (a later sandbox) gets another nonce, so another token.
    again = tokens.issue("ns", "coder-pool-x7k2q")
    assert again.nonce != issued.nonce and again.digest != issued.digest
    pod["metadata"]["uid"] = "pod-uid"
    secret = build_token_secret(pod, token)
    assert secret["metadata"]["name"] == "coder-pool-x7k2q-runtime-token"
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "pod-uid"
    assert base64.b64decode(secret["data"]["token"]).decode() == token
