"""The Kubernetes half of the sandbox SDK: credentials, requests, manifests and the wait logic.

Credentials come from the ``kubernetes`` package's loaders (kubeconfig or the pod's service
account) into a ``Configuration``; the calls themselves go over httpx, so the async SDK never
blocks its event loop in the ``kubernetes`` client's urllib3 calls.

Waiting is the part that decides claim latency in the benchmark, so it watches rather than
polls: :func:`wait_driver` is a pure generator that says what to do next (get, watch, read
the next watch line, sleep) and decides from the answers; the sync and async clients each run
it with their own I/O. It reconnects a watch that ended, relists when the API server says the
resourceVersion is too old (410), and falls back to polling when watches keep failing or are
not allowed.
"""

from __future__ import annotations

import base64
import json
import math
import os
import ssl
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kleave.sandbox.client_runtime import RuntimeCalls, audit_anchor, normalize_endpoint
from kleave.sandbox.client_types import HttpRequest, KubeApiError, SandboxError, SandboxTimeout

GROUP = "kleave.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KLEAVE_API = f"/apis/{API_VERSION}"
CORE_API = "/api/v1"
SANDBOXES = "agentsandboxes"
TEMPLATES = "sandboxtemplates"
WARM_POOLS = "sandboxwarmpools"
RESUME_ANNOTATION = "kleave.dev/resume-requested"
"""Asks the operator to resume a sandbox an idle timeout paused (its spec.mode is still
Running, so no spec change could say so)."""
MERGE_PATCH = "application/merge-patch+json"
LIFETIME_FIELDS = {
    "idle_timeout_seconds": "idleTimeoutSeconds",
    "max_lifetime_seconds": "maxLifetimeSeconds",
    "ttl_seconds_after_finished": "ttlSecondsAfterFinished",
}
POLL_SECONDS = 0.25
"""Polling interval once watches are given up on: a GET is cheap, and a claim takes tens of
milliseconds, so a slower poll would dominate what the benchmark measures."""
WATCH_FAILURES_BEFORE_POLLING = 3
PERMANENT_STATUSES = frozenset({400, 401, 403, 422})


# ----- credentials ----------------------------------------------------------------------------
@dataclass
class KubeConnection:
    """Where the API server is and how to authenticate, from a kubernetes ``Configuration``."""

    server: str
    verify: ssl.SSLContext | bool
    configuration: Any

    def headers(self) -> dict[str, str]:
        """Auth headers, fetched per request: the loaders' refresh hooks re-read rotated
        service-account tokens and renew exec-plugin tokens."""
        token = self.configuration.get_api_key_with_prefix("BearerToken", alias="authorization")
        return {"Authorization": token} if token else {}


def load_connection(kubeconfig: str | None = None, context: str | None = None) -> KubeConnection:
    """Credentials for the cluster the caller means.

    An explicit ``kubeconfig`` or ``context``, else ``$KUBECONFIG`` when set (someone chose a
    cluster on purpose, even inside a pod), else the pod's service account, else
    ``~/.kube/config``.
    """
    from kubernetes import client, config

    configuration = client.Configuration()
    config_file = kubeconfig or os.environ.get("KUBECONFIG") or None
    try:
        if config_file is None and context is None:
            try:
                config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            except config.ConfigException:
                config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        else:
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=config_file, context=context, client_configuration=configuration
            )
    except (config.ConfigException, OSError) as error:
        raise SandboxError(
            f"no Kubernetes credentials ({error}): set KUBECONFIG, pass kubeconfig=, or run "
            "in a pod with a service account"
        ) from None
    server = str(configuration.host).rstrip("/")
    return KubeConnection(server, _ssl_context(server, configuration), configuration)


def _ssl_context(server: str, configuration: Any) -> ssl.SSLContext | bool:
    if not server.startswith("https"):
        return False
    context = ssl.create_default_context(cafile=configuration.ssl_ca_cert or None)
    if not configuration.verify_ssl:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if configuration.cert_file:
        context.load_cert_chain(configuration.cert_file, configuration.key_file)
    return context


# ----- requests -------------------------------------------------------------------------------
def resource_path(
    plural: str,
    *,
    namespace: str | None = None,
    name: str | None = None,
    subresource: str | None = None,
    api: str = KLEAVE_API,
) -> str:
    """``/apis/kleave.dev/v1alpha1/namespaces/NS/PLURAL/NAME/SUB`` (or a core ``/api/v1`` one)."""
    path = api + (f"/namespaces/{namespace}" if namespace else "") + f"/{plural}"
    if name is not None:
        path += f"/{name}"
    if subresource is not None:
        path += f"/{subresource}"
    return path


class KubeCalls:
    """Requests against one API server; paths come from :func:`resource_path`."""

    def __init__(self, connection: KubeConnection) -> None:
        self.connection = connection
        self.target = f"the Kubernetes API server at {connection.server}"

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        read_timeout: float | None = 60.0,
    ) -> HttpRequest:
        headers = {"Accept": "application/json", **self.connection.headers()}
        content = None
        if body is not None:
            content = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        return HttpRequest(
            method,
            self.connection.server + path,
            self.target,
            params=dict(params or {}),
            headers=headers,
            content=content,
            read_timeout=read_timeout,
        )

    def watch(self, collection: str, params: Mapping[str, str], read_timeout: float) -> HttpRequest:
        return self.request("GET", collection, params=params, read_timeout=read_timeout)


def check_kube(status: int, body: bytes) -> None:
    """Raise :class:`KubeApiError` for an error answer, with the API server's own message."""
    if status < 400:
        return
    try:
        payload = json.loads(body) if body else {}
    except ValueError:
        payload = {}
    if not isinstance(payload, dict):
        payload = {}
    message = str(payload.get("message") or body[:500].decode(errors="replace"))
    raise KubeApiError(status, str(payload.get("reason") or ""), message)


def kube_object(status: int, body: bytes) -> dict[str, Any]:
    """The JSON object of a successful answer."""
    check_kube(status, body)
    payload = json.loads(body) if body else {}
    if not isinstance(payload, dict):
        raise SandboxError(f"the API server answered a non-object: {payload!r}")
    return payload


# ----- manifests ------------------------------------------------------------------------------
def sandbox_manifest(
    namespace: str,
    name: str | None = None,
    *,
    warm_pool: str | None = None,
    template: str | None = None,
    env: Mapping[str, str] | None = None,
    lifetime: Mapping[str, int] | None = None,
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """An AgentSandbox to create; checks here what the API server would refuse less clearly."""
    if (warm_pool is None) == (template is None):
        raise ValueError("give exactly one of warm_pool= (adopt a warm sandbox) or template=")
    metadata: dict[str, Any] = {"namespace": namespace}
    if name:
        metadata["name"] = name
    else:
        metadata["generateName"] = "sbx-"
    if labels:
        metadata["labels"] = dict(labels)
    spec: dict[str, Any] = (
        {"warmPoolRef": {"name": warm_pool}} if warm_pool else {"templateRef": {"name": template}}
    )
    if env:
        spec["env"] = [{"name": str(k), "value": str(v)} for k, v in env.items()]
    if lifetime:
        spec["lifetime"] = _lifetime(lifetime)
    return {"apiVersion": API_VERSION, "kind": "AgentSandbox", "metadata": metadata, "spec": spec}


def _lifetime(lifetime: Mapping[str, int]) -> dict[str, int]:
    known = set(LIFETIME_FIELDS.values())
    out: dict[str, int] = {}
    for key, value in lifetime.items():
        field = LIFETIME_FIELDS.get(key, key)
        if field not in known:
            raise ValueError(f"unknown lifetime field {key!r}: use one of {sorted(known)}")
        out[field] = int(value)
    return out


def pause_patch() -> dict[str, Any]:
    return {"spec": {"mode": "Paused"}}


def resume_patch(now: datetime | None = None) -> dict[str, Any]:
    """Running again, plus the resume request an idle-paused sandbox needs (RFC 3339, ms, UTC)."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    stamp = moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {"metadata": {"annotations": {RESUME_ANNOTATION: stamp}}, "spec": {"mode": "Running"}}


# ----- reading a sandbox's status -------------------------------------------------------------
def conditions_of(obj: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {c.get("type", ""): c for c in (obj.get("status") or {}).get("conditions") or []}


def describe(obj: Mapping[str, Any] | None) -> str:
    """``phase Starting; Ready=False (PodStarting: ...); Degraded=...`` for error messages."""
    if obj is None:
        return "no object seen"
    status = obj.get("status") or {}
    if not status:
        return "no status yet"
    parts = [f"phase {status['phase']}"] if status.get("phase") else []
    for kind, condition in conditions_of(obj).items():
        text = f"{kind}={condition.get('status')}"
        reason, message = condition.get("reason"), condition.get("message")
        if reason or message:
            text += f" ({': '.join(str(p) for p in (reason, message) if p)})"
        parts.append(text)
    return "; ".join(parts)


def observed(obj: Mapping[str, Any]) -> bool:
    """The status reflects the latest spec (observedGeneration has caught up).

    Without this a pause would count as done on a status written before the pause was asked.
    A status without observedGeneration is taken as current: there is nothing to compare.
    """
    generation = (obj.get("metadata") or {}).get("generation")
    seen = (obj.get("status") or {}).get("observedGeneration")
    return generation is None or seen is None or int(seen) >= int(generation)


def phase_of(obj: Mapping[str, Any]) -> str:
    return str((obj.get("status") or {}).get("phase") or "")


def is_ready(obj: Mapping[str, Any]) -> bool:
    status = obj.get("status") or {}
    return status.get("phase") == "Ready" and bool(status.get("endpoint")) and observed(obj)


def is_paused(obj: Mapping[str, Any]) -> bool:
    return phase_of(obj) == "Paused" and observed(obj)


def sandbox_failure(obj: Mapping[str, Any]) -> str | None:
    """Why a sandbox will not become Ready or Paused, or None while it still may."""
    name = (obj.get("metadata") or {}).get("name", "?")
    phase = phase_of(obj)
    if phase == "Failed":
        return f"sandbox {name} failed: {_why(obj)}"
    if phase == "Terminating" or (obj.get("metadata") or {}).get("deletionTimestamp"):
        return f"sandbox {name} is being deleted or has expired: {_why(obj)}"
    return None


def pause_failure(obj: Mapping[str, Any]) -> str | None:
    """Also the operator refusing the pause (persistence disabled), which it never retries."""
    degraded = conditions_of(obj).get("Degraded") or {}
    if (
        degraded.get("status") == "True"
        and degraded.get("reason") == "PersistenceDisabled"
        and observed(obj)
    ):
        name = (obj.get("metadata") or {}).get("name", "?")
        return f"sandbox {name} cannot be paused: {degraded.get('message') or 'no persistence'}"
    return sandbox_failure(obj)


def _why(obj: Mapping[str, Any]) -> str:
    conditions = conditions_of(obj)
    for kind in ("Degraded", "Ready"):
        condition = conditions.get(kind) or {}
        if condition.get("message") or condition.get("reason"):
            reason, message = condition.get("reason"), condition.get("message")
            return f"phase {phase_of(obj)}, {kind}: {reason or ''} {message or ''}".strip()
    return describe(obj)


def runtime_gate(obj: Mapping[str, Any], auto_resume: bool) -> str:
    """Before a runtime call: ``"go"``, ``"resume"`` first, or ``"wait"`` for Ready first.

    A paused sandbox has no pod to answer, so a call either resumes it (the client's
    ``auto_resume``) or fails saying how to proceed, rather than timing out on a dead address.
    """
    status = obj.get("status") or {}
    phase = status.get("phase") or ""
    name = (obj.get("metadata") or {}).get("name", "?")
    if phase == "Ready" and status.get("endpoint"):
        return "go"
    if phase in ("Paused", "Pausing"):
        if auto_resume:
            return "resume"
        raise SandboxError(
            f"sandbox {name} is {phase}: call resume() first (or make the client with "
            "auto_resume=True, the default, to resume it on the next call)"
        )
    if message := sandbox_failure(obj):
        raise SandboxError(message)
    return "wait"


# ----- waiting --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Get:
    """GET the object: answer with it, None when it does not exist, or an :class:`IoFailure`."""


@dataclass(frozen=True)
class Watch:
    """Open a watch with these params: answer with :class:`WatchOpened` or an IoFailure."""

    params: Mapping[str, str]
    read_timeout: float


@dataclass(frozen=True)
class NextLine:
    """Read the open watch's next line: answer with it, None at its end, or an IoFailure."""


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class WatchOpened:
    status: int
    body: bytes = b""
    """The error answer's body; empty on 200 (the lines follow through NextLine)."""


@dataclass(frozen=True)
class IoFailure:
    """The I/O failed; handed to the driver as a value so it decides whether to retry."""

    error: SandboxError


WaitAction = Get | Watch | NextLine | Sleep
GET = Get()
NEXT_LINE = NextLine()


class ObjectWait:
    """What a wait is for and what it has seen so far; the driver's decisions read it."""

    def __init__(
        self,
        label: str,
        name: str,
        what: str,
        goal: Callable[[Mapping[str, Any]], bool],
        timeout: float,
        *,
        failure: Callable[[Mapping[str, Any]], str | None] | None = None,
        until_deleted: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.name = name
        self.what = what
        self.goal = goal
        self.failure = failure
        self.until_deleted = until_deleted
        self.timeout = timeout
        self.clock = clock
        self.deadline = clock() + timeout
        self.last: dict[str, Any] | None = None
        self.resource_version: str | None = None
        self.last_error: SandboxError | None = None

    def remaining(self) -> float:
        return self.deadline - self.clock()

    def observe(self, obj: dict[str, Any] | None) -> bool:
        """Whether the wait is over; raises when it can never be."""
        if obj is None:
            if self.until_deleted:
                return True
            raise SandboxError(
                f"{self.label} {self.name} was deleted while waiting for {self.what}"
            )
        self.last = obj
        self.resource_version = (obj.get("metadata") or {}).get("resourceVersion")
        if self.until_deleted:
            return False
        if self.failure is not None and (message := self.failure(obj)):
            raise SandboxError(message)
        return self.goal(obj)

    def on_line(self, line: str) -> str | None:
        """One watch event: ``"done"``, ``"relist"`` (resourceVersion too old) or None."""
        if not line.strip():
            return None
        event = json.loads(line)
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "BOOKMARK":
            self.resource_version = (obj.get("metadata") or {}).get("resourceVersion")
            return None
        if kind == "ERROR":  # 410 Gone in practice: the rv was compacted away
            return "relist"
        if kind == "DELETED":
            return "done" if self.observe(None) else None
        return "done" if self.observe(obj) else None

    def watch_params(self) -> dict[str, str]:
        params = {
            "watch": "1",
            "fieldSelector": f"metadata.name={self.name}",
            "allowWatchBookmarks": "true",
            # The server ends the watch at the deadline, so a blocking client never overruns.
            "timeoutSeconds": str(max(1, math.ceil(self.remaining()))),
        }
        if self.resource_version:
            params["resourceVersion"] = self.resource_version
        return params

    def timeout_error(self) -> SandboxTimeout:
        message = (
            f"timed out after {self.timeout:.0f}s waiting for {self.label} {self.name} to be "
            f"{self.what}: {describe(self.last)}"
        )
        if self.last_error is not None:
            message += f" (last error: {self.last_error})"
        return SandboxTimeout(message, (self.last or {}).get("status"))


def _permanent(failure: IoFailure) -> bool:
    error = failure.error
    return isinstance(error, KubeApiError) and error.status in PERMANENT_STATUSES


def wait_driver(
    wait: ObjectWait, initial: dict[str, Any] | None = None
) -> Generator[WaitAction, Any, dict[str, Any] | None]:
    """Decide every step of a wait; returns the last object seen (None: never seen, gone).

    The sync and async clients each run it (``_run_wait``): they perform each action and send
    back what it asked for, I/O errors included as :class:`IoFailure` values. ``initial``
    (the object a create or patch returned) saves the first GET.
    """
    if initial is not None and wait.observe(initial):
        return wait.last
    need_list = initial is None
    polling = False
    failures = 0
    while True:
        remaining = wait.remaining()
        if remaining <= 0:
            raise wait.timeout_error()
        if polling or need_list:
            if polling and not need_list:
                yield Sleep(min(POLL_SECONDS, remaining))
            answer = yield GET
            if isinstance(answer, IoFailure):
                if _permanent(answer):
                    raise answer.error
                wait.last_error = answer.error
                failures += 1
                polling = polling or failures >= WATCH_FAILURES_BEFORE_POLLING
                yield Sleep(min(POLL_SECONDS * failures, max(wait.remaining(), 0)))
                continue
            need_list = False
            if wait.observe(answer):
                return wait.last
            if polling:
                continue
        opened = yield Watch(wait.watch_params(), read_timeout=remaining + 15)
        if isinstance(opened, WatchOpened) and opened.status == 200:
            lines = 0
            while True:
                line = yield NEXT_LINE
                if isinstance(line, IoFailure):
                    wait.last_error = line.error
                    failures += 1
                    need_list = True
                    break
                if line is None:  # the server ended the watch: resume from the last rv
                    if not lines and wait.remaining() > 0:
                        failures += 1  # ended early with nothing: do not spin on it
                    break
                lines, failures = lines + 1, 0
                step = wait.on_line(line)
                if step == "done":
                    return wait.last
                if step == "relist":
                    need_list = True
                    break
        elif isinstance(opened, WatchOpened) and opened.status in (403, 405):
            polling = True  # this user may get but not watch, or the server will not watch
        elif isinstance(opened, WatchOpened) and opened.status == 410:
            need_list = True
        else:
            failure = (
                opened
                if isinstance(opened, IoFailure)
                else IoFailure(_kube_error(opened.status, opened.body))
            )
            if _permanent(failure):
                raise failure.error
            wait.last_error = failure.error
            failures += 1
            need_list = True
        if failures >= WATCH_FAILURES_BEFORE_POLLING:
            polling = True
        elif failures:
            yield Sleep(min(0.1 * 2**failures, max(wait.remaining(), 0)))


def _kube_error(status: int, body: bytes) -> SandboxError:
    try:
        check_kube(status, body)
    except KubeApiError as error:
        return error
    return SandboxError(f"unexpected watch answer {status}")


def token_from_secret(secret: Mapping[str, Any] | None) -> tuple[str | None, str | None]:
    """(token, pod) from the Secret ``status.tokenSecretName`` names (``<pod>-runtime-token``)."""
    data = (secret or {}).get("data") or {}

    def decoded(key: str) -> str | None:
        value = data.get(key)
        return base64.b64decode(value).decode() if value else None

    return decoded("token"), decoded("pod")


# ----- the sandbox as last read ---------------------------------------------------------------
class SandboxView:
    """What the sync and async ``Sandbox`` share: the last-read object and its endpoint."""

    def __init__(self, obj: dict[str, Any], fixed_endpoint: str | None, token: str | None) -> None:
        self._obj = obj
        self._token = token
        self._fixed = RuntimeCalls(fixed_endpoint, token) if fixed_endpoint is not None else None
        self._secret_token: tuple[str, str, str | None] | None = None
        """(Secret name, pod, token) last read from ``status.tokenSecretName``."""

    @property
    def name(self) -> str:
        return str((self._obj.get("metadata") or {}).get("name", ""))

    @property
    def object(self) -> dict[str, Any]:
        """The whole AgentSandbox as last read."""
        return self._obj

    @property
    def status(self) -> dict[str, Any]:
        """``status`` as last read (phase, endpoint, claim, snapshot, auditHead, conditions)."""
        status: dict[str, Any] = self._obj.get("status") or {}
        return status

    @property
    def phase(self) -> str:
        return phase_of(self._obj)

    @property
    def endpoint(self) -> str:
        """The runtime's base URL: ``http://`` + ``status.endpoint`` (``host:port``), or the
        URL the status or :meth:`from_endpoint` gave."""
        if self._fixed is not None:
            return self._fixed.endpoint
        raw = self.status.get("endpoint")
        if not raw:
            raise SandboxError(f"sandbox {self.name} has no endpoint (phase {self.phase or '?'})")
        return normalize_endpoint(str(raw))

    def _runtime_calls(self, token: str | None) -> RuntimeCalls:
        return self._fixed or RuntimeCalls(self.endpoint, token)

    def _token_secret(self) -> str | None:
        """The Secret to read the runtime token from, or None when there is nothing to read:
        a token given to the client wins, and a sandbox without a token Secret needs none."""
        if self._fixed is not None or self._token is not None:
            return None
        secret = self.status.get("tokenSecretName")
        return str(secret) if secret else None

    def _cached_token(self, secret: str) -> tuple[bool, str | None]:
        """(found, token) for the current pod; each pod (a resume makes a new one) has its
        own token, so a cached one only serves the pod it was read for."""
        cached = self._secret_token
        pod = str(self.status.get("podName") or "")
        if cached is not None and cached[0] == secret and cached[1] == pod:
            return True, cached[2]
        return False, None

    def _remember_token(self, secret: str, found: Mapping[str, Any] | None) -> str | None:
        token, pod = token_from_secret(found)
        if token is not None and (pod is None or pod == self.status.get("podName")):
            self._secret_token = (secret, str(self.status.get("podName") or ""), token)
        return token

    def _forget_token(self) -> bool:
        """Drop a token read from the Secret; True when there was one (worth a retry)."""
        had = self._token_secret() is not None
        self._secret_token = None
        return had

    def _anchor(self, anchor: Mapping[str, Any] | tuple[int, str] | None) -> dict[str, Any] | None:
        return audit_anchor(anchor if anchor is not None else self.status.get("auditHead"))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} phase={self.phase or '-'}>"
