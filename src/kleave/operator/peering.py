"""kopf peering: the CRDs it needs, and a pre-flight check that they and our peering object exist.

kopf keeps several operator replicas from handling the same objects by "peering": each replica
writes a keep-alive with its priority into the ``status`` of a peering object (``KopfPeering``
per namespace for namespaced operators, ``ClusterKopfPeering`` for cluster-wide ones, group
``kopf.dev``); a replica that sees a live peer with a higher priority pauses.

kopf's behaviour when peering is mandatory (a peering name is given) but the CRD or the named
object is missing is to pause every watch-stream and log that only at DEBUG level: the
operator looks alive and does nothing. :func:`ensure_peering` runs before kopf starts, fails
with one actionable line when the CRD is missing, and creates the peering object when it is
absent (replicas racing to create it are fine: a conflict means it exists).

The CRDs themselves are generated with kleave's (``kleave.api.kopf_peering``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from kubernetes import client

from kleave.api.kopf_peering import (
    CLUSTER_PEERING_PLURAL,
    NAMESPACED_PEERING_PLURAL,
    PEERING_GROUP,
    PEERING_VERSION,
)

# Not kopf's "default": operators sharing one peering object pause each other, so an unrelated
# kopf operator in the same cluster must not share kleave's.
DEFAULT_PEERING_NAME = "kleave"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_REQUEST_TIMEOUT_S = 15


class PeeringSetupError(RuntimeError):
    """Peering cannot work in this cluster; the message says what to do about it."""


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
    api_client: Any,
) -> list[str]:
    """Check the peering CRD is served and create missing peering objects; return those created.

    ``api_client`` is a ``kubernetes.client.ApiClient``. Raises :class:`PeeringSetupError`.
    """
    targets: list[str | None] = [None] if clusterwide else list(literal_namespaces(namespaces))
    plural = CLUSTER_PEERING_PLURAL if clusterwide else NAMESPACED_PEERING_PLURAL
    api = client.CustomObjectsApi(api_client)
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
            if error.status == 404 and namespace is not None:  # the namespace, not the object
                raise PeeringSetupError(
                    f"namespace {namespace} does not exist: create it or stop watching it"
                ) from None
            raise PeeringSetupError(
                _api_failure("get or create", f"{plural}.{PEERING_GROUP} {where}", error)
            ) from None
        except Exception as error:
            raise PeeringSetupError(
                f"cannot reach the Kubernetes API: {_one_line(error)}"
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


def _api_failure(action: str, what: str, error: Any) -> str:
    if error.status == 403:
        return f"forbidden to {action} {what}: grant the operator's service account access to it"
    return f"cannot {action} {what}: HTTP {error.status} {error.reason}"


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:300] if text else type(error).__name__
