"""Leader election: the pure Lease decisions by hand, then the elector's loop on a fake API."""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from kubernetes import client

from kleave.cli import main
from kleave.operator import leader, runtime
from kleave.operator.leader import (
    Action,
    LeaderElector,
    LeaseSpec,
    LostLeadership,
    decide,
    format_micro_time,
    parse_micro_time,
    pod_namespace,
    release_spec,
)
from kleave.operator.metrics import REGISTRY

T0 = datetime(2026, 11, 23, 10, 0, 0, tzinfo=UTC)
ME = "pod-a_1111"
OTHER = "pod-b_2222"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def held_by(holder: str | None, *, renewed: float = 0, transitions: int = 3) -> LeaseSpec:
    return LeaseSpec(
        holder_identity=holder,
        lease_duration_seconds=15,
        acquire_time=at(-100),
        renew_time=at(renewed),
        lease_transitions=transitions,
    )


# ----- decide() --------------------------------------------------------------------------------


def test_a_missing_lease_is_created_with_us_as_holder_and_no_transitions() -> None:
    decision = decide(None, identity=ME, now=T0, lease_duration_s=15)
    assert decision.action is Action.ACQUIRE
    assert decision.spec == LeaseSpec(ME, 15, T0, T0, 0)
    assert decision.spec.to_dict() == {
        "holderIdentity": ME,
        "leaseDurationSeconds": 15,
        "acquireTime": "2026-11-23T10:00:00.000000Z",
        "renewTime": "2026-11-23T10:00:00.000000Z",
        "leaseTransitions": 0,
    }


def test_a_lease_held_by_another_candidate_is_waited_for_until_it_expires() -> None:
    # Renewed at T0 for 15 s: valid at T0+14.999, expired at exactly T0+15 (client-go's rule).
    current = held_by(OTHER, renewed=0)
    waiting = decide(current, identity=ME, now=at(14.999), lease_duration_s=15)
    assert waiting.action is Action.WAIT
    assert waiting.spec == current
    assert waiting.expires_at == at(15)

    taken = decide(current, identity=ME, now=at(15), lease_duration_s=15)
    assert taken.action is Action.ACQUIRE
    assert taken.spec == LeaseSpec(ME, 15, at(15), at(15), 4)  # one more transition


def test_expiry_counts_from_when_we_observed_the_record_not_the_holders_clock() -> None:
    # The holder's clock says it renewed an hour ago (skew); we first saw the record at T0+10.
    current = held_by(OTHER, renewed=-3600)
    assert decide(current, identity=ME, now=at(20), lease_duration_s=15).action is Action.ACQUIRE
    observed = decide(current, identity=ME, now=at(20), lease_duration_s=15, observed_at=at(10))
    assert observed.action is Action.WAIT
    assert observed.expires_at == at(25)


def test_the_holders_lease_duration_wins_over_ours() -> None:
    current = LeaseSpec(OTHER, 60, at(-100), at(0), 1)
    assert decide(current, identity=ME, now=at(30), lease_duration_s=15).action is Action.WAIT
    assert decide(current, identity=ME, now=at(60), lease_duration_s=15).action is Action.ACQUIRE


def test_a_holder_that_never_renewed_counts_as_expired() -> None:
    current = LeaseSpec(holder_identity=OTHER, lease_duration_seconds=15)
    decision = decide(current, identity=ME, now=T0, lease_duration_s=15)
    assert decision.action is Action.ACQUIRE
    assert decision.spec.lease_transitions == 1


def test_renewing_keeps_the_acquire_time_and_the_transition_count() -> None:
    current = held_by(ME, renewed=0, transitions=7)
    decision = decide(current, identity=ME, now=at(2), lease_duration_s=15)
    assert decision.action is Action.RENEW
    assert decision.spec == LeaseSpec(ME, 15, at(-100), at(2), 7)


def test_renewing_even_after_our_own_lease_ran_out() -> None:
    # Nobody took it in between, so it is still ours: no transition.
    decision = decide(held_by(ME, renewed=0), identity=ME, now=at(100), lease_duration_s=15)
    assert decision.action is Action.RENEW
    assert decision.spec.lease_transitions == 3


def test_a_released_lease_is_taken_at_once_and_counts_a_transition() -> None:
    released = release_spec(held_by(OTHER, transitions=5), identity=OTHER, now=at(1))
    assert released == LeaseSpec(None, 1, at(1), at(1), 5)
    decision = decide(released, identity=ME, now=at(1.5), lease_duration_s=15)
    assert decision.action is Action.ACQUIRE
    assert decision.spec == LeaseSpec(ME, 15, at(1.5), at(1.5), 6)


def test_only_the_holder_can_release() -> None:
    assert release_spec(held_by(OTHER), identity=ME, now=T0) is None
    assert release_spec(held_by(ME), identity=ME, now=T0) is not None


def test_lease_json_round_trips_micro_times_and_treats_an_empty_holder_as_none() -> None:
    spec = LeaseSpec.from_dict(
        {
            "holderIdentity": "",
            "leaseDurationSeconds": 1,
            "acquireTime": "2026-11-23T10:00:00.000000Z",
            "renewTime": "2026-11-23T10:00:01.250000Z",
            "leaseTransitions": 2,
        }
    )
    assert spec == LeaseSpec(None, 1, T0, at(1.25), 2)
    assert spec.to_dict()["renewTime"] == "2026-11-23T10:00:01.250000Z"
    assert "holderIdentity" not in spec.to_dict()
    assert LeaseSpec.from_dict(None) == LeaseSpec()
    # Six fraction digits always: isoformat() would drop a zero fraction, which the API rejects.
    assert format_micro_time(datetime(2026, 1, 2, 3, 4, 5)) == "2026-01-02T03:04:05.000000Z"
    assert parse_micro_time("2026-01-02T03:04:05Z") == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_pod_namespace_prefers_the_service_account_file(tmp_path: Path) -> None:
    path = tmp_path / "namespace"
    assert pod_namespace(path, {}) is None
    assert pod_namespace(path, {"POD_NAMESPACE": "from-env"}) == "from-env"
    path.write_text("kleave-system\n")
    assert pod_namespace(path, {"POD_NAMESPACE": "from-env"}) == "kleave-system"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--peering-name", "x"], "--leader-elect replaces kopf peering"),
        (["--peering"], "--leader-elect replaces kopf peering"),
        ([], "pass --leader-election-namespace"),
        (["--leader-election-namespace", "Bad"], "not a DNS label"),
        (["--leader-election-namespace", "ns", "--leader-election-id", "a_b"], "DNS subdomain"),
    ],
)
def test_the_cli_rejects_leader_election_flags_it_cannot_use(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, flags: list[str], message: str
) -> None:
    # Checked before any credentials are loaded or any request is made.
    monkeypatch.setattr(runtime, "configure_logging", lambda *_, **__: None)
    monkeypatch.setattr(leader, "SERVICE_ACCOUNT_NAMESPACE", tmp_path / "absent")
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    objects = logging.getLogger("kopf.objects")
    level = objects.level  # run() quietens it for the process; other tests need it as it was
    try:
        result = CliRunner().invoke(main, ["operator", "run", "-A", "--leader-elect", *flags])
    finally:
        objects.setLevel(level)
    assert result.exit_code == 1
    assert message in result.output


def test_timings_that_cannot_be_safe_are_rejected() -> None:
    with pytest.raises(ValueError, match="lease_duration_s > renew_deadline_s"):
        LeaderElector(None, "default", "x", ME, lease_duration_s=10, renew_deadline_s=10)
    with pytest.raises(ValueError, match="not a DNS subdomain"):
        LeaderElector(None, "default", "Bad_Name", ME)


# ----- the elector's loop, against an in-memory API server --------------------------------------


class FakeLeases:
    """Just enough of CustomObjectsApi for Leases, with the API server's resourceVersion checks."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.version = 0
        self.down = False
        self.lock = threading.Lock()

    def _check(self) -> None:
        if self.down:
            raise client.ApiException(status=503, reason="Service Unavailable")

    def _store(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        stored = copy.deepcopy(body)
        stored["metadata"]["resourceVersion"] = str(self.version)
        stored["spec"] = {k: v for k, v in stored["spec"].items() if v is not None}
        self.objects[(namespace, stored["metadata"]["name"])] = stored
        return copy.deepcopy(stored)

    def get_namespaced_custom_object(self, *args: Any, **_: Any) -> dict[str, Any]:
        _, _, namespace, _, name = args
        with self.lock:
            self._check()
            if (namespace, name) not in self.objects:
                raise client.ApiException(status=404, reason="Not Found")
            return copy.deepcopy(self.objects[(namespace, name)])

    def create_namespaced_custom_object(self, *args: Any, **_: Any) -> dict[str, Any]:
        _, _, namespace, _, body = args
        with self.lock:
            self._check()
            if (namespace, body["metadata"]["name"]) in self.objects:
                raise client.ApiException(status=409, reason="AlreadyExists")
            return self._store(namespace, body)

    def replace_namespaced_custom_object(self, *args: Any, **_: Any) -> dict[str, Any]:
        _, _, namespace, _, name, body = args
        with self.lock:
            self._check()
            current = self.objects[(namespace, name)]
            if body["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
                raise client.ApiException(status=409, reason="Conflict")
            return self._store(namespace, body)

    def holder(self) -> str | None:
        spec: dict[str, Any] = self.objects[("default", "lease")]["spec"]
        return spec.get("holderIdentity")

    def spec(self) -> dict[str, Any]:
        return dict(self.objects[("default", "lease")]["spec"])


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeLeases:
    leases = FakeLeases()
    monkeypatch.setattr(client, "CustomObjectsApi", lambda _client: leases)
    return leases


def elector(identity: str) -> LeaderElector:
    # Fast timings: renew every 0.1 s, give up after 0.5 s, others wait 1 s.
    return LeaderElector(
        object(),
        "default",
        "lease",
        identity,
        lease_duration_s=1,
        renew_deadline_s=0.5,
        retry_period_s=0.1,
        shutdown_grace_s=0.5,
    )


def leader_gauge() -> float | None:
    return REGISTRY.get_sample_value("kleave_leader")


async def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_two_candidates_elect_one_and_the_standby_takes_over_on_release(fake: FakeLeases) -> None:
    async def main() -> None:
        a, b = elector("a"), elector("b")
        stop_a, stop_b = asyncio.Event(), asyncio.Event()
        working: list[str] = []

        def work(name: str, stop: asyncio.Event) -> Any:
            async def run() -> None:
                working.append(name)
                await stop.wait()  # like kopf with its stop_flag
                working.remove(name)

            return run

        task_a = asyncio.create_task(a.run(work("a", stop_a), stop_a))
        await wait_until(lambda: working == ["a"])
        task_b = asyncio.create_task(b.run(work("b", stop_b), stop_b))
        await asyncio.sleep(0.5)  # several rounds of renewing and waiting
        assert working == ["a"] and fake.holder() == "a"
        assert a.leading and not b.leading and leader_gauge() == 1

        stop_a.set()
        await task_a  # released, returned normally
        await wait_until(lambda: working == ["b"], timeout=2)  # at once, not after 1 s
        assert fake.holder() == "b" and fake.spec()["leaseTransitions"] == 1

        stop_b.set()
        await task_b
        assert fake.holder() is None and fake.spec()["leaseDurationSeconds"] == 1
        assert leader_gauge() == 0

    asyncio.run(main())


def test_a_leader_that_cannot_renew_stops_its_work_and_raises(fake: FakeLeases) -> None:
    async def main() -> None:
        a = elector("a")
        cancelled = asyncio.Event()

        async def work() -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise

        task = asyncio.create_task(a.run(work, asyncio.Event()))
        await wait_until(lambda: a.leading)
        fake.down = True
        started = asyncio.get_running_loop().time()
        with pytest.raises(LostLeadership, match=r"could not renew it for 0\.5s"):
            await task
        # Gave up after the renew deadline, before the 1 s lease ran out for the others.
        assert asyncio.get_running_loop().time() - started < 1.0
        assert cancelled.is_set() and leader_gauge() == 0

    asyncio.run(main())


def test_a_leader_whose_lease_was_taken_stops_at_once(fake: FakeLeases) -> None:
    async def main() -> None:
        a = elector("a")
        task = asyncio.create_task(a.run(asyncio.Event().wait, asyncio.Event()))
        await wait_until(lambda: a.leading)
        with fake.lock:
            stolen = fake.objects[("default", "lease")]
            stolen["spec"]["holderIdentity"] = "intruder"
            stolen["metadata"]["resourceVersion"] = "999"
        with pytest.raises(LostLeadership, match="holder now: intruder"):
            await task
        assert fake.holder() == "intruder"  # never taken back, never released

    asyncio.run(main())


def test_a_standby_stops_without_touching_the_lease(fake: FakeLeases) -> None:
    async def main() -> None:
        a, b = elector("a"), elector("b")
        stop_a, stop_b = asyncio.Event(), asyncio.Event()
        task_a = asyncio.create_task(a.run(stop_a.wait, stop_a))
        await wait_until(lambda: a.leading)
        task_b = asyncio.create_task(b.run(stop_b.wait, stop_b))
        await asyncio.sleep(0.3)
        stop_b.set()
        await asyncio.wait_for(task_b, timeout=1)
        assert fake.holder() == "a" and a.leading
        stop_a.set()
        await task_a

    asyncio.run(main())


def test_work_that_ignores_the_stop_event_is_cancelled_after_the_grace(fake: FakeLeases) -> None:
    async def main() -> None:
        a = elector("a")
        stop = asyncio.Event()
        task = asyncio.create_task(a.run(asyncio.Event().wait, stop))
        await wait_until(lambda: a.leading)
        stop.set()
        await asyncio.wait_for(task, timeout=3)  # a shutdown all the same: no error
        assert fake.holder() is None  # released all the same

    asyncio.run(main())
