"""The async SDK: :class:`AsyncSandboxClient` and :class:`AsyncSandbox`.

The same surface as ``kleave.sandbox.client`` with coroutines (``await sbx.exec(...)``,
``async for event in sbx.exec_stream(...)``, ``async with``), for agent platforms that drive
many sandboxes from one event loop. Requests, answers and the wait logic are the shared pure
code of ``client_runtime`` and ``client_kube``; only the I/O here is async, over
``httpx.AsyncClient``, so nothing blocks the loop (credentials are loaded once, at
construction).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import warnings
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import httpx

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
from kleave.sandbox.client_transport import AsyncStream, AsyncTransport
from kleave.sandbox.client_types import (
    ExecResult,
    FileEntries,
    HttpRequest,
    SandboxError,
    SandboxUnreachable,
)

DEFAULT_TIMEOUT = 120.0
RuntimeRequest = Callable[[RuntimeCalls], HttpRequest]


class AsyncSandboxClient:
    """AgentSandboxes in one namespace, async; see :class:`kleave.sandbox.client.SandboxClient`.

    ``async with AsyncSandboxClient(...) as client`` closes its connections on exit.
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
        self._kube_http = AsyncTransport(self.connection.verify)
        # Sandbox endpoints are pod addresses: a proxy meant for the internet cannot reach them.
        self.runtime_http = AsyncTransport(trust_env=False)

    async def __aenter__(self) -> AsyncSandboxClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection pools (the sandboxes keep running)."""
        await self._kube_http.close()
        await self.runtime_http.close()

    # ----- Kubernetes calls -------------------------------------------------------------------
    async def kube_request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        missing_ok: bool = False,
    ) -> dict[str, Any] | None:
        """One API-server call; None for a 404 when ``missing_ok``."""
        request = self.kube.request(
            method, path, params=params, body=body, content_type=content_type
        )
        response = await self._kube_http.send(request)
        if missing_ok and response.status_code == 404:
            return None
        return kube_object(response.status_code, response.content)

    def _sandboxes(self, name: str | None = None) -> str:
        return resource_path(SANDBOXES, namespace=self.namespace, name=name)

    async def _object(self, name: str) -> dict[str, Any]:
        found = await self.kube_request("GET", self._sandboxes(name))
        assert found is not None
        return found

    async def wait_for(
        self, collection: str, wait: ObjectWait, initial: dict[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """Run a wait on one object of ``collection`` (a list path): watch, relist, poll."""
        return await _run_wait(self._kube_http, self.kube, collection, wait, initial)

    # ----- sandboxes --------------------------------------------------------------------------
    async def create(
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
    ) -> AsyncSandbox:
        """Create an AgentSandbox from a warm pool or a template; see ``SandboxClient.create``."""
        manifest = sandbox_manifest(
            self.namespace,
            name,
            warm_pool=warm_pool,
            template=template,
            env=env,
            lifetime=lifetime,
            labels=labels,
        )
        created = await self.kube_request("POST", self._sandboxes(), body=manifest)
        assert created is not None
        sandbox = AsyncSandbox(created, self)
        if wait:
            await sandbox.wait_ready(timeout, initial=created)
        return sandbox

    async def get(self, name: str) -> AsyncSandbox:
        """The AgentSandbox ``name`` as it is now (:class:`KubeApiError` 404 when absent)."""
        return AsyncSandbox(await self._object(name), self)

    async def list(self, label_selector: str | None = None) -> builtins.list[AsyncSandbox]:
        """Every AgentSandbox of the namespace (optionally those matching a label selector)."""
        params = {"labelSelector": label_selector} if label_selector else None
        listing = await self.kube_request("GET", self._sandboxes(), params=params)
        assert listing is not None
        return [AsyncSandbox(item, self) for item in listing.get("items", [])]


class AsyncSandbox(SandboxView):
    """One sandbox, async; see :class:`kleave.sandbox.client.Sandbox`.

    ``async with`` deletes the AgentSandbox on exit (a :meth:`from_endpoint` sandbox just
    closes its connections).
    """

    def __init__(
        self,
        obj: dict[str, Any],
        client: AsyncSandboxClient | None,
        *,
        endpoint: str | None = None,
        token: str | None = None,
        transport: AsyncTransport | None = None,
    ) -> None:
        super().__init__(obj, endpoint, token if client is None else client.token)
        self._client = client
        if transport is not None:
            self._transport = transport
        elif client is not None:
            self._transport = client.runtime_http
        else:
            raise SandboxError("an AsyncSandbox needs a client or an endpoint")
        self._owns_transport = transport is not None

    @classmethod
    def from_endpoint(cls, url: str, token: str | None = None) -> AsyncSandbox:
        """A sandbox bound to a runtime you run yourself (``kleave sandbox runtime``).

        Runtime calls only; close it (``await sbx.close()`` or ``async with``).
        """
        calls = RuntimeCalls(url, token)
        return cls(
            {"metadata": {"name": calls.endpoint}},
            None,
            endpoint=url,
            token=token,
            transport=AsyncTransport(trust_env=False),
        )

    def _kube(self) -> AsyncSandboxClient:
        if self._client is None:
            raise SandboxError(
                f"{self.name} is a runtime endpoint, not an AgentSandbox: it has no "
                "Kubernetes object to read, pause, resume or delete"
            )
        return self._client

    async def refresh(self) -> AsyncSandbox:
        """Read the AgentSandbox again."""
        self._obj = await self._kube()._object(self.name)
        return self

    async def wait_ready(
        self, timeout: float = DEFAULT_TIMEOUT, *, initial: dict[str, Any] | None = None
    ) -> AsyncSandbox:
        """Wait until the sandbox is Ready with an endpoint (watching its object)."""
        client = self._kube()
        wait = ObjectWait("sandbox", self.name, "Ready", is_ready, timeout, failure=sandbox_failure)
        found = await client.wait_for(client._sandboxes(), wait, initial)
        self._obj = found or self._obj
        return self

    async def pause(self, wait: bool = True, timeout: float = DEFAULT_TIMEOUT) -> AsyncSandbox:
        """Snapshot the sandbox and free its pod (``spec.mode: Paused``); wait for Paused."""
        client = self._kube()
        patched = await client.kube_request(
            "PATCH", client._sandboxes(self.name), body=pause_patch(), content_type=MERGE_PATCH
        )
        assert patched is not None
        self._obj = patched
        if wait:
            done = ObjectWait(
                "sandbox", self.name, "Paused", is_paused, timeout, failure=pause_failure
            )
            self._obj = await client.wait_for(client._sandboxes(), done, patched) or self._obj
        return self

    async def resume(self, wait: bool = True, timeout: float = DEFAULT_TIMEOUT) -> AsyncSandbox:
        """Restore the snapshot into a fresh pod (``spec.mode: Running`` plus the
        ``kleave.dev/resume-requested`` annotation an idle-paused sandbox needs)."""
        client = self._kube()
        patched = await client.kube_request(
            "PATCH", client._sandboxes(self.name), body=resume_patch(), content_type=MERGE_PATCH
        )
        assert patched is not None
        self._obj = patched
        if wait:
            await self.wait_ready(timeout, initial=patched)
        return self

    async def delete(self, wait: bool = False, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Delete the AgentSandbox (its pod and volume go with it); optionally wait until gone."""
        client = self._kube()
        await client.kube_request("DELETE", client._sandboxes(self.name), missing_ok=True)
        if wait:
            gone = ObjectWait("sandbox", self.name, "deleted", bool, timeout, until_deleted=True)
            await client.wait_for(client._sandboxes(), gone)

    async def close(self) -> None:
        """Free the connections of a :meth:`from_endpoint` sandbox (a no-op otherwise)."""
        if self._owns_transport:
            await self._transport.close()

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if self._client is not None:
                await self.delete()
        except SandboxError as error:
            if exc is None:
                raise
            warnings.warn(f"could not delete sandbox {self.name}: {error}", stacklevel=2)
        finally:
            await self.close()

    # ----- runtime calls ----------------------------------------------------------------------
    async def _calls(self) -> RuntimeCalls:
        if self._client is not None:
            step = runtime_gate(self._obj, self._client.auto_resume)
            if step == "resume":
                await self.resume()
            elif step == "wait":
                await self.wait_ready()
        return self._runtime_calls(await self._current_token())

    async def _current_token(self) -> str | None:
        """The runtime token: the client's, else the one the operator published for the
        current pod in ``status.tokenSecretName`` (reading Secrets needs RBAC ``get``)."""
        secret = self._token_secret()
        if secret is None or self._client is None:
            return self._token
        found, token = self._cached_token(secret)
        if found:
            return token
        path = resource_path("secrets", namespace=self._client.namespace, name=secret, api=CORE_API)
        return self._remember_token(
            secret, await self._client.kube_request("GET", path, missing_ok=True)
        )

    async def _token_went_stale(self) -> bool:
        """After a 401: re-read the sandbox and its token once (a resume changed the pod)."""
        if not self._forget_token():
            return False
        await self.refresh()
        return True

    async def _moved(self) -> bool:
        """After a refused connection: did the sandbox move (idle-paused, new pod)?"""
        if self._client is None:
            return False
        before = self.status.get("endpoint")
        await self.refresh()
        return self.phase != "Ready" or self.status.get("endpoint") != before

    async def _send(self, make: RuntimeRequest) -> tuple[RuntimeCalls, httpx.Response]:
        """Send one runtime call, retrying once where the first try cannot have done anything:
        no connection (the sandbox moved) or a 401 (its token changed with its pod)."""
        for attempt in (1, 2):
            calls = await self._calls()
            try:
                response = await self._transport.send(make(calls))
            except SandboxUnreachable:
                if attempt == 2 or not await self._moved():
                    raise
                continue
            if response.status_code == 401 and attempt == 1 and await self._token_went_stale():
                continue
            return calls, response
        raise AssertionError("unreachable")

    async def _json(self, make: RuntimeRequest) -> dict[str, Any]:
        calls, response = await self._send(make)
        return json_object(response.status_code, response.content, calls.endpoint)

    async def _open(
        self, stack: contextlib.AsyncExitStack, make: RuntimeRequest
    ) -> tuple[RuntimeCalls, AsyncStream]:
        """Open a streamed runtime call, with the same one retry as :meth:`_send`."""
        for attempt in (1, 2):
            calls = await self._calls()
            async with contextlib.AsyncExitStack() as attempt_stack:
                try:
                    stream = await attempt_stack.enter_async_context(
                        self._transport.stream(make(calls))
                    )
                except SandboxUnreachable:
                    if attempt == 2 or not await self._moved():
                        raise
                    continue
                if stream.status == 401 and attempt == 1 and await self._token_went_stale():
                    continue
                await stack.enter_async_context(attempt_stack.pop_all())
                return calls, stream
        raise AssertionError("unreachable")

    async def health(self) -> dict[str, Any]:
        """``GET /healthz``: status, last activity, running commands, audit head."""
        return await self._json(lambda c: c.health())

    async def exec(
        self,
        argv: Sequence[str],
        *,
        cwd: str = ".",
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        stdin: str | bytes | None = None,
    ) -> ExecResult:
        """Run a command to its end; its exit and output (see ``Sandbox.exec``)."""
        stream = self.exec_stream(argv, cwd=cwd, env=env, timeout=timeout, stdin=stdin)
        events = [event async for event in stream]
        return collect_exec(events, self.endpoint)

    def exec_stream(
        self,
        argv: Sequence[str],
        *,
        cwd: str = ".",
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        stdin: str | bytes | None = None,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """The runtime's exec events as they come; leaving early kills the command."""
        check_argv(argv)

        def make(calls: RuntimeCalls) -> HttpRequest:
            return calls.exec(argv, cwd=cwd, env=env, timeout=timeout, stdin=stdin)

        return self._exec_events(make)

    async def _exec_events(self, make: RuntimeRequest) -> AsyncGenerator[dict[str, Any], None]:
        async with contextlib.AsyncExitStack() as stack:
            calls, stream = await self._open(stack, make)
            if stream.status >= 400:
                check_answer(stream.status, await stream.read(), calls.endpoint)
            async for line in stream.lines():
                if (event := exec_event(line)) is not None:
                    yield event

    async def kill(self, exec_id: str) -> dict[str, Any]:
        """SIGKILL a running command's process group (``id`` from its start event)."""
        return await self._json(lambda c: c.kill(exec_id))

    async def read_file(self, path: str) -> bytes:
        """A workspace file's bytes."""
        calls, response = await self._send(lambda c: c.read_file(path))
        check_answer(response.status_code, response.content, calls.endpoint)
        return response.content

    async def write_file(self, path: str, data: bytes | str) -> dict[str, Any]:
        """Write a file atomically (parents created); ``{path, size, sha256}``."""
        return await self._json(lambda c: c.write_file(path, data))

    async def list_files(self, path: str = ".", recursive: bool = False) -> FileEntries:
        """A directory's entries (``.truncated`` past 10,000)."""
        return file_entries(await self._json(lambda c: c.list_files(path, recursive)))

    async def delete_file(self, path: str, recursive: bool = False) -> dict[str, Any]:
        """Remove a file, link or (with ``recursive``) a directory tree."""
        return await self._json(lambda c: c.delete_file(path, recursive))

    async def load_skill(self, path: str) -> dict[str, Any]:
        """Vet and load a skill directory; a refusal carries its report in ``details``."""
        return await self._json(lambda c: c.load_skill(path))

    async def audit(self, since: int = 0) -> builtins.list[dict[str, Any]]:
        """The audit log's entries after ``since`` (all by default)."""
        calls, response = await self._send(lambda c: c.audit(since))
        check_answer(response.status_code, response.content, calls.endpoint)
        return json_lines(response.text)

    async def audit_head(self) -> dict[str, Any]:
        """The log's last entry: ``{seq, hash}``."""
        return await self._json(lambda c: c.audit_head())

    async def verify_audit(
        self, anchor: Mapping[str, Any] | tuple[int, str] | None = None
    ) -> dict[str, Any]:
        """Verify the hash chain, anchored by default on the status's ``auditHead``."""
        chosen = self._anchor(anchor)
        return await self._json(lambda c: c.verify_audit(chosen))

    async def snapshot(self) -> dict[str, Any]:
        """Write a state snapshot (the operator does this on pause; for your own runtime)."""
        return await self._json(lambda c: c.snapshot())

    async def restore(
        self, generation: int | None = None, fallback: bool = False
    ) -> dict[str, Any]:
        """Restore a snapshot (the operator does this on resume; for your own runtime)."""
        return await self._json(lambda c: c.restore(generation, fallback))


async def _run_wait(
    transport: AsyncTransport,
    kube: KubeCalls,
    collection: str,
    wait: ObjectWait,
    initial: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Perform :func:`wait_driver`'s actions with async I/O."""
    driver = wait_driver(wait, initial)
    async with contextlib.AsyncExitStack() as stack:
        lines: AsyncIterator[str] | None = None
        answer: Any = None
        while True:
            try:
                action = driver.send(answer)
            except StopIteration as stop:
                result: dict[str, Any] | None = stop.value
                return result
            if not isinstance(action, NextLine):
                await stack.aclose()  # the previous watch, if any, is done with
                lines = None
            try:
                if isinstance(action, NextLine):
                    assert lines is not None
                    answer = await anext(lines, None)
                elif isinstance(action, Get):
                    request = kube.request("GET", f"{collection}/{wait.name}")
                    response = await transport.send(request)
                    answer = (
                        None
                        if response.status_code == 404
                        else kube_object(response.status_code, response.content)
                    )
                elif isinstance(action, Watch):
                    request = kube.watch(collection, action.params, action.read_timeout)
                    stream = await stack.enter_async_context(transport.stream(request))
                    if stream.status == 200:
                        lines = await stack.enter_async_context(contextlib.aclosing(stream.lines()))
                        answer = WatchOpened(200)
                    else:
                        answer = WatchOpened(stream.status, await stream.read())
                elif isinstance(action, Sleep):
                    await asyncio.sleep(max(action.seconds, 0.0))
                    answer = None
            except SandboxError as error:
                answer = IoFailure(error)
