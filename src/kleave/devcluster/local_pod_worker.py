"""One pod on the local node, from binding to deletion, as a kubelet's pod worker runs it.

The worker prepares the pod's volumes (waiting for its claims to bind), starts each container
as a :class:`ContainerRunner`, reports status through ``/status`` whenever what it would write
changes, and on deletion stops the processes within the grace period, removes the pod's
directories and deletes the pod for good (grace 0, uid precondition), which is the kubelet's
last word on a pod. A pod it cannot run ends Failed with a reason instead of half-starting.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from kleave.devcluster.local_containers import ContainerRunner
from kleave.devcluster.local_pod_volumes import PodVolumes, link_nested
from kleave.devcluster.local_pods import (
    UNSUPPORTED_POD,
    Launch,
    Mount,
    UnsupportedPodError,
    allocate_ip,
    container_launch,
    listening_ips,
    mounts_of,
    nested_links,
    plan_volumes,
)
from kleave.devcluster.local_status import (
    HOST_IP,
    ContainerView,
    ReadinessCheck,
    now_rfc3339,
    pod_status,
    readiness_check,
    rejected_status,
)
from kleave.operator.kube import (
    POD,
    ApiError,
    KubeApi,
)

log = logging.getLogger(__name__)

_API_ERRORS = (ApiError, aiohttp.ClientError, TimeoutError)
NODE_STOP_GRACE_S = 10.0
"""A stopping node gives each container at most this long (its pods stay in the API)."""


def _base_env() -> dict[str, str]:
    keep = ("PATH", "LANG", "LC_ALL", "TZ", "TMPDIR")
    return {key: os.environ[key] for key in keep if key in os.environ}


@dataclass
class NodeContext:
    """What every pod worker of one node shares: the API, the layout and the pod IPs."""

    api: KubeApi
    name: str
    root: Path
    pod_cidr: str
    python: str = sys.executable
    base_env: dict[str, str] = field(default_factory=_base_env)
    ips: dict[str, str] = field(default_factory=dict)
    last_ip: str | None = None

    def allocate_ip(self, uid: str, preferred: str | None) -> str:
        """The pod's IP: kept across node restarts when still free, else the next free one."""
        if uid in self.ips:
            return self.ips[uid]
        taken = set(self.ips.values()) | _host_listening()
        if preferred and preferred not in taken and _in(preferred, self.pod_cidr):
            ip = preferred
        else:
            ip = allocate_ip(self.pod_cidr, taken, after=self.last_ip)
            self.last_ip = ip
        self.ips[uid] = ip
        return ip

    def release_ip(self, uid: str) -> None:
        self.ips.pop(uid, None)

    def pod_dir(self, uid: str) -> Path:
        return self.root / "pods" / uid


def _host_listening() -> set[str]:
    try:
        return listening_ips(Path("/proc/net/tcp").read_text())
    except (OSError, ValueError):
        return set()


def _in(ip: str, cidr: str) -> bool:
    try:
        return ipaddress.ip_address(ip) in ipaddress.ip_network(cidr)
    except ValueError:
        return False


def _version(pod: dict[str, Any]) -> int:
    try:
        return int(pod["metadata"].get("resourceVersion", "0"))
    except ValueError:
        return 0


class PodWorker:
    """Runs one pod bound to the node; the node feeds it every newer version of the pod."""

    def __init__(self, ctx: NodeContext, pod: dict[str, Any]) -> None:
        self.ctx = ctx
        self.pod = pod
        meta = pod["metadata"]
        self.uid = str(meta["uid"])
        self.namespace = str(meta["namespace"])
        self.name = str(meta["name"])
        self.key = f"{self.namespace}/{self.name}"
        self.pod_dir = ctx.pod_dir(self.uid)
        self.volumes_dir = self.pod_dir / "volumes"
        self.gone = False
        self.runners: list[ContainerRunner] = []
        self.pod_ip = ""
        self.start_time = ""
        self._volumes: PodVolumes | None = None
        self._volume_dirs: dict[str, Path] = {}
        self._reported: dict[str, Any] | None = None
        self._node_stopping = False
        self._wake = asyncio.Event()

    # ----- inputs ------------------------------------------------------------------------
    def update(self, pod: dict[str, Any]) -> None:
        """A newer version from the watch (an older one, e.g. behind our own patch, is dropped)."""
        if _version(pod) >= _version(self.pod):
            self.pod = pod
        self._wake.set()

    def vanish(self) -> None:
        """The pod is gone from the API: stop and clean up, nothing left to delete."""
        self.gone = True
        self._wake.set()

    def stop_for_node_shutdown(self) -> None:
        self._node_stopping = True
        self._wake.set()

    @property
    def terminating(self) -> bool:
        return self.gone or bool(self.pod["metadata"].get("deletionTimestamp"))

    @property
    def _ending(self) -> bool:
        return self.terminating or self._node_stopping

    async def _wait(self, timeout: float | None = None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)
        self._wake.clear()

    # ----- lifecycle ---------------------------------------------------------------------
    async def run(self) -> None:
        try:
            await self._run()
        except Exception as error:
            # A bug here fails the pod visibly, and it is deleted only when its user asks.
            log.exception("pod %s: the local node failed running it", self.key)
            await self._stop_containers(NODE_STOP_GRACE_S)
            message = f"the dev cluster's local node failed running this pod: {error}"
            await self._patch(rejected_status(self.pod, "LocalNodeError", message, now_rfc3339()))
            await self._until_ending()
        finally:
            await self._teardown()

    async def _run(self) -> None:
        phase = (self.pod.get("status") or {}).get("phase")
        if phase in ("Succeeded", "Failed"):  # finished before: its status stands, nothing runs
            await self._until_ending()
            return
        try:
            started = await self._start()
        except UnsupportedPodError as rejected:
            log.warning("pod %s cannot run here: %s", self.key, rejected)
            status = rejected_status(self.pod, rejected.reason, rejected.message, now_rfc3339())
            while not self._ending and not await self._patch(status):
                await self._wait(1.0)
            await self._until_ending()
            return
        if started:
            await self._supervise()

    async def _until_ending(self) -> None:
        while not self._ending:
            await self._wait()

    async def _start(self) -> bool:
        """Volumes, then processes; False when the pod ended while it waited for volumes."""
        pod = self.pod
        spec = pod["spec"]
        if spec.get("initContainers"):
            raise UnsupportedPodError(
                UNSUPPORTED_POD, "init containers are not supported by the dev cluster's local node"
            )
        self._volumes = PodVolumes(
            self.ctx.api,
            lambda: self.pod,
            self.volumes_dir,
            plan_volumes(pod),
            ending=lambda: self._ending,
            wait=self._wait,
        )
        containers = spec["containers"]
        checks = {c["name"]: readiness_check(c) for c in containers}
        status = pod.get("status") or {}
        self.pod_ip = (
            HOST_IP
            if spec.get("hostNetwork")
            else self.ctx.allocate_ip(self.uid, status.get("podIP"))
        )
        # Refuse a container that cannot run before waiting on its volumes.
        placeholders = {plan.name: self.volumes_dir / plan.name for plan in self._volumes.plans}
        for container in containers:
            self._launch(container, placeholders)
        volume_dirs = await self._volumes.prepare()
        if volume_dirs is None:
            return False
        self._volume_dirs = volume_dirs
        self.start_time = status.get("startTime") or now_rfc3339()
        restarts = _previous_restarts(pod)
        for container in containers:
            self.runners.append(self._runner(container, checks[container["name"]], restarts))
        log.info("pod %s starting (IP %s)", self.key, self.pod_ip)
        for runner in self.runners:
            runner.start()
        return True

    def _launch(
        self, container: dict[str, Any], volume_dirs: dict[str, Path]
    ) -> tuple[list[Mount], Launch]:
        mounts = mounts_of(container, volume_dirs)
        return mounts, container_launch(
            self.pod,
            container,
            mounts,
            pod_ip=self.pod_ip,
            pod_dir=self.pod_dir,
            python=self.ctx.python,
            base_env=self.ctx.base_env,
        )

    def _runner(
        self, container: dict[str, Any], check: ReadinessCheck | None, restarts: dict[str, int]
    ) -> ContainerRunner:
        mounts, launch = self._launch(container, self._volume_dirs)
        for link, target in nested_links(mounts):
            link_nested(link, target)
        name = container["name"]
        return ContainerRunner(
            ContainerView(
                name, str(container.get("image", "")), restart_count=restarts.get(name, 0)
            ),
            launch,
            log_path=self.pod_dir / f"{name}.log",
            pid_record=self.ctx.root / "pids" / f"{self.uid}_{name}",
            restart_policy=str(self.pod["spec"].get("restartPolicy", "Always")),
            check=check,
            pod_ip=self.pod_ip,
            on_change=self._wake.set,
            pod_name=self.key,
        )

    async def _supervise(self) -> None:
        volumes = self._volumes
        assert volumes is not None  # set by _start
        while not self._ending:
            volumes.refresh_downward()
            status = pod_status(
                self.pod,
                [runner.view for runner in self.runners],
                pod_ip=self.pod_ip,
                start_time=self.start_time,
                now=now_rfc3339(),
            )
            if status != self._reported:
                if await self._patch(status):
                    self._reported = status
                else:
                    await self._wait(1.0)
                    continue
            await self._wait()

    async def _teardown(self) -> None:
        grace = float(_grace_seconds(self.pod))
        if self._node_stopping and not self.terminating:
            grace = min(grace, NODE_STOP_GRACE_S)
        await self._stop_containers(grace)
        if not self.terminating:
            return  # a stopping kubelet leaves its pods (and their volumes) in place
        await asyncio.to_thread(shutil.rmtree, self.volumes_dir, True)
        self.ctx.release_ip(self.uid)
        while not self.gone and not self._node_stopping:
            if await self._delete():
                break
            await self._wait(1.0)

    async def _stop_containers(self, grace: float) -> None:
        running = [runner for runner in self.runners if not runner.stopped]
        await asyncio.gather(*(runner.stop(grace) for runner in running))
        if running:
            log.info("pod %s stopped", self.key)

    # ----- API ---------------------------------------------------------------------------
    async def _patch(self, status: dict[str, Any]) -> bool:
        """Write status; the uid makes it a precondition (a same-named successor is spared)."""
        body = {"metadata": {"uid": self.uid}, "status": status}
        try:
            updated = await self.ctx.api.merge_patch(
                POD, self.namespace, self.name, body, subresource="status"
            )
        except _API_ERRORS as error:
            if isinstance(error, ApiError) and error.status in (404, 409, 422):
                if error.status == 422:  # a replacement pod (its uid differs), or a bad status
                    log.warning("pod %s: status refused: %s", self.key, error)
                return True  # gone or replaced: the watch will say so
            log.warning("pod %s: status write failed: %s", self.key, error)
            return False
        self.update(updated)
        return True

    async def _delete(self) -> bool:
        body = {"gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}}
        try:
            await self.ctx.api.request("DELETE", POD.path(self.namespace, self.name), body=body)
        except _API_ERRORS as error:
            if isinstance(error, ApiError) and (error.not_found or error.conflict):
                return True
            log.warning("pod %s: delete failed: %s", self.key, error)
            return False
        log.info("pod %s deleted", self.key)
        return True


def _grace_seconds(pod: dict[str, Any]) -> int:
    meta_grace = pod["metadata"].get("deletionGracePeriodSeconds")
    if meta_grace is not None:
        return int(meta_grace)
    return int(pod["spec"].get("terminationGracePeriodSeconds", 30))


def _previous_restarts(pod: dict[str, Any]) -> dict[str, int]:
    """A node restart starts a pod's containers again: that counts as a restart."""
    counts = {}
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        ran = bool(status.get("containerID"))
        counts[status["name"]] = int(status.get("restartCount", 0)) + (1 if ran else 0)
    return counts
