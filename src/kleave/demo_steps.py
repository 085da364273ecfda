"""The demo's sandbox and data-plane steps: real runtimes and real tokens, on this machine.

The sandbox runs on the dev cluster's local node (its runtime is a local process on
127.77.0.x), so the demo can write a file, pause the sandbox, resume it and read the file back
through the SDK; the data plane is ``kleave workers up`` (router, prefill and decode as local
processes) answering an OpenAI completion request.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from kleave.devcluster.cluster import DevCluster
from kleave.devcluster.errors import DevClusterError
from kleave.devcluster.processes import free_ports, is_alive

NAMESPACE = "demo-sandboxes"
WORKERS = "workers"
Kubectl = Callable[..., str]
Say = Callable[[str], None]

SANDBOX_MANIFESTS = f"""
apiVersion: v1
kind: Namespace
metadata: {{name: {NAMESPACE}}}
---
apiVersion: node.k8s.io/v1
kind: RuntimeClass
metadata: {{name: kleave-microvm}}
handler: kata-fc   # the local node runs pods as plain processes and ignores it (dev only)
---
apiVersion: kleave.dev/v1alpha1
kind: SandboxTemplate
metadata: {{name: demo-coder, namespace: {NAMESPACE}}}
spec:
  image: kleave/kleave:0.1.0
  runtimePort: 18080
  resources:
    limits: {{cpu: 500m, memory: 256Mi}}
  tools: {{allowedCommands: [ls, cat, wc]}}
  persistence: {{size: 64Mi}}
  nodeSelector: {{kleave.dev/local-node: "true"}}
  tolerations:
    - {{key: kleave.dev/local-node, operator: Exists, effect: NoSchedule}}
---
apiVersion: kleave.dev/v1alpha1
kind: SandboxWarmPool
metadata: {{name: demo-coder, namespace: {NAMESPACE}}}
spec: {{templateRef: {{name: demo-coder}}, replicas: 2}}
"""
AGENT_MANIFEST = f"""
apiVersion: kleave.dev/v1alpha1
kind: AgentSandbox
metadata: {{name: demo-agent, namespace: {NAMESPACE}}}
spec: {{warmPoolRef: {{name: demo-coder}}}}
"""


def show_sandbox(kubectl: Kubectl, kubeconfig: Path, say: Say) -> None:
    """Claim a warm sandbox, use it, pause it, resume it, and show the file survived."""
    from kleave.sandbox.client import SandboxClient

    kubectl("apply", "-f", "-", stdin=SANDBOX_MANIFESTS)
    kubectl("wait", "--for=jsonpath={.status.readyReplicas}=2", "sbxwp/demo-coder",
            "-n", NAMESPACE, "--timeout=120s")  # fmt: skip
    kubectl("apply", "-f", "-", stdin=AGENT_MANIFEST)
    phase = "jsonpath={.status.phase}"
    kubectl("wait", f"--for={phase}=Ready", "asbx/demo-agent", "-n", NAMESPACE, "--timeout=120s")
    with SandboxClient(namespace=NAMESPACE, kubeconfig=str(kubeconfig)) as client:
        sandbox = client.get("demo-agent")
        claim = sandbox.status.get("claim") or {}
        say(f"  demo-agent: {claim.get('source')} claim in {claim.get('latencyMs')} ms")
        sandbox.write_file("notes/plan.md", "1. survive a pause\n")
        say(f"  exec ls notes -> {sandbox.exec(['ls', 'notes']).stdout.strip()}")
        kubectl(
            "patch", "asbx", "demo-agent", "-n", NAMESPACE, "--type=merge",
            "-p", '{"spec": {"mode": "Paused"}}',
        )  # fmt: skip
        kubectl("wait", f"--for={phase}=Paused", "asbx/demo-agent", "-n", NAMESPACE,
                "--timeout=120s")  # fmt: skip
        kubectl("get", "asbx", "-n", NAMESPACE)
        sandbox.resume()
        text = sandbox.read_file("notes/plan.md").decode()
        verified = sandbox.verify_audit()
        claim = sandbox.status.get("claim") or {}
        say(
            f"  resumed into {sandbox.status.get('podName')} in {claim.get('latencyMs')} ms; "
            f"notes/plan.md: {text.strip()!r}; audit log verified: {verified.get('ok')}"
        )
    kubectl("get", "asbx", "-n", NAMESPACE, "-o", "wide")


def show_workers(cluster: DevCluster, say: Say) -> str:
    """Start the PD data plane (tiny model) once, send it one completion; its router URL."""
    state = cluster.load_state()
    assert state is not None
    running = [c for c in state.components if c.name == WORKERS and is_alive(c.pid)]
    if running:
        port = int(running[-1].argv[running[-1].argv.index("--port") + 1])
    else:
        [port] = free_ports(1)
        argv = [
            sys.executable, "-m", "kleave", "workers", "up", "--topology", "PD",
            "--model", "tiny", "--port", str(port),
            "--state-dir", str(cluster.state_dir / "workers"),
        ]  # fmt: skip
        say(f"$ kleave workers up --topology PD --model tiny --port {port}")
        cluster.register(WORKERS, argv, cluster.state_dir / "logs" / "workers.log")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise DevClusterError(
                f"the workers' router did not become ready in 120s (log: "
                f"{cluster.state_dir / 'logs' / 'workers.log'})"
            )
        time.sleep(0.5)
    request = {"model": "tiny", "prompt": "Hello, kleave", "max_tokens": 16}
    say(f"$ curl {url}/v1/completions -d '{json.dumps(request)}'")
    answer = httpx.post(f"{url}/v1/completions", json=request, timeout=60).json()
    usage = answer.get("usage") or {}
    say(
        f"  {usage.get('completion_tokens')} tokens from prefill -> KV transfer -> decode "
        f"(random weights, so the text is noise): {answer['choices'][0]['text']!r}"
    )
    return url
