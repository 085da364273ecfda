"""The probe and metrics server, on 127.0.0.1 with an ephemeral port; no cluster needed."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
import kopf
import pytest

from kleave import __version__
from kleave.operator.health import HealthServer, HealthState
from kleave.operator.metrics import REGISTRY, instrumented, track_reconcile

Probe = Callable[[str], Awaitable[tuple[int, str, str]]]


def serve(scenario: Callable[[HealthState, Probe], Awaitable[None]]) -> None:
    """Run ``scenario`` against a live server in a fresh event loop, then stop the server."""

    async def main() -> None:
        state = HealthState()
        async with (
            HealthServer(state, host="127.0.0.1", port=0) as server,
            aiohttp.ClientSession() as session,
        ):
            assert server.port > 0

            async def probe(path: str) -> tuple[int, str, str]:
                url = f"http://127.0.0.1:{server.port}{path}"
                async with session.get(url) as response:
                    return response.status, await response.text(), response.content_type

            await scenario(state, probe)

    asyncio.run(main())


def test_liveness_and_readiness_follow_the_operator_lifecycle() -> None:
    async def scenario(state: HealthState, probe: Probe) -> None:
        assert (await probe("/healthz"))[:2] == (200, "ok\n")
        assert (await probe("/readyz"))[:2] == (503, "starting\n")

        state.ready_flag.set()  # what kopf does once its startup handlers have run
        assert (await probe("/readyz"))[:2] == (200, "ready\n")
        assert (await probe("/healthz"))[0] == 200

        state.mark_stopping()
        assert (await probe("/healthz"))[:2] == (503, "stopping\n")
        assert (await probe("/readyz"))[:2] == (503, "stopping\n")

    serve(scenario)


def test_metrics_are_served_in_prometheus_text_format() -> None:
    with track_reconcile("HealthTestKind"):
        pass
    with pytest.raises(kopf.PermanentError), track_reconcile("HealthTestKind"):
        raise kopf.PermanentError("invalid")

    async def scenario(_: HealthState, probe: Probe) -> None:
        status, text, content_type = await probe("/metrics")
        assert status == 200
        assert content_type == "text/plain"
        assert 'kleave_reconcile_total{kind="HealthTestKind",result="success"} 1.0' in text
        assert 'kleave_reconcile_total{kind="HealthTestKind",result="permanent_error"} 1.0' in text
        assert 'kleave_reconcile_duration_seconds_count{kind="HealthTestKind"} 2.0' in text
        assert f'kleave_operator_info{{version="{__version__}"}} 1.0' in text
        # A dedicated registry: none of prometheus_client's default process/python collectors.
        assert "python_gc_objects_collected_total" not in text

    serve(scenario)


def test_unknown_paths_are_404() -> None:
    async def scenario(_: HealthState, probe: Probe) -> None:
        assert (await probe("/"))[0] == 404

    serve(scenario)


def test_stop_releases_the_port() -> None:
    async def main() -> None:
        server = HealthServer(HealthState(), host="127.0.0.1", port=0)
        await server.start()
        port = server.port
        await server.stop()
        await server.stop()  # idempotent
        again = HealthServer(HealthState(), host="127.0.0.1", port=port)
        await again.start()
        await again.stop()

    asyncio.run(main())


def test_busy_port_fails_to_start() -> None:
    async def main() -> None:
        async with HealthServer(HealthState(), host="127.0.0.1", port=0) as first:
            second = HealthServer(HealthState(), host="127.0.0.1", port=first.port)
            with pytest.raises(OSError):
                await second.start()

    asyncio.run(main())


def test_instrumented_handlers_count_every_outcome() -> None:
    @instrumented("DecoratedKind")
    async def handler(fail: Exception | None = None) -> str:
        if fail is not None:
            raise fail
        return "done"

    def count(result: str) -> float:
        labels = {"kind": "DecoratedKind", "result": result}
        return REGISTRY.get_sample_value("kleave_reconcile_total", labels) or 0.0

    declared = {"kind": "DecoratedKind", "result": "permanent_error"}
    assert REGISTRY.get_sample_value("kleave_reconcile_total", declared) == 0.0  # not absent
    assert asyncio.run(handler()) == "done"
    for error in (kopf.TemporaryError("later"), ValueError("bug")):
        with pytest.raises(type(error)):
            asyncio.run(handler(error))
    assert (count("success"), count("temporary_error"), count("error")) == (1.0, 1.0, 1.0)
