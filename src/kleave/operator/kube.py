"""A small async Kubernetes API client: server-side apply, get, list, delete, status patches.

kopf watches; this client writes. It is async (aiohttp, which kopf already uses) so hundreds of
reconciles share one event loop and one connection pool instead of blocking threads, and it
speaks server-side apply directly, which the generated ``kubernetes`` client does not.
Credentials come from the same places kopf finds them (in-cluster, else the kubeconfig).
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from kubernetes import client, config

FIELD_MANAGER = "kleave"


@dataclass(frozen=True)
class ResourceType:
    """Where a kind lives in the REST API."""

    api_version: str
    kind: str
    plural: str
    namespaced: bool = True

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    @property
    def version(self) -> str:
        return self.api_version.rpartition("/")[2]

    def path(
        self, namespace: str | None = None, name: str | None = None, subresource: str = ""
    ) -> str:
        """The REST path of the collection, or of one object (and its subresource)."""
        root = f"/apis/{self.api_version}" if self.group else f"/api/{self.api_version}"
        if self.namespaced and namespace is not None:
            root += f"/namespaces/{namespace}"
        root += f"/{self.plural}"
        if name is not None:
            root += f"/{name}"
            if subresource:
                root += f"/{subresource}"
        return root


DEPLOYMENT = ResourceType("apps/v1", "Deployment", "deployments")
STATEFULSET = ResourceType("apps/v1", "StatefulSet", "statefulsets")
SERVICE = ResourceType("v1", "Service", "services")
CONFIGMAP = ResourceType("v1", "ConfigMap", "configmaps")
POD = ResourceType("v1", "Pod", "pods")
NODE = ResourceType("v1", "Node", "nodes", namespaced=False)
EVENT = ResourceType("v1", "Event", "events")
INFERENCE_DEPLOYMENT = ResourceType(
    "kleave.dev/v1alpha1", "InferenceDeployment", "inferencedeployments"
)
INFERENCE_POOL = ResourceType("kleave.dev/v1alpha1", "InferencePool", "inferencepools")
SANDBOX_TEMPLATE = ResourceType("kleave.dev/v1alpha1", "SandboxTemplate", "sandboxtemplates")
SANDBOX_WARM_POOL = ResourceType("kleave.dev/v1alpha1", "SandboxWarmPool", "sandboxwarmpools")
AGENT_SANDBOX = ResourceType("kleave.dev/v1alpha1", "AgentSandbox", "agentsandboxes")
NETWORK_POLICY = ResourceType("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies")
RUNTIME_CLASS = ResourceType("node.k8s.io/v1", "RuntimeClass", "runtimeclasses", namespaced=False)
SECRET = ResourceType("v1", "Secret", "secrets")
PERSISTENT_VOLUME_CLAIM = ResourceType("v1", "PersistentVolumeClaim", "persistentvolumeclaims")
PERSISTENT_VOLUME = ResourceType("v1", "PersistentVolume", "persistentvolumes", namespaced=False)
STORAGE_CLASS = ResourceType(
    "storage.k8s.io/v1", "StorageClass", "storageclasses", namespaced=False
)
LEASE = ResourceType("coordination.k8s.io/v1", "Lease", "leases")

_BY_KIND = {
    (rt.api_version, rt.kind): rt
    for rt in (
        DEPLOYMENT,
        STATEFULSET,
        SERVICE,
        CONFIGMAP,
        POD,
        NODE,
        EVENT,
        INFERENCE_DEPLOYMENT,
        INFERENCE_POOL,
        SANDBOX_TEMPLATE,
        SANDBOX_WARM_POOL,
        AGENT_SANDBOX,
        NETWORK_POLICY,
        RUNTIME_CLASS,
    )
}


def resource_of(obj: Mapping[str, Any]) -> ResourceType:
    """The resource type of a manifest, from its apiVersion and kind."""
    key = (str(obj.get("apiVersion")), str(obj.get("kind")))
    try:
        return _BY_KIND[key]
    except KeyError:
        raise ValueError(f"kleave does not manage {key[1]} ({key[0]})") from None


class ApiError(Exception):
    """The API server answered with an error status."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def conflict(self) -> bool:
        return self.status == 409

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def transient(self) -> bool:
        """Worth retrying as is: throttling, conflicts and server-side failures."""
        return self.status in (409, 429) or self.status >= 500


class KubeApi:
    """The API calls the controllers make, on one shared connection pool."""

    def __init__(self, configuration: client.Configuration) -> None:
        self._configuration = configuration
        self._base = configuration.host.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_environment(cls) -> KubeApi:
        """Credentials from the pod's service account, else the kubeconfig (``KUBECONFIG``)."""
        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        return cls(configuration)

    def _ssl_context(self) -> ssl.SSLContext | bool:
        cfg = self._configuration
        if not self._base.startswith("https"):
            return False
        context = ssl.create_default_context(cafile=cfg.ssl_ca_cert or None)
        if not cfg.verify_ssl:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if cfg.cert_file:
            context.load_cert_chain(cfg.cert_file, cfg.key_file)
        return context

    async def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl_context(), limit=64)
            timeout = aiohttp.ClientTimeout(total=60, connect=15)
            self._session = aiohttp.ClientSession(connector=connector, timeout=timeout)
        return self._session

    def _headers(self, content_type: str | None) -> dict[str, str]:
        cfg = self._configuration
        if cfg.refresh_api_key_hook is not None:
            cfg.refresh_api_key_hook(cfg)  # re-reads a rotated service-account token
        headers = {"Accept": "application/json"}
        token = cfg.get_api_key_with_prefix("BearerToken", alias="authorization")
        if token:
            headers["Authorization"] = token
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str | None = None,
        params: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """One API call; raises :class:`ApiError` on an error status."""
        session = await self._http()
        data = None if body is None else json.dumps(body)
        if data is not None and content_type is None:
            content_type = "application/json"
        async with session.request(
            method,
            self._base + path,
            data=data,
            params=dict(params or {}),
            headers=self._headers(content_type),
        ) as response:
            text = await response.text()
            payload: Any = json.loads(text) if text else {}
            if response.status >= 400:
                message = payload.get("message", text) if isinstance(payload, dict) else text
                reason = payload.get("reason", "") if isinstance(payload, dict) else ""
                raise ApiError(response.status, reason or response.reason or "", message)
            return payload if isinstance(payload, dict) else {}

    async def apply(
        self,
        obj: Mapping[str, Any],
        *,
        field_manager: str = FIELD_MANAGER,
        force: bool = True,
        subresource: str = "",
    ) -> dict[str, Any]:
        """Server-side apply: the object's fields become ``field_manager``'s.

        ``force`` takes over fields another manager set (the operator owns its children);
        put ``metadata.resourceVersion`` in ``obj`` to make the apply conditional.
        """
        rt = resource_of(obj)
        meta = obj["metadata"]
        params = {"fieldManager": field_manager, "force": "true" if force else "false"}
        return await self.request(
            "PATCH",
            rt.path(meta.get("namespace"), meta["name"], subresource),
            body=obj,
            content_type="application/apply-patch+yaml",
            params=params,
        )

    async def get(
        self, rt: ResourceType, namespace: str | None, name: str
    ) -> dict[str, Any] | None:
        try:
            return await self.request("GET", rt.path(namespace, name))
        except ApiError as error:
            if error.not_found:
                return None
            raise

    async def list(
        self, rt: ResourceType, *, label_selector: str = "", page_size: int = 500
    ) -> AsyncIterator[dict[str, Any]]:
        """Every object of a type in all namespaces, fetched in pages."""
        token = ""
        while True:
            params = {"limit": str(page_size)}
            if label_selector:
                params["labelSelector"] = label_selector
            if token:
                params["continue"] = token
            page = await self.request("GET", rt.path(), params=params)
            for item in page.get("items", []):
                item.setdefault("apiVersion", rt.api_version)
                item.setdefault("kind", rt.kind)
                yield item
            token = page.get("metadata", {}).get("continue", "")
            if not token:
                return

    async def delete(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        *,
        uid: str | None = None,
        resource_version: str | None = None,
    ) -> bool:
        """Delete in the background (children go by garbage collection); False if absent.

        ``uid`` makes it conditional, so a same-named replacement is never deleted by mistake;
        ``resource_version`` too, so an object changed since it was read (a warm pod claimed
        meanwhile) is not deleted either. A failed precondition answers False, as absence does.
        """
        body: dict[str, Any] = {"propagationPolicy": "Background"}
        preconditions = {
            key: value
            for key, value in (("uid", uid), ("resourceVersion", resource_version))
            if value
        }
        if preconditions:
            body["preconditions"] = preconditions
        try:
            await self.request("DELETE", rt.path(namespace, name), body=body)
        except ApiError as error:
            if error.not_found or error.conflict:
                return False
            raise
        return True

    async def patch_status(
        self, rt: ResourceType, namespace: str | None, name: str, status: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Merge-patch only the given status fields (None deletes a field)."""
        return await self.request(
            "PATCH",
            rt.path(namespace, name, "status"),
            body={"status": dict(status)},
            content_type="application/merge-patch+json",
        )

    async def create(self, rt: ResourceType, namespace: str | None, obj: Any) -> dict[str, Any]:
        return await self.request("POST", rt.path(namespace), body=obj)

    async def merge_patch(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        patch: Mapping[str, Any],
        subresource: str = "",
    ) -> dict[str, Any]:
        return await self.request(
            "PATCH",
            rt.path(namespace, name, subresource),
            body=dict(patch),
            content_type="application/merge-patch+json",
        )

    async def watch(
        self,
        rt: ResourceType,
        *,
        namespace: str | None = None,
        resource_version: str = "",
        field_selector: str = "",
        label_selector: str = "",
        timeout_seconds: int = 60,
    ) -> AsyncIterator[dict[str, Any]]:
        """One watch request: its events (``{"type", "object"}``) until the server ends it.

        Bookmarks are asked for, so a quiet watch still advances ``resourceVersion``. A
        resourceVersion too old to watch from (410 Gone, as an error status or as an ``ERROR``
        event) raises :class:`ApiError` with status 410: the caller lists again. Lines are
        split here rather than by aiohttp's ``readline``, which refuses lines over 64 KiB.
        """
        params = {
            "watch": "1",
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
        }
        for key, value in (
            ("resourceVersion", resource_version),
            ("fieldSelector", field_selector),
            ("labelSelector", label_selector),
        ):
            if value:
                params[key] = value
        session = await self._http()
        # The session's 60 s total would cut every watch short; only a silent stream is an error.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=15, sock_read=timeout_seconds + 30)
        async with session.get(
            self._base + rt.path(namespace),
            params=params,
            headers=self._headers(None),
            timeout=timeout,
        ) as response:
            if response.status >= 400:
                text = await response.text()
                payload: Any = json.loads(text) if text.startswith("{") else {}
                raise ApiError(
                    response.status,
                    str(payload.get("reason", response.reason or "")),
                    str(payload.get("message", text)),
                )
            buffer = b""
            async for chunk in response.content.iter_any():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if event.get("type") == "ERROR":
                        status = event.get("object") or {}
                        raise ApiError(
                            int(status.get("code", 500)),
                            str(status.get("reason", "")),
                            str(status.get("message", "watch error")),
                        )
                    yield event
