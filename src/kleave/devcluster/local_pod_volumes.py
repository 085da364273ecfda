"""A local-node pod's volumes on the host: fresh directories for emptyDirs, the bound PV's
directory for a claim (once it is bound), and files written for ConfigMaps, Secrets, downward
API fields and service-account tokens, as a kubelet's volume manager provides them.

A missing claim or non-optional source is waited for (a kubelet keeps such a pod in
ContainerCreating), not failed: pods and what they mount are often created together.
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path, PurePosixPath
from typing import Any

import aiohttp

from kleave.devcluster.local_pods import (
    UNSUPPORTED_VOLUME,
    Projection,
    UnsupportedPodError,
    VolumePlan,
    projected_files,
)
from kleave.devcluster.local_volumes import volume_path
from kleave.operator.kube import (
    CONFIGMAP,
    PERSISTENT_VOLUME,
    PERSISTENT_VOLUME_CLAIM,
    SECRET,
    ApiError,
    KubeApi,
)

log = logging.getLogger(__name__)

_API_ERRORS = (ApiError, aiohttp.ClientError, TimeoutError)


def write_files(directory: Path, files: dict[PurePosixPath, bytes]) -> None:
    """Write projected files, each atomically; unchanged files are left as they are."""
    directory.mkdir(parents=True, exist_ok=True)
    for relative, content in files.items():
        target = directory.joinpath(*relative.parts)
        if target.is_file() and target.read_bytes() == content:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.tmp")
        temporary.write_bytes(content)
        temporary.replace(target)


def link_nested(link: Path, target: Path) -> None:
    """Make ``link`` (inside an outer mount's directory) point at an inner mount's directory."""
    if link.is_symlink():
        if Path(os.readlink(link)) == target:
            return
        link.unlink()
    elif link.is_dir():
        if any(link.iterdir()):
            raise UnsupportedPodError(
                UNSUPPORTED_VOLUME, f"{link} holds files, so a nested mount cannot be placed there"
            )
        link.rmdir()
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target, target_is_directory=True)


class PodVolumes:
    """Provides one pod's volumes under ``volumes_dir`` (claims: their PV's own directory)."""

    def __init__(
        self,
        api: KubeApi,
        pod: Callable[[], dict[str, Any]],
        volumes_dir: Path,
        plans: list[VolumePlan],
        *,
        ending: Callable[[], bool],
        wait: Callable[[float], Awaitable[None]],
    ) -> None:
        self.api = api
        self.pod = pod
        self.volumes_dir = volumes_dir
        self.plans = plans
        self.ending = ending
        self.wait = wait
        meta = pod()["metadata"]
        self.namespace = str(meta["namespace"])
        self.name = str(meta["name"])
        self.uid = str(meta["uid"])
        self.key = f"{self.namespace}/{self.name}"

    async def prepare(self) -> dict[str, Path] | None:
        dirs: dict[str, Path] = {}
        for plan in self.plans:
            if plan.kind == "claim":
                path = await self._claim_path(plan.claim)
                if path is None:
                    return None
                dirs[plan.name] = path
                continue
            directory = self.volumes_dir / plan.name
            directory.mkdir(parents=True, exist_ok=True)
            if plan.kind == "files":
                files: dict[PurePosixPath, bytes] = {}
                for projection in plan.projections:
                    data = await self._source_data(projection)
                    if data is None:
                        return None
                    files |= projected_files(projection, data, self.pod())
                write_files(directory, files)
            dirs[plan.name] = directory
        return dirs

    def refresh_downward(self) -> None:
        """Labels and annotations change after start (a warm pod's claim): refresh their files."""
        for plan in self.plans:
            for projection in plan.projections:
                if projection.kind == "downwardAPI":
                    files = projected_files(projection, {}, self.pod())
                    write_files(self.volumes_dir / plan.name, files)

    async def _claim_path(self, claim: str) -> Path | None:
        """The directory of the claim's volume, once it is bound (None: the pod ended first)."""
        said = ""
        while not self.ending():
            try:
                why, path = await self._bound_path(claim)
            except _API_ERRORS as error:
                why, path = f"reading claim {claim!r} failed: {error}", None
            if path is not None:
                path.mkdir(parents=True, exist_ok=True)  # hostPath type DirectoryOrCreate
                return path
            if why != said:
                log.info("pod %s waiting: %s", self.key, why)
                said = why
            await self.wait(1.0)
        return None

    async def _bound_path(self, claim: str) -> tuple[str, Path | None]:
        api = self.api
        pvc = await api.get(PERSISTENT_VOLUME_CLAIM, self.namespace, claim)
        if pvc is None:
            return f"claim {claim!r} does not exist", None
        volume = pvc.get("spec", {}).get("volumeName")
        if (pvc.get("status") or {}).get("phase") != "Bound" or not volume:
            return f"claim {claim!r} is not bound yet", None
        pv = await api.get(PERSISTENT_VOLUME, None, volume)
        if pv is None:
            return f"volume {volume} of claim {claim!r} does not exist", None
        path = volume_path(pv)
        if path is None:
            raise UnsupportedPodError(
                UNSUPPORTED_VOLUME,
                f"claim {claim!r} is bound to {volume}, which is neither a hostPath nor a local "
                "volume: the dev cluster's local node mounts only directories",
            )
        return "", path

    async def _source_data(self, projection: Projection) -> dict[str, bytes] | None:
        """A projection's keys (waiting for a missing, non-optional source, as a kubelet does)."""
        said = False
        while not self.ending():
            try:
                data = await self._fetch(projection)
            except _API_ERRORS as error:
                log.info("pod %s: reading %s failed: %s", self.key, projection.kind, error)
                data = None
            if data is not None:
                return data
            if not said:
                log.info("pod %s waiting for %s %r", self.key, projection.kind, projection.name)
                said = True
            await self.wait(1.0)
        return None

    async def _fetch(self, projection: Projection) -> dict[str, bytes] | None:
        api = self.api
        if projection.kind == "downwardAPI":
            return {}
        if projection.kind == "serviceAccountToken":
            return {"token": (await self._token(projection)).encode()}
        rt = CONFIGMAP if projection.kind == "configMap" else SECRET
        obj = await api.get(rt, self.namespace, projection.name)
        if obj is None:
            return {} if projection.optional else None
        if projection.kind == "secret":
            return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        data = {k: str(v).encode() for k, v in (obj.get("data") or {}).items()}
        binary = {k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()}
        return data | binary

    async def _token(self, projection: Projection) -> str:
        """A bound service-account token (TokenRequest), as the kubelet projects it."""
        account = self.pod()["spec"].get("serviceAccountName") or "default"
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "audiences": [projection.audience] if projection.audience else [],
                "expirationSeconds": projection.expiration_seconds,
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": self.name,
                    "uid": self.uid,
                },
            },
        }
        path = f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{account}/token"
        answer = await self.api.request("POST", path, body=request)
        return str(answer["status"]["token"])
