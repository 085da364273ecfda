"""kopf's peering CRDs (its documented ``peering.yaml``), installed with kleave's own so that
``--peering`` works: replicas keep-alive with their priority in a peering object's status."""

from __future__ import annotations

from typing import Any

PEERING_GROUP = "kopf.dev"
PEERING_VERSION = "v1"
CLUSTER_PEERING_PLURAL = "clusterkopfpeerings"
NAMESPACED_PEERING_PLURAL = "kopfpeerings"


def _peering_crd(*, kind: str, plural: str, scope: str) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{PEERING_GROUP}"},
        "spec": {
            "scope": scope,
            "group": PEERING_GROUP,
            "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
            "versions": [
                {
                    "name": PEERING_VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                # Keep-alives are keyed by operator identity: free-form.
                                "status": {
                                    "type": "object",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                },
                            },
                        },
                    },
                }
            ],
        },
    }


def cluster_peering_crd() -> dict[str, Any]:
    """``ClusterKopfPeering``: used by operators that watch all namespaces."""
    return _peering_crd(kind="ClusterKopfPeering", plural=CLUSTER_PEERING_PLURAL, scope="Cluster")


def namespaced_peering_crd() -> dict[str, Any]:
    """``KopfPeering``: used by operators restricted to a list of namespaces."""
    return _peering_crd(kind="KopfPeering", plural=NAMESPACED_PEERING_PLURAL, scope="Namespaced")
