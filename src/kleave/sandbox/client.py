"""The Python SDK for kleave agent sandboxes: create, use, pause, resume and delete them.

    from kleave.sandbox.client import SandboxClient

    with SandboxClient(namespace="agents") as client:
        with client.create(warm_pool="python-coder") as sbx:   # deleted on exit
            sbx.write_file("main.py", "print('hi')")
            print(sbx.exec(["python3", "main.py"]).stdout)

``AsyncSandboxClient`` / ``AsyncSandbox`` (``kleave.sandbox.client_async``, re-exported here)
have the same methods as coroutines, for platforms driving many sandboxes from one event loop.

The SDK talks to two servers: the Kubernetes API server (AgentSandbox objects; credentials
from a kubeconfig or the pod's service account) and each sandbox's in-sandbox runtime at its
``status.endpoint`` (docs/sandbox-runtime.md). Request building, answer reading and the wait
logic are shared with the async half (``client_runtime``, ``client_kube``); this module only
runs them with blocking I/O. See docs/sandbox-sdk.md.
"""

from __future__ import annotations

import builtins
import contextlib
import time
import warnings
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import httpx

from kleave.sandbox.client_async import AsyncSandbox, AsyncSandboxClient
from kleave.sandbox.client_kube import (
    CORE_API,
    MERGE_PATCH,
    SANDBOXES,
    Get,
    IoFailure,
    KubeCalls,
    KubeConnection,
    NextLine,
    ObjectWait,
    SandboxView,
    Sleep,
    Watch,
    WatchOpened,
    is_paused,
    is_ready,
    kube_object,
    load_connection,
    pause_failure,
    pause_patch,
    resource_path,
    resume_patch,
    runtime_gate,
    sandbox_failure,
    sandbox_manifest,
    wait_driver,
)
from kleave.sandbox.client_runtime import (
    RuntimeCalls,
    check_answer,
    check_argv,
    collect_exec,
    exec_event,
    file_entries,
    json_lines,
    json_object,
)
from kleave.sandbox.client_transport import SyncStream, SyncTransport
from kleave.sandbox.client_types import (
    ExecResult,
    FileEntries,
    HttpRequest,
    KubeApiError,
    RuntimeRefused,
    SandboxError,
    SandboxTimeout,
    SandboxUnreachable,
)

__all__ = [
    "AsyncSandbox",
    "AsyncSandboxClient",
    "ExecResult",
    "FileEntries",
    "KubeApiError",
    "RuntimeRefused",
    "Sandbox",
    "SandboxClient",
    "SandboxError",
    "SandboxTimeout",
    "SandboxUnreachable",
]

DEFAULT_TIMEOUT = 120.0
RuntimeRequest = Callable[[RuntimeCalls], HttpRequest]


class SandboxClient:
    """AgentSandboxes in one namespace, and the connections to reach them.

    ``token`` is the bearer token sent on runtime calls (when the runtime runs with
    ``--token-file``). With ``auto_resume`` (default) a runtime call on a paused sandbox
    resumes it first; without, it raises a :class:`SandboxError` that says so.
    """

    def __init__(
        self,
        namespace: str = "default",
        kubeconfig: str | None = None,
        context: str | None = None,
        *,
        token: str | None = None,
        auto_resume: bool = True,
        connection: KubeConnection | None = None,
    ) -> None:
        self.namespace = namespace
        self.token = token
        self.auto_resume = auto_resume
        self.connection = connection or load_connection(kubeconfig, context)
        self.kube = KubeCalls(self.connection)
        self._kube_http = SyncTransport(self.connection.verify)
        # Sandbox endpoints are pod addresses: an HTTP(S)_PROXY meant for the internet must
        # not be asked to reach them.
        self.runtime_http = SyncTransport(trust_env=False)

    def __enter__(self) -> SandboxClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pools (the sandboxes keep running)."""
        self._kube_http.close()
        self.runtime_http.close()

    # ----- Kubernetes calls -------------------------------------------------------------------
    def kube_request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        missing_ok: bool = False,
    ) -> dict[str, Any] | None:
        """One API-server call (any kind, see ``client_kube.resource_path``); None for a 404
        when ``missing_ok``. Raises :class:`KubeApiError` with the server's message."""
        request = self.kube.request(
            method, path, params=params, body=body, content_type=content_type
        )
        response = self._kube_http.send(request)
        if missing_ok and response.status_code == 404:
            return None
        return kube_object(response.status_code, response.content)

    def _sandboxes(self, name: str | None = None) -> str:
        return resource_path(SANDBOXES, namespace=self.namespace, name=name)

    def _object(self, name: str) -> dict[str, Any]:
        found = self.kube_request("GET", self._sandboxes(name))
        assert found is not None
        return found

    def wait_for(
        self, collection: str, wait: ObjectWait, initial: dict[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """Run a wait on one object of ``collection`` (a list path): watch, relist, poll."""
        return _run_wait(self._kube_http, self.kube, collection, wait, initial)

    # ----- sandboxes --------------------------------------------------------------------------
    def create(
        self,
        name: str | None = None,
        *,
        warm_pool: str | None = None,
        template: str | None = None,
        env: Mapping[str, str] | None = None,
        lifetime: Mapping[str, int] | None = None,
        labels: Mapping[str, str] | None = None,
        wait: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Sandbox:
        """Create an AgentSandbox from a warm pool or a template (exactly one of them).

        Without ``name`` the API server picks one (``sbx-xxxxx``). With ``wait`` (default)
        it returns once the sandbox is Ready with an endpoint; a sandbox that fails raises
        :class:`SandboxError` with the operator's reason, and one still not Ready after
        ``timeout`` seconds raises :class:`SandboxTimeout` with its last phase and conditions.
        """
        manifest = sandbox_manifest(
            self.namespace,
            name,
            warm_pool=warm_pool,
            template=template,
            env=env,
            lifetime=lifetime,
            labels=labels,
        )
        created = self.kube_request("POST", self._sandboxes(), body=manifest)
        assert created is not None
        sandbox = Sandbox(created, self)
        if wait:
            sandbox.wait_ready(timeout, initial=created)
        return sandbox

    def get(self, name: str) -> Sandbox:
        """The AgentSandbox ``name`` as it is now (:class:`KubeApiError` 404 when absent)."""
        return Sandbox(self._object(name), self)

    def list(self, label_selector: str | None = None) -> builtins.list[Sandbox]:
        """Every AgentSandbox of the namespace (optionally those matching a label selector)."""
        params = {"labelSelector": label_selector} if label_selector else None
        listing = self.kube_request("GET", self._sandboxes(), params=params)
        assert listing is not None
        return [Sandbox(item, self) for item in listing.get("items", [])]


class Sandbox(SandboxView):
    """One sandbox: its AgentSandbox object (last read) and its runtime's API.

    Get one from :meth:`SandboxClient.create`, :meth:`SandboxClient.get` or
    :meth:`from_endpoint`. As a context manager it deletes the AgentSandbox on exit.
    """

    def __init__(
        self,
        obj: dict[str, Any],
        client: SandboxClient | None,
        *,
        endpoint: str | None = None,
        token: str | None = None,
        transport: SyncTransport | None = None,
    ) -> None:
        super().__init__(obj, endpoint, token if client is None else client.token)
        self._client = client
        if transport is not None:
            self._transport = transport
        elif client is not None:
            self._transport = client.runtime_http
        else:
            raise SandboxError("a Sandbox needs a client or an endpoint")
        self._owns_transport = transport is not None

    @classmethod
    def from_endpoint(cls, url: str, token: str | None = None) -> Sandbox:
        """A sandbox bound to a runtime you run yourself (``kleave sandbox runtime``).

        No AgentSandbox stands behind it: the runtime calls work, the Kubernetes ones
        (refresh, pause, resume, delete) raise. Close it (or use ``with``) to free its
        connections.
        """
        calls = RuntimeCalls(url, token)
        return cls(
            {"metadata": {"name": calls.endpoint}},
            None,
            endpoint=url,
            token=token,
            transport=SyncTransport(trust_env=False),
        )

    def _kube(self) -> SandboxClient:
        if self._client is None:
            raise SandboxError(
                f"{self.name} is a runtime endpoint, not an AgentSandbox: it has no "
                "Kubernetes object to read, pause, resume or delete"
            )
        return self._client

    def refresh(self) -> Sandbox:
        """Read the AgentSandbox again."""
        self._obj = self._kube()._object(self.name)
        return self

    def wait_ready(
        self, timeout: float = DEFAULT_TIMEOUT, *, initial: dict[str, Any] | None = None
    ) -> Sandbox:
        """Wait until the sandbox is Ready with an endpoint (watching its object)."""
        client = self._kube()
        wait = ObjectWait("sandbox", self.name, "Ready", is_ready, timeout, failure=sandbox_failure)
        found = client.wait_for(client._sandboxes(), wait, initial)
        self._obj = found or self._obj
        return self

    def pause(self, wait: bool = True, timeout: float = DEFAULT_TIMEOUT) -> Sandbox:
        """Snapshot the sandbox and free its pod (``spec.mode: Paused``); wait for Paused."""
        client = self._kube()
        patched = client.kube_request(
            "PATCH", client._sandboxes(self.name), body=pause_patch(), content_type=MERGE_PATCH
        )
        assert patched is not None
        self._obj = patched
        if wait:
            done = ObjectWait(
                "sandbox", self.name, "Paused", is_paused, timeout, failure=pause_failure
            )
            self._obj = client.wait_for(client._sandboxes(), done, patched) or self._obj
        return self

    def resume(self, wait: bool = True, timeout: float = DEFAULT_TIMEOUT) -> Sandbox:
        """Restore the snapshot into a fresh pod; wait for Ready and its new endpoint.

        Sets ``spec.mode: Running`` and the ``kleave.dev/resume-requested`` annotation: an
        idle timeout pauses a sandbox without changing its mode, and the annotation is how
        such a sandbox is asked to come back.
        """
        client = self._kube()
        patched = client.kube_request(
            "PATCH", client._sandboxes(self.name), body=resume_patch(), content_type=MERGE_PATCH
        )
        assert patched is not None
        self._obj = patched
        if wait:
            self.wait_ready(timeout, initial=patched)
        return self

    def delete(self, wait: bool = False, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Delete the AgentSandbox (its pod and volume go with it); optionally wait until gone."""
        client = self._kube()
        client.kube_request("DELETE", client._sandboxes(self.name), missing_ok=True)
        if wait:
            gone = ObjectWait("sandbox", self.name, "deleted", bool, timeout, until_deleted=True)
            client.wait_for(client._sandboxes(), gone)

    def close(self) -> None:
        """Free the connections of a :meth:`from_endpoint` sandbox (a no-op otherwise)."""
        if self._owns_transport:
            self._transport.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if self._client is not None:
                self.delete()
        except SandboxError as error:
            if exc is None:
                raise
            # The body's own exception matters more; do not hide it behind the cleanup's.
            warnings.warn(f"could not delete sandbox {self.name}: {error}", stacklevel=2)
        finally:
            self.close()

    # ----- runtime calls ----------------------------------------------------------------------
    def _calls(self) -> RuntimeCalls:
        if self._client is not None:
            step = runtime_gate(self._obj, self._client.auto_resume)
            if step == "resume":
                self.resume()
            elif step == "wait":
                self.wait_ready()
        return self._runtime_calls(self._current_token())

    def _current_token(self) -> str | None:
        """The runtime token: the client's, else the one the operator published for the
        current pod in ``status.tokenSecretName`` (reading Secrets needs RBAC ``get``)."""
        secret = self._token_secret()
        if secret is None or self._client is None:
            return self._token
        found, token = self._cached_token(secret)
        if found:
            return token
        path = resource_path("secrets", namespace=self._client.namespace, name=secret, api=CORE_API)
        answer = self._client.kube_request("GET", path, missing_ok=True)
        return self._remember_token(secret, answer)

    def _token_went_stale(self) -> bool:
        """After a 401: re-read the sandbox and its token once (a resume changed the pod)."""
        if not self._forget_token():
            return False
        self.refresh()
        return True

    def _moved(self) -> bool:
        """After a refused connection: did the sandbox move (idle-paused, new pod)? Then the
        call is worth one retry; the request never reached the runtime, so it cannot repeat."""
        if self._client is None:
            return False
        before = self.status.get("endpoint")
        self.refresh()
        return self.phase != "Ready" or self.status.get("endpoint") != before

    def _send(self, make: RuntimeRequest) -> tuple[RuntimeCalls, httpx.Response]:
        """Send one runtime call, retrying once where the first try cannot have done anything:
        no connection (the sandbox moved) or a 401 (its token changed with its pod)."""
        for attempt in (1, 2):
            calls = self._calls()
            try:
                response = self._transport.send(make(calls))
            except SandboxUnreachable:
                if attempt == 2 or not self._moved():
                    raise
                continue
            if response.status_code == 401 and attempt == 1 and self._token_went_stale():
                continue
            return calls, response
        raise AssertionError("unreachable")

    def _json(self, make: RuntimeRequest) -> dict[str, Any]:
        calls, response = self._send(make)
        return json_object(response.status_code, response.content, calls.endpoint)

    def _open(
        self, stack: contextlib.ExitStack, make: RuntimeRequest
    ) -> tuple[RuntimeCalls, SyncStream]:
        """Open a streamed runtime call, with the same one retry as :meth:`_send`."""
        for attempt in (1, 2):
            calls = self._calls()
            with contextlib.ExitStack() as attempt_stack:
                try:
                    opening = self._transport.stream(make(calls))
                    stream = attempt_stack.enter_context(opening)
                except SandboxUnreachable:
                    if attempt == 2 or not self._moved():
                        raise
                    continue
                if stream.status == 401 and attempt == 1 and self._token_went_stale():
                    continue
                stack.enter_context(attempt_stack.pop_all())
                return calls, stream
        raise AssertionError("unreachable")

    def health(self) -> dict[str, Any]:
        """``GET /healthz``: status, last activity, running commands, audit head."""
        return self._json(lambda c: c.health())

    def exec(
        self,
        argv: Sequence[str],
        *,
        cwd: str = ".",
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        stdin: str | bytes | None = None,
    ) -> ExecResult:
        """Run a command to its end (argv, not a shell string); its exit and output.

        A policy refusal raises :class:`RuntimeRefused` (``code`` says which rule); a
        command that runs and fails is a result with a non-zero ``code``.
        """
        events = list(self.exec_stream(argv, cwd=cwd, env=env, timeout=timeout, stdin=stdin))
        return collect_exec(events, self.endpoint)

    def exec_stream(
        self,
        argv: Sequence[str],
        *,
        cwd: str = ".",
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        stdin: str | bytes | None = None,
    ) -> Generator[dict[str, Any], None, None]:
        """The runtime's exec events as they come: start, stdout/stderr chunks, exit.

        Closing the iterator early (``break``) closes the connection, and the runtime kills
        the command: nothing outlives the stream that started it.
        """
        check_argv(argv)  # a bad argv fails here, not at the first next()

        def make(calls: RuntimeCalls) -> HttpRequest:
            return calls.exec(argv, cwd=cwd, env=env, timeout=timeout, stdin=stdin)

        return self._exec_events(make)

    def _exec_events(self, make: RuntimeRequest) -> Generator[dict[str, Any], None, None]:
        with contextlib.ExitStack() as stack:
            calls, stream = self._open(stack, make)
            if stream.status >= 400:
                check_answer(stream.status, stream.read(), calls.endpoint)
            for line in stream.lines():
                if (event := exec_event(line)) is not None:
                    yield event

    def kill(self, exec_id: str) -> dict[str, Any]:
        """SIGKILL a running command's process group (``id`` from its start event)."""
        return self._json(lambda c: c.kill(exec_id))

    def read_file(self, path: str) -> bytes:
        """A workspace file's bytes."""
        calls, response = self._send(lambda c: c.read_file(path))
        check_answer(response.status_code, response.content, calls.endpoint)
        return response.content

    def write_file(self, path: str, data: bytes | str) -> dict[str, Any]:
        """Write a file atomically (parents created); ``{path, size, sha256}``. str is UTF-8."""
        return self._json(lambda c: c.write_file(path, data))

    def list_files(self, path: str = ".", recursive: bool = False) -> FileEntries:
        """A directory's entries (``.truncated`` past 10,000)."""
        return file_entries(self._json(lambda c: c.list_files(path, recursive)))

    def delete_file(self, path: str, recursive: bool = False) -> dict[str, Any]:
        """Remove a file, link or (with ``recursive``) a directory tree."""
        return self._json(lambda c: c.delete_file(path, recursive))

    def load_skill(self, path: str) -> dict[str, Any]:
        """Vet and load a skill directory; a refusal carries its report in ``details``."""
        return self._json(lambda c: c.load_skill(path))

    def audit(self, since: int = 0) -> list[dict[str, Any]]:
        """The audit log's entries after ``since`` (all by default)."""
        calls, response = self._send(lambda c: c.audit(since))
        check_answer(response.status_code, response.content, calls.endpoint)
        return json_lines(response.text)

    def audit_head(self) -> dict[str, Any]:
        """The log's last entry: ``{seq, hash}``."""
        return self._json(lambda c: c.audit_head())

    def verify_audit(
        self, anchor: Mapping[str, Any] | tuple[int, str] | None = None
    ) -> dict[str, Any]:
        """Verify the hash chain: ``{ok, entries, head, badLine, error}``.

        Anchored by default on the ``status.auditHead`` the operator recorded outside the
        sandbox, so a log cut short or rewritten since then fails too.
        """
        chosen = self._anchor(anchor)
        return self._json(lambda c: c.verify_audit(chosen))

    def snapshot(self) -> dict[str, Any]:
        """Write a state snapshot (the operator does this on pause; for your own runtime)."""
        return self._json(lambda c: c.snapshot())

    def restore(self, generation: int | None = None, fallback: bool = False) -> dict[str, Any]:
        """Restore a snapshot (the operator does this on resume; for your own runtime)."""
        return self._json(lambda c: c.restore(generation, fallback))


def _run_wait(
    transport: SyncTransport,
    kube: KubeCalls,
    collection: str,
    wait: ObjectWait,
    initial: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Perform :func:`wait_driver`'s actions with blocking I/O."""
    driver = wait_driver(wait, initial)
    with contextlib.ExitStack() as stack:
        lines: Iterator[str] | None = None
        answer: Any = None
        while True:
            try:
                action = driver.send(answer)
            except StopIteration as stop:
                result: dict[str, Any] | None = stop.value
                return result
            if not isinstance(action, NextLine):
                stack.close()  # the previous watch, if any, is done with
                lines = None
            try:
                if isinstance(action, NextLine):
                    assert lines is not None
                    answer = next(lines, None)
                elif isinstance(action, Get):
                    request = kube.request("GET", f"{collection}/{wait.name}")
                    response = transport.send(request)
                    answer = (
                        None
                        if response.status_code == 404
                        else kube_object(response.status_code, response.content)
                    )
                elif isinstance(action, Watch):
                    request = kube.watch(collection, action.params, action.read_timeout)
                    stream = stack.enter_context(transport.stream(request))
                    if stream.status == 200:
                        lines = stack.enter_context(contextlib.closing(stream.lines()))
                        answer = WatchOpened(200)
                    else:
                        answer = WatchOpened(stream.status, stream.read())
                elif isinstance(action, Sleep):
                    time.sleep(max(action.seconds, 0.0))
                    answer = None
            except SandboxError as error:
                answer = IoFailure(error)
