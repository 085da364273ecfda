"""kopf peering: the CRDs it needs, and a pre-flight check that they and our peering object exist.

kopf keeps several operator replicas from handling the same objects by "peering": each replica
writes a keep-alive with its priority into the ``status`` of a peering object (``KopfPeering``
per namespace for namespaced operators, ``ClusterKopfPeering`` for cluster-wide ones, group
``kopf.dev``); a replica that sees a live peer with a higher priority pauses. The CRDs below are
the ones kopf documents (its ``peering.yaml``).

kopf's behaviour when peering is mandatory (a peering name is given) but the CRD or the named
object is missing is to pause every watch-stream and log that only at DEBUG level: the
operator looks alive and does nothing. :func:`ensure_peering` runs before kopf starts, fails
with one actionable line when the CRD is missing, and creates the peering object when it is
absent (replicas racing to create it are fine: a conflict means it exists).

The CRDs join ``crds/`` through :func:`register_peering_crds`, which the CRD generator calls
explicitly; importing this module registers nothing, so the output never depends on which
modules happened to be imported first.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from kubernetes import client, config

from kleave.api.registry import register_static_crd

PEERING_GROUP = "kopf.dev"
PEERING_VERSION = "v1"
CLUSTER_PEERING_PLURAL = "clusterkopfpeerings"
NAMESPACED_PEERING_PLURAL = "kopfpeerings"
# Not kopf's "default": operators sharing one peering object pause each other, so an unrelated
# kopf operator in the same cluster must not share kleave's.
DEFAULT_PEERING_NAME = "kleave"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_REQUEST_TIMEOUT_S = 15


class PeeringSetupError(RuntimeError):
    """Peering cannot work in this cluster; the message says what to do about it."""


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


# File names follow the generator's ``<group>_<plural>.yaml`` convention.
PEERING_CRD_FILES: dict[str, dict[str, Any]] = {
    f"{PEERING_GROUP}_{CLUSTER_PEERING_PLURAL}.yaml": cluster_peering_crd(),
    f"{PEERING_GROUP}_{NAMESPACED_PEERING_PLURAL}.yaml": namespaced_peering_crd(),
}

_registered = False


def register_peering_crds() -> None:
    """Add both peering CRDs to the CRD registry, once; safe to call repeatedly."""
    global _registered  # noqa: PLW0603 (a once-only flag is the point)
    if _registered:
        return
    for filename, crd in PEERING_CRD_FILES.items():
        register_static_crd(filename, crd)
    _registered = True


def peering_object(name: str, namespace: str | None) -> dict[str, Any]:
    """The manifest of a peering object: cluster-scoped when ``namespace`` is None."""
    metadata: dict[str, Any] = {"name": name}
    if namespace is None:
        kind = "ClusterKopfPeering"
    else:
        kind = "KopfPeering"
        metadata["namespace"] = namespace
    return {"apiVersion": f"{PEERING_GROUP}/{PEERING_VERSION}", "kind": kind, "metadata": metadata}


def literal_namespaces(namespaces: Iterable[str]) -> list[str]:
    """Return the namespaces, or fail if any is a kopf pattern (glob, negation, list).

    A pattern's namespaces are only known once kopf runs, so their peering objects cannot be
    checked up front, and kopf would sit paused in each one that lacks an object.
    """
    result = list(namespaces)
    patterns = [ns for ns in result if not _DNS_LABEL.match(ns)]
    if patterns:
        raise PeeringSetupError(
            f"namespace patterns {', '.join(patterns)} cannot be used with peering: "
            "list the namespaces by name, use --all-namespaces, or pass --standalone"
        )
    return result


def ensure_peering(
    *,
    name: str,
    clusterwide: bool,
    namespaces: Iterable[str],
    api_client: Any = None,
) -> list[str]:
    """Check the peering CRD is served and create missing peering objects; return those created.

    ``api_client`` is a ``kubernetes.client.ApiClient``; by default one is built the way kopf's
    own login does it (in-cluster service account first, then the kubeconfig).
    """
    targets: list[str | None] = [None] if clusterwide else list(literal_namespaces(namespaces))
    plural = CLUSTER_PEERING_PLURAL if clusterwide else NAMESPACED_PEERING_PLURAL
    api = client.CustomObjectsApi(api_client if api_client is not None else _default_api_client())
    missing_crd = (
        f"peering CRD {plural}.{PEERING_GROUP} is not installed: "
        "apply crds/ (kubectl apply -f crds/) or pass --standalone"
    )

    try:
        resources = api.get_api_resources(
            PEERING_GROUP, PEERING_VERSION, _request_timeout=_REQUEST_TIMEOUT_S
        )
    except client.ApiException as error:
        if error.status == 404:
            raise PeeringSetupError(missing_crd) from None
        raise PeeringSetupError(_api_failure("discover", PEERING_GROUP, error)) from None
    except Exception as error:
        raise PeeringSetupError(f"cannot reach the Kubernetes API: {_one_line(error)}") from None
    if plural not in {resource.name for resource in resources.resources or ()}:
        raise PeeringSetupError(missing_crd)

    created: list[str] = []
    for namespace in targets:
        where = f"{namespace}/{name}" if namespace else name
        try:
            if _create_if_absent(api, name=name, namespace=namespace, plural=plural):
                created.append(where)
        except client.ApiException as error:
            raise PeeringSetupError(
                _api_failure("get or create", f"{plural}.{PEERING_GROUP} {where}", error)
            ) from None
    return created


def _create_if_absent(api: Any, *, name: str, namespace: str | None, plural: str) -> bool:
    group, version, timeout = PEERING_GROUP, PEERING_VERSION, _REQUEST_TIMEOUT_S
    try:
        if namespace is None:
            api.get_cluster_custom_object(group, version, plural, name, _request_timeout=timeout)
        else:
            api.get_namespaced_custom_object(
                group, version, namespace, plural, name, _request_timeout=timeout
            )
        return False
    except client.ApiException as error:
        if error.status != 404:
            raise
    body = peering_object(name, namespace)
    try:
        if namespace is None:
            api.create_cluster_custom_object(group, version, plural, body, _request_timeout=timeout)
        else:
            api.create_namespaced_custom_object(
                group, version, namespace, plural, body, _request_timeout=timeout
            )
    except client.ApiException as error:
        if error.status == 409:  # another replica created it first
            return False
        raise
    return True


def _default_api_client() -> Any:
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        try:
            config.load_kube_config(client_configuration=configuration)
        except (config.ConfigException, OSError) as error:
            raise PeeringSetupError(
                f"no Kubernetes credentials (in-cluster or kubeconfig): {_one_line(error)}"
            ) from None
    configuration.retries = 1
    return client.ApiClient(configuration)


def _api_failure(action: str, what: str, error: Any) -> str:
    if error.status == 403:
        return f"forbidden to {action} {what}: grant the operator's service account access to it"
    return f"cannot {action} {what}: HTTP {error.status} {error.reason}"


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:300] if text else type(error).__name__
