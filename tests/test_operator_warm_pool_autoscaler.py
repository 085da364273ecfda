"""The warm-pool autoscaler inside the sandbox controllers, against the in-memory API server.

A fake clock drives the windows; claims are AgentSandboxes with the creationTimestamps an API
server would give them, fed through the controllers' watch path as real events would be.
"""

from __future__ import annotations

import asyncio
import copy
import math
from typing import Any

from kleave.operator.kube import AGENT_SANDBOX, POD, SANDBOX_WARM_POOL
from kleave.operator.naming import LABEL_WARM_POOL
from kleave.operator.sandbox_controllers import AUTOSCALE_KEY
from kleave.operator.warm_pool_autoscaler import WarmPoolAutoscaler
from kleave.operator.warm_pool_sizing import decode_counts, format_epoch, warm_for_rate
from test_operator_sandbox_controllers import NS, Harness, pool, sandbox

Obj = dict[str, Any]
T0 = 100_000.5  # inside the window [100000, 100010)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _scaled_pool(**autoscaling: Any) -> Obj:
    obj = pool(replicas=1)
    obj["spec"].update(
        {
            "min": 1,
            "max": 50,
            "autoscaling": {
                "mode": "reactive",
                "intervalSeconds": 10,
                "startupSeconds": 5,
                "burstMemorySeconds": 0,
                **autoscaling,
            },
        }
    )
    return obj


def _harness(clock: Clock) -> Harness:
    h = Harness()
    h.ctl.autoscaler = WarmPoolAutoscaler(h.kube, h.ctl.pools, h.ctl.recorder, clock=clock)  # type: ignore[arg-type]
    return h


def _claims(h: Harness, count: int, at: float, prefix: str = "agent") -> None:
    for i in range(count):
        obj = sandbox(f"{prefix}-{i}")
        obj["metadata"]["creationTimestamp"] = format_epoch(at)
        h.add(AGENT_SANDBOX, obj)


def _edit_spec(h: Harness, name: str, **changes: Any) -> None:
    """What `kubectl edit` of the pool's spec does: a new resourceVersion and its watch event;
    `autoscaling` entries are merged into the existing block."""
    current = copy.deepcopy(h.get(SANDBOX_WARM_POOL, name))
    current["spec"]["autoscaling"].update(changes.pop("autoscaling", {}))
    current["spec"].update(changes)
    h.kube._stamp(current)
    h.kube.objects[(SANDBOX_WARM_POOL.plural, NS, name)] = current
    h.ctl.observe("MODIFIED", copy.deepcopy(current))


def _scaling_status(h: Harness) -> Obj:
    return dict(h.get(SANDBOX_WARM_POOL, "pool")["status"]["autoscaling"])


async def _decide(h: Harness) -> float | None:
    return await h.ctl.reconcile((AUTOSCALE_KEY, NS, "pool"))


def test_reactive_scales_up_at_once_and_down_after_the_delay() -> None:
    async def body() -> None:
        clock = Clock(T0)
        h = _harness(clock)
        h.add(SANDBOX_WARM_POOL, _scaled_pool())
        delay = await _decide(h)
        # No claim window has ended yet: the first is [100000, 100010), counted from T0 and
        # closed 2 s after its end (the watch events' settle time).
        assert delay is not None and math.isclose(delay, 100_012 - T0, abs_tol=0.01)
        assert _scaling_status(h)["reason"] == "NoClaims"
        assert h.get(SANDBOX_WARM_POOL, "pool")["spec"]["replicas"] == 1

        _claims(h, 20, 100_012)  # 2 claims/s over the window, 5 s start-up
        for obj in list(h.ctl.sandboxes.all()):  # later events of the same claims
            h.ctl.observe("MODIFIED", copy.deepcopy(obj))
        clock.now = 100_022.2
        delay = await _decide(h)
        want = warm_for_rate(2.0, 5.0, 0.99)
        assert h.get(SANDBOX_WARM_POOL, "pool")["spec"]["replicas"] == want == 19
        status = _scaling_status(h)
        assert (status["reason"], status["replicas"], status["observedClaimsPerMinute"]) == (
            "Reactive", 19, 120.0,
        )  # fmt: skip
        assert status["history"]["claims"] == "0,20"
        assert ("patch", "SandboxWarmPool", "pool") in h.kube.calls
        scaled = [e for e in h.kube.events if e["reason"] == "WarmPoolScaled"]
        assert len(scaled) == 1 and "from 1 to 19 (Reactive)" in scaled[0]["message"]

        clock.now = 100_032.2  # a quiet window: the delay holds the size
        await _decide(h)
        assert _scaling_status(h)["reason"] == "ScaleDownDelayed"
        assert h.get(SANDBOX_WARM_POOL, "pool")["spec"]["replicas"] == 19

        clock.now = 100_402.2  # past scaleDownDelaySeconds (300)
        await _decide(h)
        status = _scaling_status(h)
        assert (status["reason"], status["replicas"]) == ("AtMin", 1)
        assert h.get(SANDBOX_WARM_POOL, "pool")["spec"]["replicas"] == 1
        claims = decode_counts(status["history"]["claims"])
        assert claims[1] == 20 and sum(claims) == 20 and len(claims) == 40

    asyncio.run(asyncio.wait_for(body(), timeout=20))


def test_a_burst_is_remembered() -> None:
    async def body() -> None:
        clock = Clock(T0)
        h = _harness(clock)
        h.add(SANDBOX_WARM_POOL, _scaled_pool(burstMemorySeconds=600))
        await _decide(h)
        _claims(h, 30, 100_011)  # 30 claims in one second
        clock.now = 100_022.2
        await _decide(h)
        status = _scaling_status(h)
        assert (status["reason"], status["burstClaims"], status["replicas"]) == ("Burst", 30, 30)
        clock.now = 100_202.2  # quiet since, but within burstMemorySeconds
        await _decide(h)
        assert _scaling_status(h)["replicas"] == 30

    asyncio.run(asyncio.wait_for(body(), timeout=20))


def test_a_restarted_operator_keeps_the_history_and_marks_the_gap() -> None:
    async def body() -> None:
        clock = Clock(T0)
        h = _harness(clock)
        old = _scaled_pool()
        old["metadata"]["creationTimestamp"] = format_epoch(T0 - 3600)  # it predates both
        h.add(SANDBOX_WARM_POOL, old)
        await _decide(h)
        _claims(h, 4, 100_015)
        clock.now = 100_022.2
        await _decide(h)
        # A new operator process starts 35 s later, with the pool's status as it was.
        clock.now = 100_055.0
        h.ctl.autoscaler = WarmPoolAutoscaler(h.kube, h.ctl.pools, h.ctl.recorder, clock=clock)  # type: ignore[arg-type]
        _claims(h, 3, 100_062, prefix="late")
        clock.now = 100_072.2
        await _decide(h)
        history = _scaling_status(h)["history"]
        assert history["end"] == format_epoch(100_070)
        claims = decode_counts(history["claims"])
        # [100000, 100010), in which the first process began: missing; [100010, 100020): 4;
        # then [100020, 100060) unwatched or watched only in part (the new process began at
        # 100055): missing; [100060, 100070): 3
        assert claims[1] == 4 and claims[-1] == 3 and len(claims) == 7
        assert all(math.isnan(c) for c in [claims[0], *claims[2:-1]])
        # The size seen before the restart is held through the scale-down delay.
        assert _scaling_status(h)["replicas"] >= h.get(SANDBOX_WARM_POOL, "pool")["spec"]["min"]

    asyncio.run(asyncio.wait_for(body(), timeout=20))


def test_forecast_mode_and_measured_start_up() -> None:
    async def body() -> None:
        clock = Clock(100_002.5)  # the status history's last window has settled
        h = _harness(clock)
        obj = _scaled_pool(mode="forecast")
        del obj["spec"]["autoscaling"]["startupSeconds"]
        end = 100_000.0
        obj["status"] = {
            "autoscaling": {
                "history": {
                    "intervalSeconds": 10,
                    "end": format_epoch(end),
                    "claims": ",".join(["6"] * 60),
                    "peaks": ",".join(["1"] * 60),
                }
            }
        }
        h.add(SANDBOX_WARM_POOL, obj)
        pod = {
            "metadata": {
                "name": "pool-abcde",
                "namespace": NS,
                "uid": "pod-1",
                "creationTimestamp": format_epoch(end - 100),
                "labels": {LABEL_WARM_POOL: "pool", "kleave.dev/sandbox-template": "coder"},
            },
            "spec": {},
            "status": {
                "phase": "Running",
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "lastTransitionTime": format_epoch(end - 96),
                    }
                ],
            },
        }
        h.ctl.observe("ADDED", h.kube.put(POD, pod))
        await _decide(h)
        status = _scaling_status(h)
        assert status["startupSeconds"] == 4.0
        assert status["reason"] == "Forecast" and status["forecaster"]
        assert math.isclose(status["forecastClaimsPerMinute"], 36.0, rel_tol=0.05)
        assert status["provisionedClaimsPerMinute"] >= status["forecastClaimsPerMinute"]
        assert h.get(SANDBOX_WARM_POOL, "pool")["spec"]["replicas"] == status["replicas"] >= 4

    asyncio.run(asyncio.wait_for(body(), timeout=60))


def test_turning_autoscaling_off_clears_its_status_and_leaves_replicas() -> None:
    async def body() -> None:
        clock = Clock(T0)
        h = _harness(clock)
        h.add(SANDBOX_WARM_POOL, _scaled_pool())
        await _decide(h)
        assert "autoscaling" in h.get(SANDBOX_WARM_POOL, "pool")["status"]
        _edit_spec(h, "pool", autoscaling={"mode": "off"}, replicas=7)
        assert await _decide(h) is None
        stored = h.get(SANDBOX_WARM_POOL, "pool")
        assert "autoscaling" not in stored["status"] and stored["spec"]["replicas"] == 7

    asyncio.run(asyncio.wait_for(body(), timeout=20))


def test_a_claim_seen_just_after_its_window_ended_is_still_counted() -> None:
    async def body() -> None:
        clock = Clock(T0)
        h = _harness(clock)
        h.add(SANDBOX_WARM_POOL, _scaled_pool())
        await _decide(h)
        clock.now = 100_020.5  # the window [100010, 100020) ended, but has not settled
        assert await _decide(h) == 1.5
        _claims(h, 2, 100_019)  # watch events that arrive late
        clock.now = 100_022.0
        await _decide(h)
        assert _scaling_status(h)["history"]["claims"] == "0,2"

    asyncio.run(asyncio.wait_for(body(), timeout=20))


def test_windows_before_a_pool_was_autoscaled_are_not_counted_as_quiet() -> None:
    """The operator has run for a while; a pool created (or switched on) now has no claim
    history yet: not minutes of zero claims."""

    async def body() -> None:
        clock = Clock(T0)
        h = _harness(clock)
        clock.now = T0 + 300
        h.add(SANDBOX_WARM_POOL, _scaled_pool())
        await _decide(h)
        status = _scaling_status(h)
        assert (status["reason"], status["history"]["claims"]) == ("NoClaims", "")
        assert status["observedClaimsPerMinute"] is None

        off = _scaled_pool(mode="off")
        off["metadata"]["name"] = "later"
        h.add(SANDBOX_WARM_POOL, off)
        clock.now = T0 + 600
        _edit_spec(h, "later", autoscaling={"mode": "reactive"})
        await h.ctl.reconcile((AUTOSCALE_KEY, NS, "later"))
        scaling = h.get(SANDBOX_WARM_POOL, "later")["status"]["autoscaling"]
        assert (scaling["reason"], scaling["history"]["claims"]) == ("NoClaims", "")

    asyncio.run(asyncio.wait_for(body(), timeout=20))


def test_a_new_interval_starts_a_new_history_without_zeros() -> None:
    async def body() -> None:
        clock = Clock(T0)
        h = _harness(clock)
        obj = _scaled_pool()
        obj["metadata"]["creationTimestamp"] = format_epoch(T0 - 3600)
        h.add(SANDBOX_WARM_POOL, obj)
        await _decide(h)
        for n in range(5):  # claims in five windows
            _claims(h, 3, 100_011 + 10 * n, prefix=f"w{n}")
            clock.now = 100_022.2 + 10 * n
            await _decide(h)
        _edit_spec(h, "pool", autoscaling={"intervalSeconds": 20})
        clock.now = 100_205.0
        await _decide(h)
        for now in (100_224.0, 100_244.0):
            clock.now = now
            await _decide(h)
        history = _scaling_status(h)["history"]
        assert history["intervalSeconds"] == 20
        # [100200, 100220) watched only from 100205: missing; [100220, 100240): none. Not
        # windows of zeros back to the process start (its claims were binned at 10 s).
        claims = decode_counts(history["claims"])
        assert len(claims) == 2 and math.isnan(claims[0]) and claims[1] == 0

    asyncio.run(asyncio.wait_for(body(), timeout=20))
