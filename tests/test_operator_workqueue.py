"""The controllers' plumbing: work queue and workers, apply/status diffing, caches, events.

pyproject lists no asyncio pytest plugin, so async tests run their body with asyncio.run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Hashable
from datetime import UTC, datetime
from typing import Any

import pytest

from kleave.operator.cached_controller import contains, is_transient, status_patch
from kleave.operator.events import build_event, event_name
from kleave.operator.kube import ApiError
from kleave.operator.store import Store, controller_uid
from kleave.operator.workqueue import Backoff, WorkQueue, run_workers

NOW = datetime(2026, 11, 1, 12, 0, 0, tzinfo=UTC)


def run_async(body: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), timeout=10))


async def eventually(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.002)


# -- WorkQueue -----------------------------------------------------------------------------------


def test_add_deduplicates_waiting_keys() -> None:
    async def body() -> None:
        queue = WorkQueue()
        for key in ("a", "a", "b", "a"):
            queue.add(key)
        assert len(queue) == 2
        assert await queue.get() == "a"
        assert await queue.get() == "b"
        assert len(queue) == 0

    run_async(body)


def test_key_added_while_active_runs_exactly_once_more() -> None:
    async def body() -> None:
        queue = WorkQueue()
        queue.add("k")
        key = await queue.get()
        for _ in range(3):
            queue.add(key)
        assert len(queue) == 0  # never handed to a second worker while active
        queue.done(key)
        assert len(queue) == 1
        assert await queue.get() == "k"
        queue.done("k")
        assert len(queue) == 0

    run_async(body)


def test_done_without_new_events_does_not_requeue() -> None:
    async def body() -> None:
        queue = WorkQueue()
        queue.add("k")
        queue.done(await queue.get())
        assert len(queue) == 0
        queue.add("k")  # and the key can be added again afterwards
        assert len(queue) == 1

    run_async(body)


def test_add_after_adds_the_key_once_the_delay_passes() -> None:
    async def body() -> None:
        queue = WorkQueue()
        queue.add_after("k", 0.02)
        queue.add_after("k", 0.02)
        assert len(queue) == 0
        await eventually(lambda: len(queue) == 1)
        await asyncio.sleep(0.05)
        assert len(queue) == 1

    run_async(body)


def test_close_cancels_pending_timers() -> None:
    async def body() -> None:
        queue = WorkQueue()
        queue.add_after("k", 0.01)
        queue.close()
        await asyncio.sleep(0.05)
        assert len(queue) == 0

    run_async(body)


def test_add_after_with_an_earlier_time_wins_over_a_pending_later_timer() -> None:
    async def body() -> None:
        queue = WorkQueue()
        queue.add_after("k", 30.0)
        queue.add_after("k", 0.01)
        await asyncio.sleep(0.1)
        try:
            assert len(queue) == 1
        finally:
            queue.close()

    run_async(body)


# -- Backoff -------------------------------------------------------------------------------------


def test_backoff_doubles_per_failure_and_is_capped() -> None:
    backoff = Backoff(base_s=0.2, cap_s=1.0)

    assert [backoff.next_delay("a") for _ in range(6)] == [0.2, 0.4, 0.8, 1.0, 1.0, 1.0]


def test_backoff_is_per_key_and_forget_resets_it() -> None:
    backoff = Backoff(base_s=1.0, cap_s=100.0)
    backoff.next_delay("a")
    backoff.next_delay("a")

    assert backoff.next_delay("b") == 1.0
    assert backoff.next_delay("a") == 4.0
    backoff.forget("a")
    backoff.forget("never-seen")
    assert backoff.next_delay("a") == 1.0


def test_default_backoff_starts_small_and_caps_at_a_minute() -> None:
    backoff = Backoff()
    delays = [backoff.next_delay("k") for _ in range(20)]

    assert delays[0] == 0.2
    assert delays[-1] == 60.0
    assert delays == sorted(delays)


# -- run_workers ---------------------------------------------------------------------------------

Results = list[tuple[Hashable, str]]


async def with_workers(
    queue: WorkQueue,
    reconcile: Callable[[Hashable], Coroutine[Any, Any, float | None]],
    until: Callable[[], bool],
    *,
    workers: int = 2,
    results: Results | None = None,
    is_transient: Callable[[BaseException], bool] = lambda e: isinstance(e, ConnectionError),
) -> None:
    """Run workers until ``until()`` holds, then cancel them as the operator does on exit."""

    def record(key: Hashable, result: str, seconds: float) -> None:
        assert seconds >= 0
        if results is not None:
            results.append((key, result))

    task = asyncio.create_task(
        run_workers(queue, reconcile, workers=workers, is_transient=is_transient, on_result=record)
    )
    try:
        await eventually(until)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_transient_errors_are_retried_with_backoff_then_forgotten() -> None:
    async def body() -> None:
        queue = WorkQueue()
        queue.backoff = Backoff(base_s=0.001, cap_s=0.004)
        calls: list[Hashable] = []
        results: Results = []

        async def reconcile(key: Hashable) -> float | None:
            calls.append(key)
            if len(calls) <= 2:
                raise ConnectionError("apiserver went away")
            return None

        queue.add("k")
        await with_workers(queue, reconcile, lambda: len(results) == 3, results=results)

        assert results == [("k", "retry"), ("k", "retry"), ("k", "ok")]
        assert calls == ["k", "k", "k"]
        assert "k" not in queue.backoff.failures

    run_async(body)


def test_non_transient_error_is_recorded_and_retried_after_the_cap() -> None:
    async def body() -> None:
        queue = WorkQueue()
        queue.backoff = Backoff(base_s=10.0, cap_s=0.01)  # base would never fire in time
        seen: list[BaseException] = []
        results: Results = []

        def transient(error: BaseException) -> bool:
            seen.append(error)
            return False

        async def reconcile(key: Hashable) -> float | None:
            if not results:
                raise ValueError("bug")
            return None

        queue.add("k")
        await with_workers(
            queue, reconcile, lambda: len(results) == 2, results=results, is_transient=transient
        )

        assert results == [("k", "error"), ("k", "ok")]
        assert [type(e) for e in seen] == [ValueError]

    run_async(body)


def test_requeue_after_reconciles_the_key_again() -> None:
    async def body() -> None:
        queue = WorkQueue()
        calls: list[Hashable] = []

        async def reconcile(key: Hashable) -> float | None:
            calls.append(key)
            return 0.01 if len(calls) == 1 else None

        queue.add("k")
        await with_workers(queue, reconcile, lambda: len(calls) == 2)
        await asyncio.sleep(0.05)
        assert calls == ["k", "k"]

    run_async(body)


def test_a_key_is_never_reconciled_by_two_workers_at_once() -> None:
    async def body() -> None:
        queue = WorkQueue()
        running: set[Hashable] = set()
        overlaps: list[Hashable] = []
        calls: list[Hashable] = []
        peak = 0

        async def reconcile(key: Hashable) -> float | None:
            nonlocal peak
            if key in running:
                overlaps.append(key)
            running.add(key)
            peak = max(peak, len(running))
            calls.append(key)
            if len(calls) == 1:
                for _ in range(5):  # a burst of events for the key being reconciled
                    queue.add("k")
                    await asyncio.sleep(0.005)
            else:
                await asyncio.sleep(0.02)
            running.discard(key)
            return None

        queue.add("k")
        for other in ("a", "b", "c"):
            queue.add(other)
        await with_workers(queue, reconcile, lambda: len(calls) == 5, workers=4)
        await asyncio.sleep(0.05)

        assert overlaps == []
        assert sorted(str(c) for c in calls) == ["a", "b", "c", "k", "k"]
        assert peak > 1  # different keys do run in parallel

    run_async(body)


# -- controllers helpers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "desired", "expected"),
    [
        ({"a": 1, "b": {"c": 2, "server": "x"}}, {"b": {"c": 2}}, True),
        ({"a": 1}, {"a": 2}, False),
        ({"a": 1}, {"missing": None}, True),
        ({}, {"a": {"b": 1}}, False),
        ({"l": [{"n": 1, "x": 0}, {"n": 2}]}, {"l": [{"n": 1}, {"n": 2}]}, True),
        ({"l": [{"n": 1}, {"n": 2}]}, {"l": [{"n": 2}, {"n": 1}]}, False),
        ({"l": [1, 2, 3]}, {"l": [1, 2]}, False),
        ({"l": "x"}, {"l": ["x"]}, False),
        ({"cpu": 8}, {"cpu": "8"}, True),  # the API server returns int-or-string as int
        ({"cpu": 8}, {"cpu": "16"}, False),
        ({"cpu": "8"}, {"cpu": 8}, False),
        ({"immutable": True}, {"immutable": True}, True),
        ("x", {"a": 1}, False),
    ],
)
def test_contains(current: Any, desired: Any, expected: bool) -> None:
    assert contains(current, desired) is expected


def test_status_patch_holds_only_changed_fields() -> None:
    current = {"replicas": 2, "selector": "a=b", "conditions": [{"type": "Ready"}], "kopf": {}}
    desired = {"replicas": 3, "selector": "a=b", "conditions": [{"type": "Ready"}], "new": 1}

    assert status_patch(current, desired) == {"replicas": 3, "new": 1}
    assert status_patch(current, {"replicas": 2}) == {}
    # None deletes a key in a merge patch: a key already absent needs no write.
    nested = {"claim": {"source": "Cold"}}
    assert status_patch(nested, {"claim": {"source": "Cold", "latencyMs": None}}) == {}
    stale = {"claim": {"source": "Warm", "latencyMs": 81}}
    assert status_patch(stale, {"claim": {"source": "Resume", "latencyMs": None}}) == {
        "claim": {"source": "Resume", "latencyMs": None}
    }


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (ApiError(409, "Conflict", "x"), True),
        (ApiError(429, "TooManyRequests", "x"), True),
        (ApiError(503, "ServiceUnavailable", "x"), True),
        (ApiError(422, "Invalid", "x"), False),
        (ApiError(404, "NotFound", "x"), False),
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (ValueError("bug"), False),
    ],
)
def test_is_transient(error: BaseException, expected: bool) -> None:
    assert is_transient(error) is expected


# -- Store ---------------------------------------------------------------------------------------


def owned(name: str, owner_uid: str | None, namespace: str = "ns", **extra: Any) -> dict[str, Any]:
    refs = [{"uid": "other", "controller": False}]
    if owner_uid is not None:
        refs.append({"uid": owner_uid, "controller": True})
    return {
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "ownerReferences": refs},
        **extra,
    }


def test_controller_uid_ignores_non_controller_owners() -> None:
    assert controller_uid(owned("a", "u1")) == "u1"
    assert controller_uid(owned("a", None)) is None
    assert controller_uid({"metadata": {}}) is None


def test_store_indexes_children_by_controller_owner_sorted_by_name() -> None:
    store = Store("Deployment")
    store.upsert(owned("b", "u1"))
    store.upsert(owned("a", "u1"))
    store.upsert(owned("c", "u2"))
    store.upsert(owned("orphan", None))

    assert [o["metadata"]["name"] for o in store.owned_by("u1")] == ["a", "b"]
    assert [o["metadata"]["name"] for o in store.owned_by("u2")] == ["c"]
    assert store.owned_by("other") == []
    assert len(store) == 4


def test_store_reindexes_on_owner_change_and_remove() -> None:
    store = Store("Deployment")
    store.upsert(owned("a", "u1"))
    store.upsert(owned("a", "u2"))

    assert store.owned_by("u1") == []
    assert [o["metadata"]["name"] for o in store.owned_by("u2")] == ["a"]
    assert len(store) == 1
    store.remove(owned("a", "u2"))
    assert store.owned_by("u2") == []
    assert store.get("ns", "a") is None
    store.remove(owned("never-stored", "u2"))  # a DELETED event for an unknown object


def test_store_keys_by_namespace_and_name() -> None:
    store = Store("Deployment")
    store.upsert(owned("a", "u1", namespace="one", spec={"v": 1}))
    store.upsert(owned("a", "u1", namespace="two", spec={"v": 2}))

    first = store.get("one", "a")
    assert first is not None and first["spec"] == {"v": 1}
    assert len(store.owned_by("u1")) == 2
    assert Store.key_of({"metadata": {"name": "node-1"}}) == ("", "node-1")


def test_store_replace_all_drops_what_is_gone() -> None:
    store = Store("Deployment")
    store.upsert(owned("old", "u1"))
    store.replace_all([owned("new", "u1")])

    assert [o["metadata"]["name"] for o in store.all()] == ["new"]
    assert [o["metadata"]["name"] for o in store.owned_by("u1")] == ["new"]


def test_pods_are_slimmed_to_the_fields_kleave_reads() -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "p",
            "namespace": "ns",
            "uid": "pod-uid",
            "labels": {"kleave.dev/inference-pool": "llm-decode"},
            "annotations": {"big": "x" * 1000},
            "managedFields": [{"manager": "kubelet"}],
            "ownerReferences": [{"uid": "rs", "controller": True}],
        },
        "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i"}]},
        "status": {
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "False"}],
            "containerStatuses": [{"name": "c"}],
        },
    }
    stored = Store("Pod").upsert(pod)

    assert stored == {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "p",
            "namespace": "ns",
            "uid": "pod-uid",
            "labels": {"kleave.dev/inference-pool": "llm-decode"},
            "deletionTimestamp": None,
        },
        "spec": {"nodeName": "n1"},
        "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False"}]},
    }


def test_nodes_are_slimmed_and_a_heartbeat_leaves_them_equal() -> None:
    def node(heartbeat: str) -> dict[str, Any]:
        return {
            "kind": "Node",
            "metadata": {
                "name": "n1",
                "labels": {"nvidia.com/gpu.product": "H100-SXM"},
                "resourceVersion": heartbeat,
            },
            "spec": {"taints": [{"key": "k"}]},
            "status": {
                "allocatable": {"nvidia.com/gpu": "8"},
                "conditions": [{"type": "Ready", "status": "True"}],
                "images": [{"names": ["big"]}],
            },
        }

    store = Store("Node")
    first = store.upsert(node("1"))
    second = store.upsert(node("2"))

    assert first == second
    assert first["spec"] == {"unschedulable": False}
    assert first["status"]["allocatable"] == {"nvidia.com/gpu": "8"}
    assert "images" not in first["status"]
    assert store.get("", "n1") == first


# -- events ----------------------------------------------------------------------------------------

OBJ: dict[str, Any] = {
    "apiVersion": "kleave.dev/v1alpha1",
    "kind": "InferencePool",
    "metadata": {"name": "llm-decode", "namespace": "ns", "uid": "u1", "resourceVersion": "42"},
}


def test_event_name_is_stable_per_object_reason_and_message() -> None:
    name = event_name(OBJ, "Unschedulable", "m")

    assert name == event_name(OBJ, "Unschedulable", "m")
    assert name.startswith("llm-decode.")
    assert len(name.split(".")[1]) == 16
    assert name != event_name(OBJ, "Unschedulable", "other")
    assert name != event_name(OBJ, "NoNodesForGPUType", "m")
    other_uid = OBJ | {"metadata": OBJ["metadata"] | {"uid": "u2"}}
    assert name != event_name(other_uid, "Unschedulable", "m")


def test_event_name_fits_the_name_limit_for_long_object_names() -> None:
    long_obj = OBJ | {"metadata": OBJ["metadata"] | {"name": "x" * 253}}

    assert len(event_name(long_obj, "R", "m")) <= 253


def test_build_event_describes_the_object() -> None:
    event = build_event(OBJ, "Warning", "Unschedulable", "no GPUs", NOW)

    assert event["metadata"] == {
        "name": event_name(OBJ, "Unschedulable", "no GPUs"),
        "namespace": "ns",
    }
    assert event["involvedObject"] == {
        "apiVersion": "kleave.dev/v1alpha1",
        "kind": "InferencePool",
        "name": "llm-decode",
        "namespace": "ns",
        "uid": "u1",
        "resourceVersion": "42",
    }
    assert (event["type"], event["reason"], event["message"]) == (
        "Warning",
        "Unschedulable",
        "no GPUs",
    )
    assert event["count"] == 1
    assert event["firstTimestamp"] == event["lastTimestamp"] == "2026-11-01T12:00:00Z"
    assert event["source"]["component"] == event["reportingComponent"] == "kleave-operator"


def test_build_event_truncates_long_messages() -> None:
    event = build_event(OBJ, "Normal", "R", "y" * 5000, NOW)

    assert len(event["message"]) == 1000
    assert event["message"].endswith("…")
    assert event["metadata"]["name"] == event_name(OBJ, "R", event["message"])


def test_store_label_index_follows_relabels_and_removals() -> None:
    store = Store("Pod", index_label="kleave.dev/inference-pool")

    def pod(name: str, pool: str, namespace: str = "ns") -> dict[str, Any]:
        labels = {"kleave.dev/inference-pool": pool}
        return {"metadata": {"name": name, "namespace": namespace, "labels": labels}}

    store.upsert(pod("a", "p1"))
    store.upsert(pod("b", "p1"))
    store.upsert(pod("c", "p1", namespace="other"))
    assert [p["metadata"]["name"] for p in store.labelled("ns", "p1")] == ["a", "b"]
    store.upsert(pod("b", "p2"))  # relabelled: leaves p1's index
    assert [p["metadata"]["name"] for p in store.labelled("ns", "p1")] == ["a"]
    store.remove(pod("a", "p1"))
    assert store.labelled("ns", "p1") == []
    assert [p["metadata"]["name"] for p in store.labelled("ns", "p2")] == ["b"]
