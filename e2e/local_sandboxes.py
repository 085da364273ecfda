"""Sandboxes that really run: the dev cluster's local node, a namespace, and an operator.

Shared by the e2e modules whose sandbox pods run on ``kleave-local-0`` (the dev cluster's
kubelet that starts ``kleave sandbox runtime`` as a local process on 127.77.0.x), so their
runtimes answer at ``status.endpoint`` from the test process.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from conftest import Cluster, wait_for
from kleave.api.registry import render_crds
from test_e2e_operator import Operator

RUNTIME_CLASS = "kleave-microvm"
LOCAL_NODE = "kleave-local-0"
PORT = 18080


def local_template_manifest(
    name: str, namespace: str, *, idle_seconds: int = 0, commands: tuple[str, ...] = ("ls", "cat")
) -> str:
    """A template whose pods land on the local node, with persistence (kleave-local claims)."""
    return f"""
apiVersion: kleave.dev/v1alpha1
kind: SandboxTemplate
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  image: kleave/kleave:0.1.0
  runtimePort: {PORT}
  resources:
    limits: {{cpu: 500m, memory: 256Mi}}
  tools: {{allowedCommands: [{", ".join(commands)}]}}
  lifetime: {{idleTimeoutSeconds: {idle_seconds}, maxLifetimeSeconds: 3600}}
  persistence: {{enabled: true, size: 64Mi}}
  nodeSelector: {{kleave.dev/local-node: "true"}}
  tolerations:
    - {{key: kleave.dev/local-node, operator: Exists, effect: NoSchedule}}
"""


@contextlib.contextmanager
def local_sandbox_namespace(cluster: Cluster, namespace: str, log_dir: Path) -> Iterator[None]:
    """CRDs, the RuntimeClass, the local node Ready, the namespace and a running operator;
    every sandbox and the namespace are gone afterwards."""
    documents = "".join(f"---\n{text}" for text in render_crds().values())
    cluster.kubectl("apply", "--server-side", "--field-manager=kleave", "-f", "-", stdin=documents)
    cluster.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
    if cluster.kubectl("get", "runtimeclass", RUNTIME_CLASS, check=False).returncode:
        runtime_class = {
            "apiVersion": "node.k8s.io/v1",
            "kind": "RuntimeClass",
            "metadata": {"name": RUNTIME_CLASS},
            "handler": "kata-fc",
        }
        cluster.kubectl("create", "-f", "-", stdin=json.dumps(runtime_class), check=False)
    cluster.kubectl("wait", "--for=condition=Ready", f"node/{LOCAL_NODE}", "--timeout=60s")
    cluster.kubectl("create", "namespace", namespace)
    wait_for(
        lambda: (
            cluster.kubectl("get", "sa", "default", "-n", namespace, check=False).returncode == 0
        ),
        30,
        "default ServiceAccount",
    )
    operator = Operator(cluster, log_dir)
    operator.start()
    try:
        yield
    finally:
        cluster.kubectl("delete", "asbx", "--all", "-n", namespace, "--wait=true", check=False)
        operator.stop()
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        wait_for(
            lambda: cluster.kubectl("get", "ns", namespace, check=False).returncode != 0,
            120,
            f"{namespace} deleted",
        )
