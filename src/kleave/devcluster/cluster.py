"""The local control plane: `up` builds what is missing, starts etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, kwok and the local node (which runs sandbox pods as
processes and provisions volumes) on 127.0.0.1, writes a kubeconfig and creates fake GPU nodes;
`down` stops every process, the local node's pod processes too, and removes the state
directory."""

from __future__ import annotations

import json
import shutil
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from kleave.devcluster import kubeconfig, pki, processes
from kleave.devcluster.build import Builder, Progress
from kleave.devcluster.errors import DevClusterError, PortInUseError, StaleStateError, StartupError
from kleave.devcluster.local_node import DEFAULT_NAME as LOCAL_NODE_NAME
from kleave.devcluster.local_node import pick_pod_cidr
from kleave.devcluster.local_volumes import STORAGE_CLASS_NAME
from kleave.devcluster.nodes import (
    DEFAULT_NODE_GROUPS,
    NodeGroup,
    node_manifests,
    parse_node_groups,
)
from kleave.devcluster.paths import Binaries, cache_dir, default_state_dir

STATE_FILE = "state.json"
MARKER_FILE = ".kleave-dev-cluster"
_PORT_NAMES = ("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kwok")


@dataclass
class Component:
    """One running process of the cluster, as recorded in the state file."""

    name: str
    pid: int
    argv: list[str]
    log: str


@dataclass
class ClusterState:
    """What `up` recorded: enough for `status` and `down` to work from another process."""

    server: str
    kubeconfig: str
    ports: dict[str, int]
    phase: str = "Starting"
    nodes: list[str] = field(default_factory=list)
    components: list[Component] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> ClusterState:
        data = json.loads(path.read_text())
        data["components"] = [Component(**c) for c in data.get("components", [])]
        return cls(**data)

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(path)


@dataclass
class ComponentStatus:
    name: str
    pid: int
    alive: bool
    log: str


@dataclass
class ClusterStatus:
    """A snapshot for `kleave dev-cluster status`."""

    state_dir: Path
    state: ClusterState | None
    components: list[ComponentStatus]
    apiserver_ready: bool
    nodes_ready: int
    nodes_total: int

    @property
    def running(self) -> bool:
        return (
            bool(self.components) and all(c.alive for c in self.components) and self.apiserver_ready
        )


class DevCluster:
    """A local cluster whose files all live under `state_dir` and whose binaries are cached."""

    def __init__(
        self,
        state_dir: Path | None = None,
        cache: Path | None = None,
        progress: Progress = print,
    ) -> None:
        self.state_dir = (state_dir or default_state_dir()).resolve()
        self.binaries = Binaries((cache or cache_dir()).resolve())
        self.progress = progress

    # ----- paths -------------------------------------------------------------------------
    @property
    def kubeconfig_path(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def local_node_root(self) -> Path:
        """The local node's pods' volumes and logs, and the provisioned volumes."""
        return self.state_dir / "local-node"

    @property
    def _state_path(self) -> Path:
        return self.state_dir / STATE_FILE

    @property
    def _marker(self) -> str:
        # Every process's argv names a file inside the state dir, so this finds them all.
        return f"{self.state_dir}/"

    def load_state(self) -> ClusterState | None:
        return ClusterState.load(self._state_path) if self._state_path.exists() else None

    # ----- up ----------------------------------------------------------------------------
    def up(
        self,
        node_groups: list[NodeGroup] | None = None,
        apiserver_port: int = 0,
        timeout: float = 120.0,
    ) -> ClusterState:
        """Start the cluster, or return the running one (idempotent)."""
        running = self._prepare_state_dir()
        if running is not None:
            self.progress(f"==> dev cluster already running at {running.server}")
            return running
        groups = node_groups if node_groups is not None else parse_node_groups(DEFAULT_NODE_GROUPS)
        ports = self._allocate_ports(apiserver_port)
        Builder(self.binaries, self.progress).ensure()
        state = ClusterState(
            server=f"https://127.0.0.1:{ports['apiserver']}",
            kubeconfig=str(self.kubeconfig_path),
            ports=ports,
        )
        try:
            self._start_all(state, groups, timeout)
        except BaseException:
            self._abort()
            raise
        return state

    def _prepare_state_dir(self) -> ClusterState | None:
        """Return the running cluster, make a fresh dir, or explain what is stale."""
        hint = self._down_hint()
        foreign = self.state_dir.exists() and not (self.state_dir / MARKER_FILE).exists()
        if foreign and any(self.state_dir.iterdir()):
            raise DevClusterError(
                f"{self.state_dir} is not empty and is not a kleave dev-cluster state directory: "
                "choose another --state-dir or empty it"
            )
        state = self.load_state()
        if state is None:
            strays = processes.processes_mentioning(self._marker)
            if strays:
                raise StaleStateError(
                    f"processes of an earlier dev cluster in {self.state_dir} are still running "
                    f"(pids {', '.join(map(str, strays))}): run `{hint}`, then retry"
                )
            shutil.rmtree(self.state_dir, ignore_errors=True)
            self.state_dir.mkdir(parents=True)
            (self.state_dir / MARKER_FILE).write_text(
                "kleave dev-cluster state; `kleave dev-cluster down` removes it\n"
            )
            return None
        dead = [c.name for c in state.components if not processes.is_alive(c.pid)]
        if state.phase == "Running" and not dead and self._apiserver_ready(state):
            return state
        what = (
            f"{', '.join(dead)} not running"
            if dead
            else f"phase {state.phase}, API server not ready"
        )
        raise StaleStateError(
            f"stale dev-cluster state in {self.state_dir} ({what}): run `{hint}` to clean up, "
            "then `kleave dev-cluster up`"
        )

    def _down_hint(self) -> str:
        default = self.state_dir == default_state_dir().resolve()
        return "kleave dev-cluster down" + ("" if default else f" --state-dir {self.state_dir}")

    def _allocate_ports(self, apiserver_port: int) -> dict[str, int]:
        if apiserver_port and not processes.port_is_free(apiserver_port):
            raise PortInUseError(
                f"port {apiserver_port} on 127.0.0.1 is in use by another process: stop it or pick "
                "another with --apiserver-port (0 picks a free one)"
            )
        free = iter(processes.free_ports(len(_PORT_NAMES)))
        ports = {name: next(free) for name in _PORT_NAMES}
        if apiserver_port:
            ports["apiserver"] = apiserver_port
        return ports

    def _start_all(self, state: ClusterState, groups: list[NodeGroup], timeout: float) -> None:
        state.save(self._state_path)
        creds = pki.generate(self.state_dir / "pki")
        ca_pem = creds.ca_cert.read_bytes()
        configs = {
            client: kubeconfig.write(
                self.state_dir / ("kubeconfig" if client == "admin" else f"{client}.kubeconfig"),
                kubeconfig.render(
                    state.server, ca_pem, creds.token(client), pki.CLIENT_IDENTITIES[client][0]
                ),
            )
            for client in pki.CLIENT_IDENTITIES
        }
        p = state.ports
        b = self.binaries
        etcd_url = f"http://127.0.0.1:{p['etcd']}"
        peer_url = f"http://127.0.0.1:{p['etcd-peer']}"
        self._launch(
            state,
            "etcd",
            [
                str(b.etcd),
                "--name=default",
                f"--data-dir={self.state_dir}/etcd",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=default={peer_url}",
                "--unsafe-no-fsync",
                "--quota-backend-bytes=4294967296",
            ],
            lambda client: client.get(f"{etcd_url}/health").json().get("health") == "true",
            timeout,
        )
        self._launch(
            state,
            "kube-apiserver",
            [
                str(b.kube_apiserver),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={p['apiserver']}",
                f"--cert-dir={self.state_dir}/apiserver",
                f"--tls-cert-file={creds.serving_cert}",
                f"--tls-private-key-file={creds.serving_key}",
                f"--client-ca-file={creds.ca_cert}",
                f"--token-auth-file={creds.token_file}",
                "--authorization-mode=RBAC",
                "--anonymous-auth=true",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={creds.service_account_pub}",
                f"--service-account-signing-key-file={creds.service_account_key}",
                f"--service-cluster-ip-range={pki.SERVICE_CLUSTER_IP_RANGE}",
                "--allow-privileged=true",
                "--endpoint-reconciler-type=none",
                "--profiling=false",
            ],
            lambda _client: self._apiserver_ready(state),
            timeout,
        )
        component_flags = [
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            "--profiling=false",
        ]
        cm_config = configs["controller-manager"]
        self._launch(
            state,
            "kube-controller-manager",
            [
                str(b.kube_controller_manager),
                f"--kubeconfig={cm_config}",
                f"--authentication-kubeconfig={cm_config}",
                f"--authorization-kubeconfig={cm_config}",
                *component_flags,
                f"--secure-port={p['controller-manager']}",
                f"--cert-dir={self.state_dir}/controller-manager",
                f"--service-account-private-key-file={creds.service_account_key}",
                f"--root-ca-file={creds.ca_cert}",
                "--use-service-account-credentials=true",
                f"--cluster-signing-cert-file={creds.ca_cert}",
                f"--cluster-signing-key-file={creds.directory / 'ca.key'}",
            ],
            _answers_ok(f"https://127.0.0.1:{p['controller-manager']}/healthz"),
            timeout,
        )
        sched_config = configs["scheduler"]
        self._launch(
            state,
            "kube-scheduler",
            [
                str(b.kube_scheduler),
                f"--kubeconfig={sched_config}",
                f"--authentication-kubeconfig={sched_config}",
                f"--authorization-kubeconfig={sched_config}",
                *component_flags,
                f"--secure-port={p['scheduler']}",
                f"--cert-dir={self.state_dir}/scheduler",
            ],
            _answers_ok(f"https://127.0.0.1:{p['scheduler']}/healthz"),
            timeout,
        )
        stage_flags = [f"--config={stage}" for stage in sorted(b.kwok_stages.glob("*.yaml"))]
        self._launch(
            state,
            "kwok",
            [
                str(b.kwok),
                f"--kubeconfig={configs['kwok']}",
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                "--node-lease-duration-seconds=40",
                "--node-ip=127.0.0.1",
                f"--cidr={pki.POD_CIDR}",
                f"--server-address=127.0.0.1:{p['kwok']}",
                *stage_flags,
            ],
            _answers_ok(f"http://127.0.0.1:{p['kwok']}/healthz"),
            timeout,
        )
        self._launch(
            state,
            "local-node",
            [
                sys.executable,
                "-m",
                "kleave",
                "dev-cluster",
                "local-node",
                f"--kubeconfig={configs['local-node']}",
                f"--name={LOCAL_NODE_NAME}",
                f"--root={self.local_node_root}",
                f"--pod-cidr={pick_pod_cidr(_local_pod_cidrs_in_use())}",
            ],
            lambda _client: self._local_node_ready(state),
            timeout,
        )
        self.progress(f"==> creating {sum(g.count for g in groups)} fake nodes")
        state.nodes = [*_create_nodes(self.kubeconfig_path, groups, timeout), LOCAL_NODE_NAME]
        state.phase = "Running"
        state.save(self._state_path)
        self.progress(f"==> dev cluster up at {state.server}")

    def _launch(
        self,
        state: ClusterState,
        name: str,
        argv: list[str],
        healthy: Callable[[httpx.Client], bool],
        timeout: float,
    ) -> None:
        """Start one component, record it at once (so `down` finds it), wait until healthy."""
        log = self.state_dir / "logs" / f"{name}.log"
        self.progress(f"    starting {name} (log: {log})")
        pid = processes.start(argv, log)
        state.components.append(Component(name=name, pid=pid, argv=argv, log=str(log)))
        state.save(self._state_path)
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0, verify=False) as client:
            while True:
                if not processes.is_alive(pid):
                    raise _exit_error(name, log)
                try:
                    if healthy(client):
                        return
                except (httpx.HTTPError, ValueError):
                    pass
                if time.monotonic() > deadline:
                    raise StartupError(
                        f"{name} did not become healthy within {timeout:.0f}s (log: {log})"
                    )
                time.sleep(0.25)

    def _apiserver_ready(self, state: ClusterState) -> bool:
        token = pki.Pki(self.state_dir / "pki").token("admin")
        try:
            response = httpx.get(
                f"{state.server}/readyz",
                headers={"Authorization": f"Bearer {token}"},
                verify=ssl.create_default_context(cafile=str(self.state_dir / "pki" / "ca.crt")),
                timeout=2.0,
            )
        except (httpx.HTTPError, OSError):
            return False
        return response.status_code == 200

    def _local_node_ready(self, state: ClusterState) -> bool:
        """The local node is up once its Node is Ready and its StorageClass exists."""
        token = pki.Pki(self.state_dir / "pki").token("admin")
        verify = ssl.create_default_context(cafile=str(self.state_dir / "pki" / "ca.crt"))
        with httpx.Client(
            base_url=state.server,
            headers={"Authorization": f"Bearer {token}"},
            verify=verify,
            timeout=2.0,
        ) as client:
            node = client.get(f"/api/v1/nodes/{LOCAL_NODE_NAME}")
            storage = client.get(f"/apis/storage.k8s.io/v1/storageclasses/{STORAGE_CLASS_NAME}")
        if node.status_code != 200 or storage.status_code != 200:
            return False
        conditions = node.json().get("status", {}).get("conditions") or []
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def _abort(self) -> None:
        """A failed start leaves no process behind; logs stay for the error message."""
        state = self.load_state()
        pids = [c.pid for c in state.components] if state else []
        processes.stop(pids + processes.processes_mentioning(self._marker))
        self._state_path.unlink(missing_ok=True)

    # ----- status and down ---------------------------------------------------------------
    def status(self) -> ClusterStatus:
        state = self.load_state()
        components = [
            ComponentStatus(c.name, c.pid, processes.is_alive(c.pid), c.log)
            for c in (state.components if state else [])
        ]
        ready = state is not None and self._apiserver_ready(state)
        nodes_ready = nodes_total = 0
        if ready:
            nodes_ready, nodes_total = _node_readiness(self.kubeconfig_path)
        return ClusterStatus(self.state_dir, state, components, ready, nodes_ready, nodes_total)

    def down(self) -> int:
        """Stop every process of this cluster and remove its state dir; return how many stopped."""
        if not self.state_dir.exists():
            return 0
        if not (self.state_dir / MARKER_FILE).exists():
            raise DevClusterError(
                f"{self.state_dir} is not a kleave dev-cluster state directory; not touching it"
            )
        state = self.load_state()
        # Reverse start order: kwok and the controllers go before the API server and etcd.
        recorded = [c.pid for c in reversed(state.components)] if state else []
        pids = list(dict.fromkeys(recorded + processes.processes_mentioning(self._marker)))
        alive = [pid for pid in pids if processes.is_alive(pid)]
        processes.stop(alive)
        left = processes.processes_mentioning(self._marker)
        if left:
            raise DevClusterError(
                f"could not stop pids {', '.join(map(str, left))}; kill them and retry"
            )
        shutil.rmtree(self.state_dir)
        return len(alive)

    def register(self, name: str, argv: list[str], log: Path) -> int:
        """Start an extra process (the demo's operator) that `down` stops with the cluster."""
        state = self.load_state()
        if state is None:
            raise DevClusterError(
                f"no dev cluster in {self.state_dir}: run `kleave dev-cluster up` first"
            )
        pid = processes.start(argv, log)
        state.components.append(Component(name=name, pid=pid, argv=argv, log=str(log)))
        state.save(self._state_path)
        return pid


def _exit_error(name: str, log: Path) -> DevClusterError:
    tail = processes.log_tail(log)
    if any("address already in use" in line for line in tail):
        return PortInUseError(
            f"{name} could not bind its port (address already in use; another process took it): "
            f"retry `kleave dev-cluster up`, or free the port (log: {log})"
        )
    last = tail[-1][:300] if tail else "(no output)"
    return StartupError(f"{name} exited during start-up: {last} (log: {log})")


def _local_pod_cidrs_in_use() -> set[str]:
    """The pod ranges of every local node running on this host (any cluster's)."""
    used = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            argv = processes.cmdline(int(entry.name))
            if "local-node" in argv:
                used |= {arg.partition("=")[2] for arg in argv if arg.startswith("--pod-cidr=")}
    return used


def _answers_ok(url: str) -> Callable[[httpx.Client], bool]:
    """A health check: HTTP 200 from `url` (the client skips TLS verification: the
    controller-manager and scheduler serve self-signed certs, and "ok" is all we need)."""
    return lambda client: client.get(url).status_code == 200


def _api_client(kubeconfig_path: Path) -> Any:
    from kubernetes import config

    return config.new_client_from_config(config_file=str(kubeconfig_path))  # type: ignore[no-untyped-call]


def _create_nodes(kubeconfig_path: Path, groups: list[NodeGroup], timeout: float) -> list[str]:
    """Create the fake nodes, then wait until kwok reports them Ready and `default` SA exists."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    with _api_client(kubeconfig_path) as api_client:
        core = client.CoreV1Api(api_client)
        names = []
        for manifest in node_manifests(groups):
            try:
                core.create_node(manifest)  # type: ignore[arg-type]  # the client takes dicts
            except ApiException as error:
                if error.status != 409:
                    raise
            names.append(manifest["metadata"]["name"])
        deadline = time.monotonic() + timeout
        while True:
            ready = {n.metadata.name for n in core.list_node().items if n.metadata and _is_ready(n)}
            # Pods are refused until the controller-manager has made the `default` account.
            accounts = core.list_namespaced_service_account("default").items
            sa_ok = any(sa.metadata and sa.metadata.name == "default" for sa in accounts)
            if ready >= set(names) and sa_ok:
                return names
            if time.monotonic() > deadline:
                missing = sorted(set(names) - ready)
                raise StartupError(
                    f"nodes not Ready within {timeout:.0f}s: "
                    + (", ".join(missing[:5]) or "default ServiceAccount missing")
                )
            time.sleep(0.25)


def _is_ready(node: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in (node.status.conditions or []))


def _node_readiness(kubeconfig_path: Path) -> tuple[int, int]:
    from kubernetes import client

    with _api_client(kubeconfig_path) as api_client:
        nodes = client.CoreV1Api(api_client).list_node().items
    return sum(1 for n in nodes if _is_ready(n)), len(nodes)
