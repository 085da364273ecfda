"""Process entry points: build the server object for a role and serve it until SIGTERM."""

from __future__ import annotations

from aiohttp import web

from kleave.workers.serve.http import serve_forever
from kleave.workers.serve.plan import ServingPlan
from kleave.workers.serve.router import Router, RouterOptions
from kleave.workers.serve.runtime import WorkerOptions


def worker_app(plan: ServingPlan, options: WorkerOptions) -> web.Application:
    """The aiohttp app of one worker role (options.role is already the server role)."""
    if options.role == "prefill":
        from kleave.workers.serve.prefill_server import PrefillServer

        return PrefillServer(plan, options).app()
    if options.role == "ffn":
        from kleave.workers.serve.ffn_server import FFNWorker

        return FFNWorker(plan, options).app()
    from kleave.workers.serve.decode_server import DecodeServer

    return DecodeServer(plan, options, options.role).app()


async def run_worker(plan: ServingPlan, options: WorkerOptions) -> None:
    app = worker_app(plan, options)
    await serve_forever(app, options.host, options.port, announce=f"{options.role} serving {{url}}")


async def run_router(plan: ServingPlan, options: RouterOptions) -> None:
    app = Router(plan, options).app()
    await serve_forever(app, options.host, options.port, announce="router serving {url}")
