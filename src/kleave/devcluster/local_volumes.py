"""The dev cluster's volume provisioner: a default StorageClass whose claims get a directory.

kube-controller-manager's PV controller binds claims to volumes but provisions nothing for an
out-of-tree provisioner: it waits for one to create a PersistentVolume that names the claim.
This is that provisioner. Each claim of the ``kleave-local`` class gets a hostPath volume
``<root>/volumes/pvc-<claim uid>``; once the claim is deleted the PV controller marks the volume
Released and the provisioner removes the directory and the volume (reclaim policy Delete).
The volumes carry no node affinity: pods on kwok's nodes (which run nothing) must stay
schedulable with a claim, and the one node that runs pods shares the host's filesystem anyway.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kleave.devcluster.informer import Informer
from kleave.operator.kube import (
    PERSISTENT_VOLUME,
    PERSISTENT_VOLUME_CLAIM,
    STORAGE_CLASS,
    ApiError,
    KubeApi,
)

log = logging.getLogger(__name__)

STORAGE_CLASS_NAME = "kleave-local"
PROVISIONER = "kleave.dev/local-volumes"
PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"
DEFAULT_CLASS = "storageclass.kubernetes.io/is-default-class"
_CONCURRENCY = 8


def storage_class() -> dict[str, Any]:
    """The default class: claims that name no class get it from the DefaultStorageClass
    admission plugin, and Immediate binding lets the scheduler place their pods anywhere."""
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": STORAGE_CLASS_NAME, "annotations": {DEFAULT_CLASS: "true"}},
        "provisioner": PROVISIONER,
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "Immediate",
    }


def volume_name(claim: Mapping[str, Any]) -> str:
    return f"pvc-{claim['metadata']['uid']}"


def volume_dir(root: Path, claim: Mapping[str, Any]) -> Path:
    return root / "volumes" / volume_name(claim)


def wants_volume(claim: Mapping[str, Any]) -> bool:
    """A claim of our class (or of none: a class may be assigned later) not bound yet."""
    spec = claim.get("spec", {})
    return (
        spec.get("storageClassName", None) in (STORAGE_CLASS_NAME, None)
        and not spec.get("volumeName")
        and not claim["metadata"].get("deletionTimestamp")
        and spec.get("volumeMode", "Filesystem") == "Filesystem"
        and (claim.get("status") or {}).get("phase", "Pending") == "Pending"
    )


def persistent_volume(claim: Mapping[str, Any], root: Path) -> dict[str, Any]:
    """The hostPath volume pre-bound to ``claim`` (its claimRef); the PV controller binds."""
    meta = claim["metadata"]
    spec = claim["spec"]
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {
            "name": volume_name(claim),
            "annotations": {PROVISIONED_BY: PROVISIONER},
        },
        "spec": {
            "capacity": {"storage": spec["resources"]["requests"]["storage"]},
            "accessModes": list(spec.get("accessModes") or ["ReadWriteOnce"]),
            "storageClassName": STORAGE_CLASS_NAME,
            "persistentVolumeReclaimPolicy": "Delete",
            "volumeMode": "Filesystem",
            "hostPath": {"path": str(volume_dir(root, claim)), "type": "DirectoryOrCreate"},
            "claimRef": {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "namespace": meta["namespace"],
                "name": meta["name"],
                "uid": meta["uid"],
            },
        },
    }


def is_released(volume: Mapping[str, Any]) -> bool:
    """One of ours whose claim is gone: its data goes with it (reclaim policy Delete)."""
    annotations = volume.get("metadata", {}).get("annotations") or {}
    return (
        annotations.get(PROVISIONED_BY) == PROVISIONER
        and not volume["metadata"].get("deletionTimestamp")
        and (volume.get("status") or {}).get("phase") == "Released"
        and volume.get("spec", {}).get("persistentVolumeReclaimPolicy") == "Delete"
    )


def volume_path(volume: Mapping[str, Any]) -> Path | None:
    """The directory behind a hostPath or local PV."""
    spec = volume.get("spec", {})
    source = spec.get("hostPath") or spec.get("local") or {}
    return Path(source["path"]) if source.get("path") else None


class VolumeProvisioner:
    """Provisions and deletes the ``kleave-local`` volumes under ``root/volumes``."""

    def __init__(self, api: KubeApi, root: Path) -> None:
        self.api = api
        self.root = root
        self._busy: set[str] = set()
        self._slots = asyncio.Semaphore(_CONCURRENCY)
        self._tasks: set[asyncio.Task[None]] = set()

    async def ensure_storage_class(self) -> None:
        try:
            await self.api.create(STORAGE_CLASS, None, storage_class())
            log.info("created StorageClass %s (default)", STORAGE_CLASS_NAME)
        except ApiError as error:
            if not error.conflict:
                raise
            existing = await self.api.get(STORAGE_CLASS, None, STORAGE_CLASS_NAME) or {}
            if existing.get("provisioner") != PROVISIONER:
                log.warning(
                    "StorageClass %s exists with provisioner %s; its claims are not ours",
                    STORAGE_CLASS_NAME, existing.get("provisioner"),
                )  # fmt: skip

    def informers(self) -> list[Informer]:
        return [
            Informer(self.api, PERSISTENT_VOLUME_CLAIM, self._on_claim, resync_seconds=15),
            Informer(self.api, PERSISTENT_VOLUME, self._on_volume, resync_seconds=15),
        ]

    def _spawn(self, key: str, work: Any) -> None:
        """Run ``work`` once per key at a time; a resync retries what failed."""
        if key in self._busy:
            work.close()
            return
        self._busy.add(key)

        async def guarded() -> None:
            try:
                async with self._slots:
                    await work
            except ApiError as error:
                log.warning("%s: %s (retried at the next resync)", key, error)
            finally:
                self._busy.discard(key)

        task = asyncio.create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_claim(self, kind: str, claim: dict[str, Any]) -> None:
        if kind != "DELETED" and wants_volume(claim):
            self._spawn(f"claim {claim['metadata']['uid']}", self._provision(claim))

    async def _on_volume(self, kind: str, volume: dict[str, Any]) -> None:
        if kind != "DELETED" and is_released(volume):
            self._spawn(f"volume {volume['metadata']['name']}", self._reclaim(volume))

    async def _provision(self, claim: dict[str, Any]) -> None:
        directory = volume_dir(self.root, claim)
        directory.mkdir(parents=True, exist_ok=True)
        try:
            await self.api.create(PERSISTENT_VOLUME, None, persistent_volume(claim, self.root))
        except ApiError as error:
            if not error.conflict:
                raise
            return
        meta = claim["metadata"]
        log.info(
            "provisioned %s for claim %s/%s", volume_name(claim), meta["namespace"], meta["name"]
        )

    async def _reclaim(self, volume: dict[str, Any]) -> None:
        path = volume_path(volume)
        volumes = self.root / "volumes"
        # Only directories this provisioner made: a hand-edited path outside is left alone.
        if path is not None and path.parent == volumes:
            await asyncio.to_thread(shutil.rmtree, path, ignore_errors=True)
        meta = volume["metadata"]
        await self.api.delete(PERSISTENT_VOLUME, None, meta["name"], uid=meta["uid"])
        log.info("deleted released volume %s and its directory", meta["name"])
