"""The runtime's HTTP API (aiohttp): JSON in, JSON or NDJSON out, every call audited.

Routes (all but ``/healthz`` need ``Authorization: Bearer <token>`` when a token is set):

======  ============================  =========================================================
GET     /healthz                      liveness and activity, no auth, not audited
POST    /v1/exec                      {argv, cwd?, env?, timeoutSeconds?, stdin?} -> NDJSON
POST    /v1/exec/{id}/kill            kill a running command's process group
GET     /v1/files?path=P              file bytes
PUT     /v1/files?path=P              body = file bytes -> {path, size, sha256}
DELETE  /v1/files?path=P&recursive=   remove a file, link or directory
GET     /v1/files/list?path=P&recursive=   {entries, truncated}
POST    /v1/skills                    {path}: vet and load a skill -> report
GET     /v1/skills                    loaded skills
POST    /v1/snapshot                  write a state snapshot
GET     /v1/snapshots                 kept snapshots
POST    /v1/restore                   {generation?, fallback?}
GET     /v1/audit?since=N             the audit log (JSONL)
GET     /v1/audit/head                {seq, hash}
GET     /v1/audit/verify?seq=&hash=   verification, anchored when seq and hash are given
======  ============================  =========================================================

Errors are ``{"error": {"code", "message"}}`` with 400 (bad request), 401 (token), 403
(policy refusal), 404, 409 or 413. The audit middleware writes exactly one entry per call,
after it finished, with the outcome (ok, refused, error, cancelled) and the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from kleave.sandbox.audit import AuditHead, verify
from kleave.sandbox.exec import ExecProcess
from kleave.sandbox.files import ToolError, Upload, delete, list_directory, open_for_read
from kleave.sandbox.policy import NOT_FOUND_CODES, REQUEST_ERROR_CODES, PolicyRefusal
from kleave.sandbox.runtime import SandboxRuntime

RUNTIME = web.AppKey("runtime", SandboxRuntime)
DETAIL = web.RequestKey("audit_detail", dict[str, Any])
"""What the handler learned about the call (file, argv, sizes): the audit entry's detail."""
STREAMING = web.RequestKey("streaming", bool)
"""Set once a streamed response sent its headers: an error can then only end the stream."""
LIST_LIMIT = 10_000
CHUNK = 1 << 20
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPERATOR_ACTIONS = frozenset(
    {"snapshot", "snapshot.list", "restore", "audit.read", "audit.head", "audit.verify"}
)
"""Calls the operator makes (pause, resume, audit anchoring): they do not keep a sandbox busy,
or an idle sandbox would never reach its idle timeout."""


def create_app(runtime: SandboxRuntime) -> web.Application:
    """The aiohttp application serving one sandbox runtime."""
    app = web.Application(middlewares=[_audit_middleware], client_max_size=16 * 1024 * 1024)
    app[RUNTIME] = runtime
    app.router.add_get("/healthz", _healthz, name="healthz")
    app.router.add_post("/v1/exec", _exec, name="exec")
    app.router.add_post("/v1/exec/{id}/kill", _kill, name="exec.kill")
    app.router.add_get("/v1/files", _read_file, name="file.read")
    app.router.add_put("/v1/files", _write_file, name="file.write")
    app.router.add_delete("/v1/files", _delete_file, name="file.delete")
    app.router.add_get("/v1/files/list", _list_files, name="file.list")
    app.router.add_post("/v1/skills", _load_skill, name="skill.load")
    app.router.add_get("/v1/skills", _skills, name="skill.list")
    app.router.add_post("/v1/snapshot", _snapshot, name="snapshot")
    app.router.add_get("/v1/snapshots", _snapshots, name="snapshot.list")
    app.router.add_post("/v1/restore", _restore, name="restore")
    app.router.add_get("/v1/audit", _audit_log, name="audit.read")
    app.router.add_get("/v1/audit/head", _audit_head, name="audit.head")
    app.router.add_get("/v1/audit/verify", _audit_verify, name="audit.verify")
    return app


async def start_server(runtime: SandboxRuntime, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve the runtime on host:port (0 picks a free port); the runner and the bound port.

    Handlers are cancelled when their client disconnects, which kills a streaming command.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.create_server((host, port), family=family)
    runner = web.AppRunner(
        create_app(runtime), handler_cancellation=True, access_log=None, shutdown_timeout=5
    )
    await runner.setup()
    await web.SockSite(runner, listener).start()
    return runner, int(listener.getsockname()[1])


# ----- middleware -----------------------------------------------------------------------------
def _status_for(refusal: PolicyRefusal) -> int:
    if refusal.code == "unauthorized":
        return 401
    if refusal.code in REQUEST_ERROR_CODES:
        return 400
    if refusal.code in NOT_FOUND_CODES:
        return 404
    return 403


def _error(status: int, error: dict[str, Any], **extra: Any) -> web.Response:
    return web.json_response({"error": error, **extra}, status=status)


@web.middleware
async def _audit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path == "/healthz":
        return await handler(request)
    runtime = request.app[RUNTIME]
    action = request.match_info.route.name or "http"
    detail: dict[str, Any] = {"method": request.method, "path": request.path}
    request[DETAIL] = detail
    agent_call = action not in OPERATOR_ACTIONS
    if agent_call:
        runtime.touch()
    try:
        _authorize(request, runtime)
        response = await handler(request)
        outcome = "ok" if response.status < 400 else "error"
    except PolicyRefusal as refusal:
        outcome = "refused"
        response = _error(_status_for(refusal), refusal.to_dict(), **refusal.extra)
        detail["reason"] = refusal.to_dict()
    except ToolError as error:
        outcome = "error"
        response = _error(error.status, error.to_dict())
        detail["reason"] = error.to_dict()
    except web.HTTPException as http:
        runtime.audit.append(action, "error", {**detail, "status": http.status})
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        runtime.audit.append(action, "cancelled", {**detail, "reason": "client disconnected"})
        raise
    except Exception as error:  # a failure still gets its audit entry and a JSON answer
        outcome = "error"
        failure = {"code": "internal", "message": f"{type(error).__name__}: {error}"}
        response = _error(500, failure)
        detail["reason"] = failure
        if request.get(STREAMING):  # headers are out: record it and end the stream
            runtime.audit.append(action, outcome, {**detail, "status": 500})
            raise
    runtime.audit.append(action, outcome, {**detail, "status": response.status})
    if agent_call:
        runtime.touch()  # a long command's end counts too
    return response


async def _begin_stream(request: web.Request, response: web.StreamResponse) -> None:
    await response.prepare(request)
    request[STREAMING] = True


def _authorize(request: web.Request, runtime: SandboxRuntime) -> None:
    token, digest = runtime.config.token, runtime.config.token_sha256
    if not token and not digest:
        return
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    if digest:
        valid = hmac.compare_digest(
            hashlib.sha256(presented.encode()).hexdigest().encode(), digest.lower().encode()
        )
    else:
        valid = hmac.compare_digest(presented.encode(), str(token).encode())
    if scheme.lower() != "bearer" or not valid:
        raise PolicyRefusal(
            "unauthorized",
            "missing or wrong bearer token: send 'Authorization: Bearer <token>' with the "
            "sandbox's runtime token",
        )


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError:
        raise PolicyRefusal("bad-request", "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise PolicyRefusal("bad-request", "the request body must be a JSON object")
    return body


def _query_path(request: web.Request, default: str | None = None) -> str:
    path = request.query.get("path", default)
    if path is None:
        raise PolicyRefusal("bad-request", "the path query parameter is required")
    request[DETAIL]["file"] = path
    return path


def _flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "").lower() in ("1", "true", "yes")


def _clip_argv(argv: Any) -> Any:
    if not isinstance(argv, list):
        return repr(argv)[:256]
    clipped = [a[:1024] if isinstance(a, str) else repr(a)[:64] for a in argv[:64]]
    return [*clipped, f"... {len(argv) - 64} more"] if len(argv) > 64 else clipped


# ----- handlers -------------------------------------------------------------------------------
async def _healthz(request: web.Request) -> web.Response:
    """Readiness, plus what the operator's idle timeout and audit anchoring read."""
    runtime = request.app[RUNTIME]
    return web.json_response(
        {
            "status": "ok",
            "lastActivity": runtime.last_activity_iso(),
            "runningCommands": len(runtime.processes),
            "auditHead": runtime.audit.head.to_dict(),
        }
    )


async def _exec(request: web.Request) -> web.StreamResponse:
    runtime = request.app[RUNTIME]
    body = await _json_body(request)
    detail = request[DETAIL]
    detail.update(argv=_clip_argv(body.get("argv")), cwd=str(body.get("cwd", ".")))
    if isinstance(body.get("env"), dict):
        detail["envNames"] = sorted(str(k) for k in body["env"])  # values may be secrets
    spec = runtime.prepare_exec(body)
    process = ExecProcess(spec)
    try:
        await process.start()
    except OSError as error:
        raise ToolError(
            "exec-failed", f"cannot start {spec.argv[0]}: {error.strerror}", 500
        ) from None
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    try:
        runtime.processes[process.id] = process
        detail.update(id=process.id, pid=process.pid, timeoutSeconds=spec.timeout)
        runtime.audit.append("exec.start", "allowed", dict(detail))
        await _begin_stream(request, response)
        start = {"type": "start", "id": process.id, "pid": process.pid}
        await response.write(_line({**start, "timeoutSeconds": spec.timeout}))
        async with contextlib.aclosing(process.events()) as events:
            async for event in events:
                await response.write(_line(event))
    finally:
        process.close()
        runtime.processes.pop(process.id, None)
        detail.update({k: v for k, v in process.result.to_event().items() if k != "type"})
    await response.write_eof()
    return response


def _line(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode() + b"\n"


async def _kill(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    process_id = request.match_info["id"]
    request[DETAIL]["id"] = process_id
    process = runtime.processes.get(process_id)
    if process is None:
        raise ToolError("not-found", f"no running command with id {process_id}", 404)
    return web.json_response({"id": process_id, "killed": process.kill()})


async def _read_file(request: web.Request) -> web.StreamResponse:
    runtime = request.app[RUNTIME]
    runtime.guard.check_tool("readFile")
    path = runtime.guard.check_path(_query_path(request))
    handle, size = open_for_read(path, runtime.workspace, runtime.config.policy.max_file_bytes)
    request[DETAIL].update(resolved=str(path), bytes=size)
    with handle:
        response = web.StreamResponse(
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        )
        await _begin_stream(request, response)
        while chunk := handle.read(CHUNK):
            await response.write(chunk)
    await response.write_eof()
    return response


async def _write_file(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    runtime.guard.check_tool("writeFile")
    path = runtime.guard.check_path(_query_path(request), write=True)
    limit = runtime.config.policy.max_file_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ToolError(
            "too-large",
            f"{request.content_length} bytes is over the template's tools.maxFileBytes ({limit})",
            413,
        )
    upload = Upload(path, runtime.workspace, limit)
    try:
        async for chunk in request.content.iter_chunked(CHUNK):
            upload.write(chunk)
    except BaseException:
        upload.abort()
        raise
    digest = upload.commit()
    request[DETAIL].update(resolved=str(path), bytes=upload.size, sha256=digest)
    relative = str(path.relative_to(runtime.workspace))
    return web.json_response({"path": relative, "size": upload.size, "sha256": digest})


async def _delete_file(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    runtime.guard.check_tool("deleteFile")
    path = runtime.guard.check_path(_query_path(request), write=True, follow_final_symlink=False)
    kind = delete(path, runtime.workspace, recursive=_flag(request, "recursive"))
    request[DETAIL].update(resolved=str(path), type=kind)
    return web.json_response({"path": str(path.relative_to(runtime.workspace)), "type": kind})


async def _list_files(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    runtime.guard.check_tool("listFiles")
    path = runtime.guard.check_path(_query_path(request, "."))
    listing = list_directory(
        path, runtime.workspace, recursive=_flag(request, "recursive"), limit=LIST_LIMIT
    )
    request[DETAIL].update(entries=len(listing.entries), truncated=listing.truncated)
    return web.json_response({"entries": listing.entries, "truncated": listing.truncated})


async def _load_skill(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    runtime.guard.check_tool("loadSkill")
    body = await _json_body(request)
    requested = body.get("path")
    if not isinstance(requested, str):
        raise PolicyRefusal("bad-request", 'send {"path": "<skill directory in the workspace>"}')
    request[DETAIL]["skill"] = requested
    path = runtime.guard.check_path(requested)
    report, record = await asyncio.to_thread(runtime.load_skill, path)
    request[DETAIL].update(
        name=report.name,
        digest=report.digest,
        findings=[f"{f.severity} {f.code} {f.file}:{f.line or '-'}" for f in report.findings][:50],
    )
    if record is None:
        raise PolicyRefusal(
            "skill-refused",
            f"the skill at {requested} was refused: {report.summary()}",
            extra={"report": report.to_dict()},
        )
    return web.json_response({"loaded": record, "report": report.to_dict()})


async def _skills(request: web.Request) -> web.Response:
    return web.json_response({"skills": request.app[RUNTIME].skills()})


async def _snapshot(request: web.Request) -> web.Response:
    info = await request.app[RUNTIME].snapshot()
    request[DETAIL].update(
        generation=info.generation,
        sha256=info.sha256,
        sizeBytes=info.size_bytes,
        snapshotAuditHead=info.audit_head.to_dict(),
    )
    return web.json_response(info.to_dict())


async def _snapshots(request: web.Request) -> web.Response:
    return web.json_response({"snapshots": request.app[RUNTIME].snapshots()})


async def _restore(request: web.Request) -> web.Response:
    body = await _json_body(request)
    generation = body.get("generation")
    if generation is not None and (not isinstance(generation, int) or generation < 1):
        raise PolicyRefusal("bad-request", "generation must be a positive integer")
    fallback = bool(body.get("fallback", False))
    request[DETAIL].update(generation=generation, fallback=fallback)
    result = await request.app[RUNTIME].restore(generation, fallback)
    request[DETAIL].update(
        restored=result.generation,
        audit=result.audit,
        replacedAudit=result.replaced_audit,
        skippedCorrupt=len(result.skipped_corrupt),
    )
    return web.json_response(result.to_dict())


async def _audit_log(request: web.Request) -> web.StreamResponse:
    runtime = request.app[RUNTIME]
    try:
        since = int(request.query.get("since", "0"))
    except ValueError:
        raise PolicyRefusal("bad-request", "since must be an integer seq") from None
    head, length = runtime.audit.position()
    request[DETAIL].update(since=since, head=head.to_dict())
    response = web.StreamResponse(headers={"Content-Type": "application/jsonl"})
    await _begin_stream(request, response)
    with runtime.audit.path.open("rb") as handle:
        remaining = length
        for line in handle:
            if remaining <= 0:
                break
            remaining -= len(line)
            if since and _seq(line) <= since:
                continue
            await response.write(line)
    await response.write_eof()
    return response


def _seq(line: bytes) -> int:
    """An entry's seq, or a large number so an unparsable line is always shown."""
    try:
        seq = json.loads(line)["seq"]
        return seq if isinstance(seq, int) else 1 << 62
    except (ValueError, KeyError, TypeError):
        return 1 << 62


async def _audit_head(request: web.Request) -> web.Response:
    return web.json_response(request.app[RUNTIME].audit.head.to_dict())


async def _audit_verify(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    expect: AuditHead | None = None
    if "seq" in request.query or "hash" in request.query:
        try:
            expect = AuditHead(int(request.query["seq"]), request.query["hash"])
        except (KeyError, ValueError):
            raise PolicyRefusal(
                "bad-request", "give both seq (an integer) and hash to anchor the verification"
            ) from None
    result = await asyncio.to_thread(verify, runtime.audit.path, expect)
    request[DETAIL].update(ok=result.ok, badLine=result.bad_line)
    return web.json_response(result.to_dict())
