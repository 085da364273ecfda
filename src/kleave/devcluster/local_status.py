"""Pure pod status for the local node: phase, conditions and container statuses from what the
node's processes are doing, in the shape a kubelet writes (so kubectl, controllers and the
kleave operator read it as they would on a real node), plus the readiness-probe settings.

Condition transition times are carried over from the pod's current status while a condition's
value holds, so a status write that changes nothing else is a no-op and the node can skip it.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kleave.devcluster.local_pods import UNSUPPORTED_POD, UnsupportedPodError

HOST_IP = "127.0.0.1"


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Terminated:
    """How one run of a container ended."""

    exit_code: int
    started_at: str
    finished_at: str

    @property
    def reason(self) -> str:
        return "Completed" if self.exit_code == 0 else "Error"

    def as_status(self, container_id: str) -> dict[str, Any]:
        return {
            "exitCode": self.exit_code,
            "reason": self.reason,
            "startedAt": self.started_at,
            "finishedAt": self.finished_at,
            "containerID": container_id,
        }


@dataclass(frozen=True)
class ContainerView:
    """A snapshot of one container: running (``pid`` and ``started_at``), waiting (before
    the first start or during a restart's backoff) or terminated for good (``terminated``)."""

    name: str
    image: str
    restart_count: int = 0
    pid: int | None = None
    started_at: str | None = None
    ready: bool = False
    waiting_reason: str = "ContainerCreating"
    terminated: Terminated | None = None
    last_terminated: Terminated | None = None
    last_pid: int | None = None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def as_status(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            "name": self.name,
            "image": self.image,
            "imageID": f"local://{self.image}",
            "restartCount": self.restart_count,
            "started": self.running,
            "ready": self.ready and self.running,
        }
        if self.running:
            status["containerID"] = f"local://{self.pid}"
            status["state"] = {"running": {"startedAt": self.started_at}}
        elif self.terminated is not None:
            status["containerID"] = f"local://{self.last_pid}"
            status["state"] = {"terminated": self.terminated.as_status(f"local://{self.last_pid}")}
        else:
            status["state"] = {"waiting": {"reason": self.waiting_reason}}
        if self.last_terminated is not None and self.terminated is None:
            previous = self.last_terminated.as_status(f"local://{self.last_pid}")
            status["lastState"] = {"terminated": previous}
        return status


def pod_phase(views: Sequence[ContainerView]) -> str:
    """Running while any container runs or restarts; Succeeded/Failed once all ended for good."""
    if views and all(v.terminated is not None for v in views):
        codes = [v.terminated.exit_code for v in views if v.terminated is not None]
        return "Succeeded" if all(code == 0 for code in codes) else "Failed"
    if any(v.running or v.restart_count or v.terminated for v in views):
        return "Running"
    return "Pending"


def _condition(
    previous: Mapping[str, Mapping[str, Any]], kind: str, ok: bool, now: str, reason: str = ""
) -> dict[str, Any]:
    value = "True" if ok else "False"
    old = previous.get(kind, {})
    condition: dict[str, Any] = {
        "type": kind,
        "status": value,
        "lastProbeTime": None,
        "lastTransitionTime": old.get("lastTransitionTime", now)
        if old.get("status") == value
        else now,
    }
    if reason and not ok:
        condition["reason"] = reason
    return condition


def _previous_conditions(pod: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {c["type"]: c for c in (pod.get("status") or {}).get("conditions") or []}


def pod_status(
    pod: Mapping[str, Any],
    views: Sequence[ContainerView],
    *,
    pod_ip: str,
    start_time: str,
    now: str,
) -> dict[str, Any]:
    """The pod's whole status (for a merge patch of ``/status``) from its containers."""
    previous = _previous_conditions(pod)
    phase = pod_phase(views)
    ready = phase == "Running" and all(v.ready and v.running for v in views)
    not_ready = "PodCompleted" if phase in ("Succeeded", "Failed") else "ContainersNotReady"
    scheduled = dict(
        previous.get("PodScheduled") or _condition(previous, "PodScheduled", True, now)
    )
    return {
        "phase": phase,
        "reason": None,
        "message": None,
        "hostIP": HOST_IP,
        "hostIPs": [{"ip": HOST_IP}],
        "podIP": pod_ip,
        "podIPs": [{"ip": pod_ip}],
        "startTime": start_time,
        "conditions": [
            _condition(previous, "PodReadyToStartContainers", phase != "Succeeded", now),
            _condition(previous, "Initialized", True, now),
            _condition(previous, "ContainersReady", ready, now, not_ready),
            _condition(previous, "Ready", ready, now, not_ready),
            scheduled,
        ],
        "containerStatuses": [v.as_status() for v in views],
    }


def rejected_status(pod: Mapping[str, Any], reason: str, message: str, now: str) -> dict[str, Any]:
    """A pod the node will not run: Failed, with the reason on the pod and each container."""
    previous = _previous_conditions(pod)
    containers = pod.get("spec", {}).get("containers") or []
    terminated = {"exitCode": 128, "reason": reason, "message": message}
    terminated |= {"startedAt": now, "finishedAt": now}
    scheduled = dict(
        previous.get("PodScheduled") or _condition(previous, "PodScheduled", True, now)
    )
    return {
        "phase": "Failed",
        "reason": reason,
        "message": message,
        "hostIP": HOST_IP,
        "hostIPs": [{"ip": HOST_IP}],
        "startTime": (pod.get("status") or {}).get("startTime") or now,
        "conditions": [
            _condition(previous, "Initialized", True, now),
            _condition(previous, "ContainersReady", False, now, "PodFailed"),
            _condition(previous, "Ready", False, now, "PodFailed"),
            scheduled,
        ],
        "containerStatuses": [
            {
                "name": c["name"],
                "image": c.get("image", ""),
                "imageID": "",
                "restartCount": 0,
                "started": False,
                "ready": False,
                "state": {"terminated": dict(terminated)},
            }
            for c in containers
        ],
    }


# ----- readiness ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ReadinessCheck:
    """A container's readinessProbe, resolved to a port number: ``path`` None = tcpSocket."""

    port: int
    path: str | None = "/"
    period_s: float = 10.0
    timeout_s: float = 1.0
    failure_threshold: int = 3
    success_threshold: int = 1
    initial_delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


def _port(container: Mapping[str, Any], port: Any) -> int:
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for declared in container.get("ports") or []:
        if declared.get("name") == port:
            return int(declared["containerPort"])
    raise UnsupportedPodError(
        UNSUPPORTED_POD,
        f"container {container['name']!r}: readinessProbe port {port!r} is not one of its ports",
    )


def readiness_check(container: Mapping[str, Any]) -> ReadinessCheck | None:
    """The probe the node runs, None when there is none (ready once started)."""
    probe = container.get("readinessProbe")
    if not probe:
        return None

    def check(port: Any, path: str | None, headers: dict[str, str] | None = None) -> ReadinessCheck:
        return ReadinessCheck(
            port=_port(container, port),
            path=path,
            period_s=float(probe.get("periodSeconds", 10)),
            timeout_s=float(probe.get("timeoutSeconds", 1)),
            failure_threshold=int(probe.get("failureThreshold", 3)),
            success_threshold=int(probe.get("successThreshold", 1)),
            initial_delay_s=float(probe.get("initialDelaySeconds", 0)),
            headers=headers or {},
        )

    if "httpGet" in probe:
        get = probe["httpGet"]
        if str(get.get("scheme", "HTTP")).upper() != "HTTP":
            raise UnsupportedPodError(
                UNSUPPORTED_POD, f"container {container['name']!r}: only HTTP probes are supported"
            )
        headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or []}
        return check(get["port"], str(get.get("path") or "/"), headers)
    if "tcpSocket" in probe:
        return check(probe["tcpSocket"]["port"], None)
    kinds = ", ".join(k for k in ("exec", "grpc") if k in probe) or "unknown"
    raise UnsupportedPodError(
        UNSUPPORTED_POD,
        f"container {container['name']!r}: {kinds} readiness probes are not supported by the "
        "local node (httpGet and tcpSocket are)",
    )
