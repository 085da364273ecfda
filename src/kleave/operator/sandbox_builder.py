"""Pure builders for agent sandboxes: a SandboxTemplate -> sandbox pods and NetworkPolicies.

Every sandbox pod, warm or cold, comes from :func:`build_pod`, so the isolation defaults are
in one place: the template's runtime class (a microVM), no service-account token, non-root
with a fixed uid, seccomp ``RuntimeDefault``, all capabilities dropped, no privilege
escalation, a read-only root filesystem with three writable ``emptyDir`` volumes (the
workspace, the runtime's state, a small ``/tmp``), and resource limits. With persistence, a
PersistentVolumeClaim is mounted where the runtime writes its snapshots, so a pause's snapshot
outlives the pod. The tool policy
reaches the runtime as a file projected from a pod annotation (downward API), so a pod carries
the exact policy it was built with and needs no ConfigMap whose later edits could change it.

Egress is a NetworkPolicy per template plus a baseline per namespace. NetworkPolicies add up,
so the baseline (deny everything but DNS, for every kleave sandbox pod) keeps sandboxes fenced
in even while their template's policy is missing, e.g. after the template was deleted.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kleave.api.sandbox_template import EnvVar, Persistence, SandboxTemplateSpec
from kleave.operator.naming import (
    ANNOTATION_TOKEN_NONCE,
    ANNOTATION_TOKEN_SHA256,
    ANNOTATION_TOOL_POLICY,
    COMPONENT_SANDBOX,
    LABEL_COMPONENT_APP,
    LABEL_SANDBOX,
    LABEL_SANDBOX_TEMPLATE,
    LABEL_TEMPLATE_HASH,
    LABEL_WARM_POOL,
    MANAGED_BY,
    MANAGER,
    owner_reference,
)
from kleave.operator.sandbox_tokens import PodToken

SANDBOX_UID = 65532
"""The uid (and gid) sandbox processes run as: distroless's ``nonroot``, never root."""
CONTAINER_NAME = "sandbox"
RUNTIME_PORT_NAME = "runtime"
STATE_DIR = "/var/lib/kleave"
SNAPSHOT_DIR = f"{STATE_DIR}/snapshots"
"""The runtime's default snapshot directory; with persistence the claim is mounted here."""
PERSIST_VOLUME = "persist"
POLICY_DIR = "/etc/kleave"
POLICY_FILE = f"{POLICY_DIR}/policy.json"
TOKEN_DIGEST_FILE = f"{POLICY_DIR}/token.sha256"
TMP_DIR = "/tmp"  # the sandbox's own emptyDir, not the node's
TMP_SIZE_LIMIT = "64Mi"
TERMINATION_GRACE_S = 10  # the runtime kills running commands and logs runtime.stop at once
HASH_LENGTH = 10
RUNTIME_COMMAND = ("kleave", "sandbox", "runtime")

DNS_NAMESPACE = "kube-system"
DNS_POD_LABELS = {"k8s-app": "kube-dns"}  # CoreDNS and kube-dns both carry it
BASELINE_POLICY_NAME = "kleave-sandbox-baseline"

RESERVED_PATHS = (STATE_DIR, POLICY_DIR, TMP_DIR)
"""Where kleave mounts its own volumes; a workspace may not overlap them."""
_HASHED_CLAIM = "<claim>"
"""Stands for the per-pod claim name in the template hash (every pod has its own claim)."""


class TemplateError(ValueError):
    """A template kleave cannot build pods from; the message says which field to change."""


def sandbox_labels(template: str, template_hash: str) -> dict[str, str]:
    """Labels every sandbox pod of a template carries, claimed or not."""
    return {
        MANAGED_BY: MANAGER,
        "app.kubernetes.io/name": "kleave",
        LABEL_COMPONENT_APP: COMPONENT_SANDBOX,
        LABEL_SANDBOX_TEMPLATE: template,
        LABEL_TEMPLATE_HASH: template_hash,
    }


def pool_selector(pool: str) -> dict[str, str]:
    """The unclaimed pods of a warm pool (a claim removes the pool label)."""
    return {MANAGED_BY: MANAGER, LABEL_WARM_POOL: pool}


def selector_string(labels: Mapping[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


def _overlaps(path: str, other: str) -> bool:
    return path == other or path.startswith(other + "/") or other.startswith(path + "/")


def check_template(spec: SandboxTemplateSpec) -> None:
    """Refuse templates whose pods could not work; raises :class:`TemplateError`."""
    mount = spec.workspace.mount_path.rstrip("/")
    for reserved in RESERVED_PATHS:
        if _overlaps(mount, reserved):
            raise TemplateError(
                f"spec.workspace.mountPath {spec.workspace.mount_path} overlaps {reserved}, "
                f"where kleave mounts the runtime's own files; choose another path such as "
                "/workspace"
            )


def policy_document(spec: SandboxTemplateSpec) -> str:
    """The tool policy as the runtime reads it (``--policy``): canonical JSON, camelCase."""
    policy = spec.tools.model_dump(mode="json", by_alias=True)
    return json.dumps(policy, sort_keys=True, separators=(",", ":"))


def _runtime_env(spec: SandboxTemplateSpec) -> list[dict[str, Any]]:
    """KLEAVE_* variables (reserved in templates) that tell a custom entrypoint the layout."""
    return [
        {"name": "KLEAVE_WORKSPACE", "value": spec.workspace.mount_path},
        {"name": "KLEAVE_STATE_DIR", "value": STATE_DIR},
        {"name": "KLEAVE_POLICY_FILE", "value": POLICY_FILE},
        {"name": "KLEAVE_RUNTIME_PORT", "value": str(spec.runtime_port)},
        {"name": "KLEAVE_TOKEN_SHA256_FILE", "value": TOKEN_DIGEST_FILE},
    ]


def _command(spec: SandboxTemplateSpec) -> dict[str, list[str]]:
    """The container's command: the template's, else ``kleave sandbox runtime`` wired up."""
    if spec.command or spec.args:
        out: dict[str, list[str]] = {}
        if spec.command:
            out["command"] = list(spec.command)
        if spec.args:
            out["args"] = list(spec.args)
        return out
    return {
        "command": list(RUNTIME_COMMAND),
        "args": [
            "--workspace", spec.workspace.mount_path,
            "--state-dir", STATE_DIR,
            "--policy", POLICY_FILE,
            "--token-sha256-file", TOKEN_DIGEST_FILE,
            "--host", "0.0.0.0",  # all of the pod's own interfaces
            "--port", str(spec.runtime_port),
        ],
    }  # fmt: skip


def _resources(spec: SandboxTemplateSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"limits": {k: str(v) for k, v in spec.resources.limits.items()}}
    if spec.resources.requests:
        out["requests"] = {k: str(v) for k, v in spec.resources.requests.items()}
    return out


def _pod_spec(
    spec: SandboxTemplateSpec, extra_env: Sequence[EnvVar], claim_name: str | None
) -> dict[str, Any]:
    env = _runtime_env(spec)
    taken = {item["name"] for item in env}
    for var in [*spec.env, *extra_env]:  # the template's first: its names win
        if var.name not in taken:
            env.append({"name": var.name, "value": var.value})
            taken.add(var.name)
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": spec.image,
        **_command(spec),
        "workingDir": spec.workspace.mount_path,
        "env": env,
        "ports": [
            {"name": RUNTIME_PORT_NAME, "containerPort": spec.runtime_port, "protocol": "TCP"}
        ],
        "resources": _resources(spec),
        "readinessProbe": {
            "httpGet": {"path": "/healthz", "port": RUNTIME_PORT_NAME},
            "periodSeconds": 1,  # a warm pool refills as soon as the runtime answers
            "failureThreshold": 3,
        },
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": SANDBOX_UID,
            "runAsGroup": SANDBOX_UID,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "workspace", "mountPath": spec.workspace.mount_path},
            {"name": "state", "mountPath": STATE_DIR},
            {"name": "tmp", "mountPath": TMP_DIR},
            {"name": "policy", "mountPath": POLICY_DIR, "readOnly": True},
        ],
    }
    if claim_name is not None:
        container["volumeMounts"].append({"name": PERSIST_VOLUME, "mountPath": SNAPSHOT_DIR})
    pod: dict[str, Any] = {
        "runtimeClassName": spec.runtime_class_name,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,  # no other services' addresses in the agent's environment
        "restartPolicy": "Always",  # a crashed runtime restarts; emptyDirs keep the workspace
        "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": SANDBOX_UID,
            "runAsGroup": SANDBOX_UID,
            "fsGroup": SANDBOX_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "workspace", "emptyDir": {"sizeLimit": str(spec.workspace.size_limit)}},
            # Only the runtime writes here (audit log, skill registry); the agent cannot.
            {"name": "state", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {"sizeLimit": TMP_SIZE_LIMIT}},
            {
                "name": "policy",
                "downwardAPI": {
                    "defaultMode": 0o444,
                    "items": [
                        {
                            "path": path,
                            "fieldRef": {"fieldPath": f"metadata.annotations['{annotation}']"},
                        }
                        for path, annotation in (
                            ("policy.json", ANNOTATION_TOOL_POLICY),
                            ("token.sha256", ANNOTATION_TOKEN_SHA256),
                        )
                    ],
                },
            },
        ],
    }
    if claim_name is not None:
        pod["volumes"].append(
            {"name": PERSIST_VOLUME, "persistentVolumeClaim": {"claimName": claim_name}}
        )
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod["tolerations"] = [
            t.model_dump(by_alias=True, exclude_none=True) for t in spec.tolerations
        ]
    return pod


def template_hash(spec: SandboxTemplateSpec) -> str:
    """A stable hash of what the template's pods are built from (warm pools roll on it).

    It hashes the built pod spec and policy, not the template's fields: a change that does
    not change pods (egress, lifetime, the claim's size or class) does not roll the pool, and
    a change in how kleave builds pods (turning persistence on or off) does, as a
    Deployment's pod-template-hash behaves.
    """
    check_template(spec)
    canonical = json.dumps(
        {
            "spec": _pod_spec(spec, (), _HASHED_CLAIM if spec.persistence.enabled else None),
            "policy": policy_document(spec),
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:HASH_LENGTH]


@dataclass(frozen=True)
class PodOwner:
    """Who a new sandbox pod belongs to: a warm pool (unclaimed) or an AgentSandbox (cold)."""

    obj: Mapping[str, Any]
    pool: str | None = None
    sandbox: str | None = None


def build_pod(
    template: Mapping[str, Any],
    spec: SandboxTemplateSpec,
    owner: PodOwner,
    *,
    name: str,
    token: PodToken,
    claim_name: str | None = None,
    extra_env: Sequence[EnvVar] = (),
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """One sandbox pod of ``template``, named ``name``, mounting ``claim_name`` if given.

    ``token`` is the pod's runtime token nonce and digest (:mod:`sandbox_tokens`): the pod
    carries the digest only, projected into a file the runtime checks bearer tokens against.

    A pool's pod carries the pool label (its name is chosen by the caller, not generated by
    the API server, because its claim is named after it before it exists); a sandbox's own
    pod (cold start, resume) carries the sandbox label from the start.
    """
    if (owner.pool is None) == (owner.sandbox is None):
        raise ValueError("a sandbox pod belongs to exactly one of a warm pool or a sandbox")
    template_name = template["metadata"]["name"]
    labels = sandbox_labels(template_name, template_hash(spec))
    if owner.pool is not None:
        labels[LABEL_WARM_POOL] = owner.pool
    else:
        assert owner.sandbox is not None
        labels[LABEL_SANDBOX] = owner.sandbox
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": template["metadata"]["namespace"],
        "labels": labels,
        "annotations": {
            ANNOTATION_TOOL_POLICY: policy_document(spec),
            ANNOTATION_TOKEN_NONCE: token.nonce,
            ANNOTATION_TOKEN_SHA256: token.digest,
            **(annotations or {}),
        },
        "ownerReferences": [owner_reference(owner.obj)],
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": _pod_spec(spec, extra_env, claim_name),
    }


def pool_claim_name(pod: str) -> str:
    """The claim of a warm pool's pod: it moves to the sandbox that adopts the pod."""
    return f"{pod}-state"


def sandbox_claim_name(sandbox: str) -> str:
    """The claim of a sandbox that did not adopt a warm pod (cold start)."""
    return f"{sandbox}-state"


def token_secret_name(pod: str) -> str:
    return f"{pod}-runtime-token"


def build_token_secret(pod: Mapping[str, Any], token: str) -> dict[str, Any]:
    """The Secret holding a pod's runtime token for the sandbox's users, owned by the pod.

    Created with the pod (a warm pod's long before any claim), so a claim adds no write;
    it goes with the pod, and a resumed sandbox's new pod has its own.
    """
    meta = pod["metadata"]
    labels = {MANAGED_BY: MANAGER, LABEL_COMPONENT_APP: COMPONENT_SANDBOX}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kleave.dev/runtime-token",
        "metadata": {
            "name": token_secret_name(meta["name"]),
            "namespace": meta["namespace"],
            "labels": labels,
            "ownerReferences": [owner_reference(pod)],
        },
        "data": token_secret_data(token, meta["name"]),
    }


def token_secret_data(token: str, pod: str) -> dict[str, str]:
    return {
        "token": base64.b64encode(token.encode()).decode(),
        "pod": base64.b64encode(pod.encode()).decode(),
    }


def resume_pod_name(sandbox: str, generation: int) -> str:
    """A resumed sandbox's pod: one name per snapshot, so it never meets the paused pod."""
    return f"{sandbox}-r{generation}"


def build_state_claim(
    owner: Mapping[str, Any], name: str, template: str, persistence: Persistence
) -> dict[str, Any]:
    """The PersistentVolumeClaim a sandbox's snapshots go to, owned by ``owner``.

    A warm pod owns its claim until a sandbox adopts the pod; then the sandbox owns it, so
    pausing (deleting the pod) keeps it and deleting the sandbox deletes it.
    """
    meta = owner["metadata"]
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": str(persistence.size)}},
    }
    if persistence.storage_class_name:
        spec["storageClassName"] = persistence.storage_class_name
    labels = {
        MANAGED_BY: MANAGER,
        LABEL_COMPONENT_APP: COMPONENT_SANDBOX,
        LABEL_SANDBOX_TEMPLATE: template,
    }
    if owner.get("kind") == "AgentSandbox":
        labels[LABEL_SANDBOX] = meta["name"]
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": name,
            "namespace": meta["namespace"],
            "labels": labels,
            "ownerReferences": [owner_reference(owner)],
        },
        "spec": spec,
    }


# -- NetworkPolicies ------------------------------------------------------------------------


def _dns_rule() -> dict[str, Any]:
    return {
        "to": [
            {
                "namespaceSelector": {
                    "matchLabels": {"kubernetes.io/metadata.name": DNS_NAMESPACE}
                },
                "podSelector": {"matchLabels": dict(DNS_POD_LABELS)},
            }
        ],
        "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
    }


def network_policy_name(template: str) -> str:
    return f"{template}-sandbox"


@dataclass(frozen=True)
class EgressPlan:
    """The template's NetworkPolicy, and the allow-list entries it cannot express."""

    policy: dict[str, Any]
    unenforced_hosts: list[str]


def build_network_policy(template: Mapping[str, Any], spec: SandboxTemplateSpec) -> EgressPlan:
    """Ingress on the runtime port only; egress to DNS and the template's CIDR rules.

    A NetworkPolicy selects peers by address or label, never by DNS name, so ``host`` rules
    cannot be expressed: they are left out (the traffic stays denied: fail closed) and
    returned in ``unenforced_hosts`` for the template's status and an event.
    """
    meta = template["metadata"]
    egress: list[dict[str, Any]] = [_dns_rule()]
    hosts: list[str] = []
    for rule in spec.egress.allow:
        if rule.host is not None:
            ports = ", ".join(f"{p.port}/{p.protocol}" for p in rule.ports)
            hosts.append(f"{rule.host} ({ports})")
            continue
        entry: dict[str, Any] = {"to": [{"ipBlock": {"cidr": rule.cidr}}]}
        if rule.ports:
            entry["ports"] = [{"protocol": p.protocol, "port": p.port} for p in rule.ports]
        egress.append(entry)
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": network_policy_name(meta["name"]),
            "namespace": meta["namespace"],
            "labels": {
                MANAGED_BY: MANAGER,
                LABEL_COMPONENT_APP: COMPONENT_SANDBOX,
                LABEL_SANDBOX_TEMPLATE: meta["name"],
            },
            "ownerReferences": [owner_reference(template)],
        },
        "spec": {
            "podSelector": {
                "matchLabels": {MANAGED_BY: MANAGER, LABEL_SANDBOX_TEMPLATE: meta["name"]}
            },
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"ports": [{"protocol": "TCP", "port": spec.runtime_port}]}],
            "egress": egress,
        },
    }
    return EgressPlan(policy=policy, unenforced_hosts=hosts)


def build_baseline_network_policy(namespace: str) -> dict[str, Any]:
    """Every kleave sandbox pod of the namespace: no ingress, no egress but DNS.

    Owned by nothing on purpose: it must outlive any one template, since a sandbox whose
    template (and so template policy) is gone would otherwise have no egress rule at all.
    """
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": BASELINE_POLICY_NAME,
            "namespace": namespace,
            "labels": {MANAGED_BY: MANAGER, LABEL_COMPONENT_APP: COMPONENT_SANDBOX},
        },
        "spec": {
            "podSelector": {
                "matchLabels": {MANAGED_BY: MANAGER, LABEL_COMPONENT_APP: COMPONENT_SANDBOX}
            },
            "policyTypes": ["Ingress", "Egress"],
            "egress": [_dns_rule()],
        },
    }
