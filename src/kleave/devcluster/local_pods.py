"""Pure decisions of the local node: what a pod's volumes are, where each mount lives on the
host, and the exact process each container becomes.

There is no container runtime, image or chroot: a container is a local process, so every path
the pod spec names inside the container (a volumeMount's mountPath and anything below it, in
args, env values and workingDir) is rewritten to the host directory behind that mount. Only
``kleave ...`` containers can run that way (the image's ``kleave`` is this checkout's), so
anything else is refused with a reason the pod's status carries, never started half-right.
Keeping these decisions pure lets the unit tests pin them without a cluster.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

UNSUPPORTED_COMMAND = "UnsupportedCommand"
UNSUPPORTED_VOLUME = "UnsupportedVolume"
UNSUPPORTED_ENV = "UnsupportedEnv"
UNSUPPORTED_POD = "UnsupportedPodSpec"
PROCESS_MARKER = "kleave-local-node"
"""``python -X kleave-local-node=<pod dir>``: names the pod in every container's command line
(Python ignores unknown ``-X`` options), so a node restart or ``dev-cluster down`` finds them."""
UNSPECIFIED_HOSTS = ("0.0.0.0", "::", "[::]")


class UnsupportedPodError(Exception):
    """A pod the local node cannot run; ``reason`` and ``message`` go into its status."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


# ----- pod IPs -----------------------------------------------------------------------------
def allocate_ip(cidr: str, in_use: Collection[str], after: str | None = None) -> str:
    """The next free host address of ``cidr`` after ``after`` (round robin, as host-local IPAM
    does, so a deleted pod's address is not handed out again at once); raises when full."""
    hosts = [str(ip) for ip in ipaddress.ip_network(cidr).hosts()]
    start = hosts.index(after) + 1 if after in hosts else 0
    for ip in hosts[start:] + hosts[:start]:
        if ip not in in_use:
            return ip
    raise UnsupportedPodError(UNSUPPORTED_POD, f"no free pod IP left in {cidr}")


def listening_ips(proc_net_tcp: str) -> set[str]:
    """IPv4 addresses with a listening TCP socket, from ``/proc/net/tcp``: a pod IP another
    program (another dev cluster's pod, say) already serves on is not handed out."""
    found = set()
    for line in proc_net_tcp.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[3] == "0A":  # TCP_LISTEN
            address = fields[1].partition(":")[0]
            found.add(str(ipaddress.IPv4Address(bytes.fromhex(address)[::-1])))
    return found


# ----- downward API ------------------------------------------------------------------------
_KEYED = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


def downward_value(pod: Mapping[str, Any], field_path: str, pod_ip: str = "") -> str:
    """The value a ``fieldRef`` names, as the kubelet renders it."""
    meta = pod.get("metadata", {})
    spec = pod.get("spec", {})
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": pod_ip,
        "status.hostIP": "127.0.0.1",
    }
    if field_path in simple:
        return str(simple[field_path])
    keyed = _KEYED.match(field_path)
    if keyed:
        return str((meta.get(keyed[1]) or {}).get(keyed[2], ""))
    if field_path in ("metadata.labels", "metadata.annotations"):
        values = meta.get(field_path.split(".")[1]) or {}
        return "\n".join(f"{k}={json.dumps(v)}" for k, v in sorted(values.items()))
    raise UnsupportedPodError(
        UNSUPPORTED_POD, f"fieldRef {field_path!r} is not supported by the dev cluster's local node"
    )


# ----- volumes -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Projection:
    """One source of files in a files volume: a ConfigMap, a Secret, downward API fields or a
    service-account token. ``items`` are (key or fieldPath, relative path); empty = all keys."""

    kind: str
    name: str = ""
    items: tuple[tuple[str, str], ...] = ()
    optional: bool = False
    audience: str = ""
    expiration_seconds: int = 3600


@dataclass(frozen=True)
class VolumePlan:
    """``kind``: ``emptyDir`` (a fresh directory), ``claim`` (the bound PV's directory) or
    ``files`` (a directory the node writes ``projections`` into)."""

    name: str
    kind: str
    claim: str = ""
    projections: tuple[Projection, ...] = ()


SUPPORTED_VOLUMES = ("emptyDir", "persistentVolumeClaim", "configMap", "secret", "downwardAPI")


def _items(source: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple((str(i["key"]), str(i["path"])) for i in source.get("items") or [])


def _downward_items(volume: str, source: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    items = []
    for item in source.get("items") or []:
        if "fieldRef" not in item:
            raise UnsupportedPodError(
                UNSUPPORTED_VOLUME,
                f"volume {volume!r}: downward API item {item.get('path')!r} uses resourceFieldRef; "
                "the dev cluster's local node supports fieldRef only",
            )
        items.append((str(item["fieldRef"]["fieldPath"]), str(item["path"])))
    return tuple(items)


def _projection(volume: str, source: Mapping[str, Any]) -> Projection:
    if "configMap" in source:
        cm = source["configMap"]
        return Projection("configMap", cm["name"], _items(cm), bool(cm.get("optional")))
    if "secret" in source:
        secret = source["secret"]
        name = secret.get("secretName") or secret.get("name", "")
        return Projection("secret", name, _items(secret), bool(secret.get("optional")))
    if "downwardAPI" in source:
        return Projection("downwardAPI", items=_downward_items(volume, source["downwardAPI"]))
    if "serviceAccountToken" in source:
        token = source["serviceAccountToken"]
        return Projection(
            "serviceAccountToken",
            items=(("token", str(token["path"])),),
            audience=str(token.get("audience", "")),
            expiration_seconds=int(token.get("expirationSeconds", 3600)),
        )
    kinds = ", ".join(sorted(source))
    raise UnsupportedPodError(
        UNSUPPORTED_VOLUME,
        f"volume {volume!r}: projected source {kinds} is not supported by the dev cluster's "
        "local node (configMap, secret, downwardAPI and serviceAccountToken are)",
    )


def plan_volumes(pod: Mapping[str, Any]) -> list[VolumePlan]:
    """The pod's volumes as the node will provide them; refuses any other volume type."""
    plans = []
    for volume in pod.get("spec", {}).get("volumes") or []:
        name = str(volume["name"])
        if "emptyDir" in volume:
            plans.append(VolumePlan(name, "emptyDir"))
        elif "persistentVolumeClaim" in volume:
            plans.append(
                VolumePlan(name, "claim", claim=volume["persistentVolumeClaim"]["claimName"])
            )
        elif "projected" in volume:
            sources = volume["projected"].get("sources") or []
            plans.append(
                VolumePlan(name, "files", projections=tuple(_projection(name, s) for s in sources))
            )
        elif any(kind in volume for kind in ("configMap", "secret", "downwardAPI")):
            plans.append(VolumePlan(name, "files", projections=(_projection(name, volume),)))
        else:
            kind = next((key for key in volume if key != "name"), "unknown")
            raise UnsupportedPodError(
                UNSUPPORTED_VOLUME,
                f"volume {name!r} is of type {kind}, which the dev cluster's local node does not "
                f"support (it supports {', '.join(SUPPORTED_VOLUMES)} and projected)",
            )
    return plans


def safe_relative(path: str) -> PurePosixPath:
    """A projected file's path, refused when it would leave its volume."""
    relative = PurePosixPath(path)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise UnsupportedPodError(UNSUPPORTED_VOLUME, f"file path {path!r} leaves its volume")
    return relative


def projected_files(
    projection: Projection, data: Mapping[str, bytes], pod: Mapping[str, Any]
) -> dict[PurePosixPath, bytes]:
    """The files one projection writes: ``data`` holds the ConfigMap/Secret's (decoded) keys,
    or the token under ``token``; downward API values come from ``pod``."""
    if projection.kind == "downwardAPI":
        return {
            safe_relative(path): downward_value(pod, field).encode()
            for field, path in projection.items
        }
    if not projection.items:
        return {safe_relative(key): value for key, value in data.items()}
    files = {}
    for key, path in projection.items:
        if key in data:
            files[safe_relative(path)] = data[key]
        elif not projection.optional:
            raise UnsupportedPodError(
                UNSUPPORTED_VOLUME, f"{projection.kind} {projection.name!r} has no key {key!r}"
            )
    return files


# ----- mounts and path translation ---------------------------------------------------------
@dataclass(frozen=True)
class Mount:
    """A volumeMount: ``path`` inside the container is ``host`` on the node."""

    path: str
    host: Path


def _normal(path: str) -> str:
    return path.rstrip("/") if path != "/" else "/"


def mounts_of(container: Mapping[str, Any], volume_dirs: Mapping[str, Path]) -> list[Mount]:
    """The container's mounts on the host (a ``subPath`` is a directory inside its volume)."""
    mounts = []
    for mount in container.get("volumeMounts") or []:
        host = volume_dirs[mount["name"]]
        if mount.get("subPath"):
            host = host / safe_relative(mount["subPath"])
        mounts.append(Mount(_normal(mount["mountPath"]), host))
    return mounts


def _under(value: str, path: str) -> bool:
    if path == "/":
        return value.startswith("/")
    return value == path or value.startswith(path + "/")


def translate(value: str, mounts: Sequence[Mount]) -> str:
    """A container path rewritten to the host (the longest matching mountPath wins)."""
    matches = [m for m in mounts if value and _under(value, m.path)]
    if not matches:
        return value
    mount = max(matches, key=lambda m: len(m.path))
    rest = value[len(mount.path) :] if mount.path != "/" else value
    return str(mount.host) + rest


def nested_links(mounts: Sequence[Mount]) -> list[tuple[Path, Path]]:
    """(link, target) pairs: a mount inside another mount's path appears inside the outer
    host directory as a symlink to its own, so paths the process builds itself (the runtime's
    ``STATE_DIR/snapshots``) reach the inner volume too. Outer links come first."""
    links = []
    for inner in sorted(mounts, key=lambda m: len(m.path)):
        outers = [m for m in mounts if m.path != inner.path and _under(inner.path, m.path)]
        if outers:
            outer = max(outers, key=lambda m: len(m.path))
            relative = inner.path[len(outer.path) :].lstrip("/")
            links.append((outer.host / relative, inner.host))
    return links


# ----- the process -------------------------------------------------------------------------
@dataclass(frozen=True)
class Launch:
    """Exactly what the node executes for one container."""

    argv: tuple[str, ...]
    env: dict[str, str]
    cwd: Path


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: defined names are replaced, ``$$`` escapes ``$``."""

    def replace(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        return env.get(match[1], match[0])

    return _VAR_REF.sub(replace, value)


def _container_env(
    pod: Mapping[str, Any], container: Mapping[str, Any], mounts: Sequence[Mount], pod_ip: str
) -> dict[str, str]:
    name = container["name"]
    if container.get("envFrom"):
        raise UnsupportedPodError(
            UNSUPPORTED_ENV, f"container {name!r}: envFrom is not supported by the local node"
        )
    env: dict[str, str] = {}
    for var in container.get("env") or []:
        if "valueFrom" in var:
            ref = var["valueFrom"].get("fieldRef")
            if ref is None:
                kind = ", ".join(sorted(var["valueFrom"]))
                raise UnsupportedPodError(
                    UNSUPPORTED_ENV,
                    f"container {name!r}: env {var['name']} uses valueFrom.{kind}; the dev "
                    "cluster's local node supports value and valueFrom.fieldRef only",
                )
            env[var["name"]] = downward_value(pod, ref["fieldPath"], pod_ip)
        else:
            env[var["name"]] = translate(expand(str(var.get("value", "")), env), mounts)
    return env


def _bind_pod_ip(args: list[str], pod_ip: str) -> list[str]:
    """``--host 0.0.0.0`` would listen on every address of the host, not of the pod."""
    out = list(args)
    for index, arg in enumerate(out):
        if arg == "--host" and index + 1 < len(out) and out[index + 1] in UNSPECIFIED_HOSTS:
            out[index + 1] = pod_ip
        elif arg.startswith("--host=") and arg.partition("=")[2] in UNSPECIFIED_HOSTS:
            out[index] = f"--host={pod_ip}"
    return out


def container_launch(
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    mounts: Sequence[Mount],
    *,
    pod_ip: str,
    pod_dir: Path,
    python: str,
    base_env: Mapping[str, str],
) -> Launch:
    """The process of one container: ``kleave ARGS`` becomes ``python -m kleave ARGS`` with
    paths translated, ``--host 0.0.0.0`` bound to the pod IP and the container's env."""
    name = container["name"]
    command = [str(part) for part in container.get("command") or []]
    args = [str(part) for part in container.get("args") or []]
    if not command or command[0] != "kleave":
        shown = shlex.join(command + args) if command else "its image's entrypoint"
        if not command and args:
            shown += f" with args {shlex.join(args)}"
        raise UnsupportedPodError(
            UNSUPPORTED_COMMAND,
            f"container {name!r} runs {shown}: the dev cluster's local node runs only "
            "`kleave ...` containers (there is no container runtime; the command runs as a "
            "local process of this checkout's kleave)",
        )
    env = _container_env(pod, container, mounts, pod_ip)
    rest = [translate(expand(arg, env), mounts) for arg in command[1:] + args]
    working_dir = str(container.get("workingDir") or "")
    # There is no image filesystem: a workingDir outside every mount has nothing behind it.
    cwd = pod_dir
    if working_dir and translate(working_dir, mounts) != working_dir:
        cwd = Path(translate(working_dir, mounts))
    full_env = {**base_env, "PYTHONUNBUFFERED": "1"}
    # Code, not args, picks the temporary directory: point it at the pod's own /tmp volume.
    tmp = translate("/tmp", mounts)
    if tmp != "/tmp":
        full_env["TMPDIR"] = tmp
    full_env |= env
    # -P: the working directory (an agent's workspace) must not shadow kleave's imports.
    argv = (
        python,
        "-P",
        "-X",
        f"{PROCESS_MARKER}={pod_dir}",
        "-m",
        "kleave",
        *_bind_pod_ip(rest, pod_ip),
    )
    return Launch(argv=argv, env=full_env, cwd=cwd)
