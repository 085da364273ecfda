"""Pinned versions of the control-plane components; bump them together and rebuild."""

from __future__ import annotations

KUBERNETES_VERSION = "1.34.10"
"""`k8s.io/kubernetes` release; its staging modules are pinned to the matching `v0.34.x`."""

ETCD_VERSION = "3.6.10"
"""`go.etcd.io/etcd/server/v3` release (Kubernetes 1.34 supports etcd 3.5 and 3.6)."""

KWOK_VERSION = "0.8.0"
"""`sigs.k8s.io/kwok` release, which simulates kubelets for the fake GPU nodes."""

HELM_VERSION = "3.19.5"
"""`helm.sh/helm/v3` release that lints, renders and installs charts/kleave. Helm 3.19 is built
against client-go v0.34, the same minor as KUBERNETES_VERSION (its go.mod has no replaces).
A move to Helm 4 also changes the module and package paths in `build.helm_ldflags`."""

MIN_GO = (1, 26)
"""kwok v0.8.0 declares `go 1.26`; the other components need less."""


def staging_version(kubernetes_version: str = KUBERNETES_VERSION) -> str:
    """The published version of a staging module (`k8s.io/api` etc.): 1.34.10 -> v0.34.10."""
    major, minor, patch = kubernetes_version.split(".")
    if major != "1":
        raise ValueError(f"unexpected Kubernetes version {kubernetes_version!r}")
    return f"v0.{minor}.{patch}"
