"""The dev cluster's one real-ish node: a kubelet that runs sandbox pods as local processes,
plus the ``kleave-local`` volume provisioner, in one asyncio process.

kwok's nodes accept pods and run nothing, which is right for scheduling and scale tests but
leaves the sandbox runtime untested end to end: pause (``POST /v1/snapshot``), resume and
idle detection need a process behind the pod IP. This node registers itself (without kwok's
annotation, so kwok leaves it and its pods alone; tainted, so only pods that ask land here),
keeps its Lease and Ready condition fresh so the node lifecycle controller never evicts its
pods, and hands each bound pod to a :class:`PodWorker`. It isolates nothing: dev only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import ipaddress
import logging
import platform
import shutil
import signal
import sys
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes import client, config

from kleave import __version__
from kleave.devcluster.informer import Informer
from kleave.devcluster.local_containers import kill_recorded
from kleave.devcluster.local_pod_worker import NodeContext, PodWorker
from kleave.devcluster.local_status import HOST_IP, now_rfc3339
from kleave.devcluster.local_volumes import VolumeProvisioner
from kleave.devcluster.versions import KUBERNETES_VERSION
from kleave.operator.kube import LEASE, NODE, POD, ApiError, KubeApi

log = logging.getLogger(__name__)

DEFAULT_NAME = "kleave-local-0"
DEFAULT_POD_CIDR = "127.77.0.0/24"
"""All of 127/8 is loopback on Linux: a process binds 127.77.0.x with no setup at all."""
POD_CIDR_POOL = "127.77.0.0/16"
"""Where ``dev-cluster up`` picks a /24 no other running local node uses: several dev clusters
on one host (parallel test sessions) would otherwise hand out the same pod IPs and ports."""
NODE_LABEL = "kleave.dev/local-node"
TAINT = {"key": NODE_LABEL, "value": "true", "effect": "NoSchedule"}
LEASE_NAMESPACE = "kube-node-lease"
LEASE_DURATION_S = 40
HEARTBEAT_S = 10.0
CAPACITY = {"cpu": "64", "memory": "256Gi", "pods": "250", "ephemeral-storage": "100Gi"}


@dataclass(frozen=True)
class LocalNodeConfig:
    name: str
    root: Path
    pod_cidr: str | None = None
    """None: the registered Node's podCIDR, else :data:`DEFAULT_POD_CIDR`."""


# ----- the Node and its Lease (pure) -------------------------------------------------------
def pick_pod_cidr(in_use: Collection[str]) -> str:
    """The first /24 of :data:`POD_CIDR_POOL` that no running local node uses."""
    for subnet in ipaddress.ip_network(POD_CIDR_POOL).subnets(new_prefix=24):
        if str(subnet) not in in_use:
            return str(subnet)
    raise RuntimeError(f"every /24 of {POD_CIDR_POOL} is used by a running local node")


def _arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def node_status(name: str, now: str, ready_since: str) -> dict[str, Any]:
    """What the kubelet reports: capacity, Ready with a fresh heartbeat, addresses, info."""

    def condition(kind: str, status: str, reason: str, message: str) -> dict[str, Any]:
        return {
            "type": kind,
            "status": status,
            "reason": reason,
            "message": message,
            "lastHeartbeatTime": now,
            "lastTransitionTime": ready_since,
        }

    return {
        "capacity": dict(CAPACITY),
        "allocatable": dict(CAPACITY),
        "conditions": [
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "no pressure"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "no pressure"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID", "no pressure"),
            condition("Ready", "True", "KubeletReady", "the kleave local node runs its pods"),
        ],
        "addresses": [
            {"type": "InternalIP", "address": HOST_IP},
            {"type": "Hostname", "address": name},
        ],
        "nodeInfo": {
            "machineID": "",
            "systemUUID": "",
            "bootID": "",
            "kernelVersion": platform.release(),
            "osImage": "kleave dev-cluster local node (no isolation)",
            "containerRuntimeVersion": f"kleave-local://{__version__}",
            "kubeletVersion": f"v{KUBERNETES_VERSION}",
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": _arch(),
        },
    }


def node_manifest(name: str, pod_cidr: str, now: str) -> dict[str, Any]:
    """The Node: no kwok annotation (kwok must not manage it), tainted, the pod range set."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": node_labels(name),
            "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {"taints": [dict(TAINT)], "podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
        "status": node_status(name, now, now),
    }


def node_labels(name: str) -> dict[str, str]:
    return {
        NODE_LABEL: "true",
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": _arch(),
        "type": "local",
    }


def registration_patch(existing: dict[str, Any], pod_cidr: str) -> dict[str, Any]:
    """Re-registering an existing Node: our labels and taint (others' taints kept, such as the
    lifecycle controller's not-ready one), kwok's annotation removed, podCIDR if unset."""
    name = existing["metadata"]["name"]
    spec = existing.get("spec", {})
    taints = [t for t in spec.get("taints") or [] if t.get("key") != TAINT["key"]]
    patch: dict[str, Any] = {
        "metadata": {
            "labels": node_labels(name),
            "annotations": {"kwok.x-k8s.io/node": None, "node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {"taints": [*taints, dict(TAINT)], "unschedulable": None},
    }
    current = spec.get("podCIDR")
    if current and current != pod_cidr:
        raise RuntimeError(
            f"node {name} already has podCIDR {current} (immutable), not {pod_cidr}: delete the "
            "node or pass --pod-cidr " + current
        )
    if not current:
        patch["spec"] |= {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]}
    return patch


def lease_manifest(node: dict[str, Any], renew_time: str) -> dict[str, Any]:
    """The node's heartbeat Lease, owned by the Node as a kubelet's is."""
    name = node["metadata"]["name"]
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": name,
            "namespace": LEASE_NAMESPACE,
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "Node", "name": name, "uid": node["metadata"]["uid"]}
            ],
        },
        "spec": {
            "holderIdentity": name,
            "leaseDurationSeconds": LEASE_DURATION_S,
            "renewTime": renew_time,
        },
    }


def micro_time() -> str:
    """A Lease's renewTime is a MicroTime."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ----- the node ----------------------------------------------------------------------------
class LocalNode:
    """Registers the node, keeps it alive, and runs the pods bound to it."""

    def __init__(self, api: KubeApi, cfg: LocalNodeConfig) -> None:
        self.api = api
        self.cfg = cfg
        self.ctx = NodeContext(api, cfg.name, cfg.root, cfg.pod_cidr or DEFAULT_POD_CIDR)
        self.workers: dict[str, PodWorker] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.finished: set[str] = set()
        """Uids whose worker deleted them: a late event must not start them again."""
        self.ready_since = now_rfc3339()
        self.node: dict[str, Any] = {}

    async def run(self, stop: asyncio.Event) -> None:
        root = self.cfg.root
        root.mkdir(parents=True, exist_ok=True)
        earlier = await asyncio.to_thread(kill_recorded, root)
        if earlier:
            log.info("stopped %d processes of an earlier run: %s", len(earlier), earlier)
        await self.register()
        provisioner = VolumeProvisioner(self.api, root)
        await provisioner.ensure_storage_class()
        pods = Informer(
            self.api, POD, self._on_pod, field_selector=f"spec.nodeName={self.cfg.name}"
        )
        background = [
            asyncio.create_task(self._heartbeat(), name="heartbeat"),
            asyncio.create_task(pods.run(), name="pod informer"),
            *(asyncio.create_task(i.run(), name=i.rt.plural) for i in provisioner.informers()),
            asyncio.create_task(self._collect_orphans(pods), name="orphans"),
        ]
        log.info("node %s registered (pods on %s, root %s)", self.cfg.name, self.ctx.pod_cidr, root)
        try:
            await stop.wait()
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self._stop_pods()
            await self.api.close()
        log.info("node %s stopped; its pods stay in the API", self.cfg.name)

    async def register(self) -> None:
        name = self.cfg.name
        existing = await self.api.get(NODE, None, name)
        if self.cfg.pod_cidr is None and existing is not None:
            self.ctx.pod_cidr = existing.get("spec", {}).get("podCIDR") or DEFAULT_POD_CIDR
        if existing is None:
            manifest = node_manifest(name, self.ctx.pod_cidr, self.ready_since)
            try:
                self.node = await self.api.create(NODE, None, manifest)
            except ApiError as error:
                if not error.conflict:
                    raise
                existing = await self.api.get(NODE, None, name)
        if existing is not None:
            patch = registration_patch(existing, self.ctx.pod_cidr)
            self.node = await self.api.merge_patch(NODE, None, name, patch)
        await self._report()

    async def _report(self) -> None:
        """Node status and Lease: the two heartbeats the node lifecycle controller reads."""
        name = self.cfg.name
        status = node_status(name, now_rfc3339(), self.ready_since)
        try:
            await self.api.patch_status(NODE, None, name, status)
        except ApiError as error:
            if not error.not_found:
                raise
            log.warning("node %s was deleted; registering it again", name)
            await self.register()
            return
        lease = lease_manifest(self.node, micro_time())
        try:
            await self.api.merge_patch(LEASE, LEASE_NAMESPACE, name, {"spec": lease["spec"]})
        except ApiError as error:
            if not error.not_found:
                raise
            await self.api.create(LEASE, LEASE_NAMESPACE, lease)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await self._report()
            except (ApiError, aiohttp.ClientError, TimeoutError) as error:
                log.warning("heartbeat failed: %s", error)

    async def _on_pod(self, kind: str, pod: dict[str, Any]) -> None:
        uid = str(pod["metadata"]["uid"])
        worker = self.workers.get(uid)
        if kind == "DELETED":
            self.finished.discard(uid)
            if worker is not None:
                worker.vanish()
            return
        if pod.get("spec", {}).get("nodeName") != self.cfg.name or uid in self.finished:
            return
        if worker is not None:
            worker.update(pod)
            return
        worker = PodWorker(self.ctx, pod)
        self.workers[uid] = worker
        self.tasks[uid] = asyncio.create_task(self._run_worker(worker), name=f"pod {worker.key}")

    async def _run_worker(self, worker: PodWorker) -> None:
        try:
            await worker.run()
        except Exception:
            log.exception("pod %s: worker failed", worker.key)
        finally:
            self.workers.pop(worker.uid, None)
            self.tasks.pop(worker.uid, None)
            if not worker.gone:
                self.finished.add(worker.uid)

    async def _collect_orphans(self, pods: Informer) -> None:
        """After the first list: directories of pods that no longer exist go."""
        await pods.synced.wait()
        pod_dirs = self.cfg.root / "pods"
        for directory in pod_dirs.iterdir() if pod_dirs.is_dir() else []:
            if directory.name not in pods.known:
                await asyncio.to_thread(shutil.rmtree, directory, True)

    async def _stop_pods(self) -> None:
        for worker in list(self.workers.values()):
            worker.stop_for_node_shutdown()
        tasks = list(self.tasks.values())
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=30)
            for task in pending:
                task.cancel()


# ----- the process -------------------------------------------------------------------------
def api_from_kubeconfig(path: Path) -> KubeApi:
    configuration = client.Configuration()
    config.load_kube_config(config_file=str(path), client_configuration=configuration)  # type: ignore[no-untyped-call]
    return KubeApi(configuration)


async def _main(kubeconfig: Path, cfg: LocalNodeConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await LocalNode(api_from_kubeconfig(kubeconfig), cfg).run(stop)


def run(kubeconfig: Path, cfg: LocalNodeConfig) -> None:
    """Run the node until SIGTERM/SIGINT; its pods' processes stop with it."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
        force=True,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(kubeconfig, dataclasses.replace(cfg, root=cfg.root.resolve())))
