"""Where the dev cluster keeps its binaries (a shared cache) and its running state."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kleave.devcluster.versions import (
    ETCD_VERSION,
    HELM_VERSION,
    KUBERNETES_VERSION,
    KWOK_VERSION,
)


def cache_dir() -> Path:
    """`$KLEAVE_CACHE`, else `~/.cache/kleave`: builds are slow, so they outlive checkouts."""
    env = os.environ.get("KLEAVE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kleave"


def default_state_dir() -> Path:
    """One directory per cluster holds everything it writes: PKI, data, logs, pids."""
    env = os.environ.get("KLEAVE_CLUSTER_DIR")
    return Path(env).expanduser() if env else cache_dir() / "clusters" / "default"


@dataclass(frozen=True)
class Binaries:
    """Paths of the built control-plane binaries under one cache root."""

    root: Path

    @property
    def kubernetes_dir(self) -> Path:
        return self.root / f"kubernetes-v{KUBERNETES_VERSION}"

    @property
    def etcd_dir(self) -> Path:
        return self.root / f"etcd-v{ETCD_VERSION}"

    @property
    def kwok_dir(self) -> Path:
        return self.root / f"kwok-v{KWOK_VERSION}"

    @property
    def helm_dir(self) -> Path:
        return self.root / f"helm-v{HELM_VERSION}"

    @property
    def kube_apiserver(self) -> Path:
        return self.kubernetes_dir / "bin" / "kube-apiserver"

    @property
    def kube_controller_manager(self) -> Path:
        return self.kubernetes_dir / "bin" / "kube-controller-manager"

    @property
    def kube_scheduler(self) -> Path:
        return self.kubernetes_dir / "bin" / "kube-scheduler"

    @property
    def etcd(self) -> Path:
        return self.etcd_dir / "bin" / "etcd"

    @property
    def kwok(self) -> Path:
        return self.kwok_dir / "bin" / "kwok"

    @property
    def helm(self) -> Path:
        return self.helm_dir / "bin" / "helm"

    @property
    def kwok_stages(self) -> Path:
        return self.kwok_dir / "stages"

    @property
    def logs(self) -> Path:
        return self.root / "build-logs"
