"""Leader election with a ``coordination.k8s.io/v1`` Lease, as client-go's ``leaderelection``.

kopf's peering pauses replicas by priority; it does not elect one: replicas with equal
priorities all pause. With ``--leader-elect`` every replica competes for one Lease and only
its holder runs kopf, so a Deployment with several replicas has exactly one active reconciler
and a warm standby.

The module has two halves:

* :func:`decide` and :func:`release_spec`: pure functions from a Lease spec, our identity and
  the time to the spec to write. They hold every rule (expiry, transitions, acquire times)
  and are tested without a cluster.
* :class:`LeaderElector`: the I/O loop around them. It writes with optimistic concurrency (a
  PUT carrying the ``resourceVersion`` it read, and a create that fails when the Lease exists),
  so two candidates never both win one round.

Safety rests on the timing, as in client-go: the leader stops leading once it has failed to
renew for ``renew_deadline_s``, and a candidate waits ``lease_duration_s`` from the moment it
last saw the record change (its own clock, so clock skew between nodes does not matter) before
it takes over; the gap between the two is the margin for the old leader to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import random
import re
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from kubernetes import client

from kleave.operator.metrics import LEADER

logger = logging.getLogger("kleave.operator.leader")

DEFAULT_LEASE_NAME = "kleave-operator"
DEFAULT_LEASE_DURATION_S = 15
DEFAULT_RENEW_DEADLINE_S = 10.0
DEFAULT_RETRY_PERIOD_S = 2.0
# client-go's JitterFactor: acquire attempts are spread so standbys do not retry in lockstep,
# and the renew deadline must leave room for at least one jittered retry.
JITTER_FACTOR = 1.2
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

LEASE_GROUP = "coordination.k8s.io"
LEASE_VERSION = "v1"
LEASE_PLURAL = "leases"
FIELD_MANAGER = "kleave"
_SPEC_FIELDS = (
    "holderIdentity",
    "leaseDurationSeconds",
    "acquireTime",
    "renewTime",
    "leaseTransitions",
)

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class LostLeadership(RuntimeError):  # noqa: N818 (client-go and controller-runtime name)
    """The leader could not renew its Lease in time, or another candidate holds it now.

    The leader's work has been stopped; the process should exit non-zero so that the pod
    restarts as a fresh candidate (controller-runtime does the same).
    """


# ----- the pure part ---------------------------------------------------------------------------


def format_micro_time(moment: datetime) -> str:
    """A Kubernetes MicroTime: RFC 3339 in UTC with exactly six fractional digits.

    The API server parses MicroTime with a fixed layout, so ``datetime.isoformat()`` (which
    drops the fraction when it is zero and writes ``+00:00``) is rejected now and then.
    """
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_micro_time(value: Any) -> datetime | None:
    """Parse a MicroTime (or any RFC 3339 time, or a datetime); naive values are taken as UTC."""
    if value is None or value == "":
        return None
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class LeaseSpec:
    """The fields of a Lease's ``spec`` that leader election reads and writes."""

    holder_identity: str | None = None
    lease_duration_seconds: int | None = None
    acquire_time: datetime | None = None
    renew_time: datetime | None = None
    lease_transitions: int | None = None

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any] | None) -> LeaseSpec:
        """From the API's JSON (camelCase keys, MicroTime strings); an empty holder is none."""
        spec = spec or {}
        duration = spec.get("leaseDurationSeconds")
        transitions = spec.get("leaseTransitions")
        return cls(
            holder_identity=spec.get("holderIdentity") or None,
            lease_duration_seconds=int(duration) if duration is not None else None,
            acquire_time=parse_micro_time(spec.get("acquireTime")),
            renew_time=parse_micro_time(spec.get("renewTime")),
            lease_transitions=int(transitions) if transitions is not None else None,
        )

    def to_dict(self) -> dict[str, Any]:
        """The API's JSON; unset fields are left out, so a PUT clears them."""
        body: dict[str, Any] = {
            "holderIdentity": self.holder_identity,
            "leaseDurationSeconds": self.lease_duration_seconds,
            "acquireTime": format_micro_time(self.acquire_time) if self.acquire_time else None,
            "renewTime": format_micro_time(self.renew_time) if self.renew_time else None,
            "leaseTransitions": self.lease_transitions,
        }
        return {key: value for key, value in body.items() if value is not None}


class Action(enum.Enum):
    """What a candidate does with the Lease this round."""

    ACQUIRE = "acquire"  # the Lease is missing, free, released or expired: take it
    RENEW = "renew"  # we hold it: extend it
    WAIT = "wait"  # another candidate holds a lease that has not expired


@dataclass(frozen=True)
class Decision:
    """The outcome of :func:`decide`.

    ``spec`` is what to write for ACQUIRE and RENEW, and the current spec for WAIT;
    ``expires_at`` is when the current holder's lease runs out (for WAIT), else None.
    """

    action: Action
    spec: LeaseSpec
    expires_at: datetime | None = None


def decide(
    current: LeaseSpec | None,
    *,
    identity: str,
    now: datetime,
    lease_duration_s: int,
    observed_at: datetime | None = None,
) -> Decision:
    """Decide whether ``identity`` acquires, renews or waits for the Lease, as client-go does.

    ``current`` is None when the Lease does not exist. A lease held by another candidate is
    valid until ``observed_at + leaseDurationSeconds``, where ``observed_at`` is when the caller
    first saw this exact record on its own clock; without it ``renewTime`` is used. A holder
    with neither counts as expired. Taking the lease from anyone else (including from nobody
    after a release) counts one transition; creating it counts none; renewing keeps the
    acquire time and the count.
    """
    if current is None:
        return Decision(
            Action.ACQUIRE,
            LeaseSpec(
                holder_identity=identity,
                lease_duration_seconds=lease_duration_s,
                acquire_time=now,
                renew_time=now,
                lease_transitions=0,
            ),
        )
    transitions = current.lease_transitions or 0
    if current.holder_identity == identity:
        return Decision(
            Action.RENEW,
            replace(
                current,
                lease_duration_seconds=lease_duration_s,
                acquire_time=current.acquire_time or now,
                renew_time=now,
                lease_transitions=transitions,
            ),
        )
    if current.holder_identity:
        since = observed_at or current.renew_time
        if since is not None:
            duration = current.lease_duration_seconds or lease_duration_s
            expires_at = since + timedelta(seconds=duration)
            if now < expires_at:
                return Decision(Action.WAIT, current, expires_at)
    return Decision(
        Action.ACQUIRE,
        LeaseSpec(
            holder_identity=identity,
            lease_duration_seconds=lease_duration_s,
            acquire_time=now,
            renew_time=now,
            lease_transitions=transitions + 1,
        ),
    )


def release_spec(current: LeaseSpec, *, identity: str, now: datetime) -> LeaseSpec | None:
    """The spec that gives the Lease up (client-go's ReleaseOnCancel), or None if not ours.

    No holder and a one-second duration: a standby takes over on its next retry instead of
    waiting out the full lease duration.
    """
    if current.holder_identity != identity:
        return None
    return LeaseSpec(
        holder_identity=None,
        lease_duration_seconds=1,
        acquire_time=now,
        renew_time=now,
        lease_transitions=current.lease_transitions or 0,
    )


def default_identity() -> str:
    """hostname (the pod name in a pod) plus a random suffix, unique per process start."""
    return f"{socket.gethostname()}_{uuid.uuid4()}"


def pod_namespace(path: Path | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The namespace this pod runs in: the service account's file, else ``POD_NAMESPACE``."""
    path = path if path is not None else SERVICE_ACCOUNT_NAMESPACE
    environ = environ if environ is not None else os.environ
    with contextlib.suppress(OSError):
        namespace = path.read_text().strip()
        if namespace:
            return namespace
    return environ.get("POD_NAMESPACE", "").strip() or None


def check_lease_name(namespace: str, name: str) -> None:
    """Raise ValueError unless the API server would accept this namespace and Lease name."""
    if not _DNS_LABEL.match(namespace) or len(namespace) > 63:
        raise ValueError(f"invalid leader-election namespace {namespace!r}: not a DNS label")
    if not _DNS_SUBDOMAIN.match(name) or len(name) > 253:
        raise ValueError(f"invalid leader-election id {name!r}: not a DNS subdomain name")


# ----- the I/O part ----------------------------------------------------------------------------


class _Outcome(enum.Enum):
    LEADING = "leading"  # we hold the Lease after this round
    HELD = "held"  # another candidate holds it
    FAILED = "failed"  # the round did not complete (API error, conflicting write)


class LeaderElector:
    """Compete for a Lease and run the leader's work only while holding it.

    ``api_client`` is a ``kubernetes.client.ApiClient``, or a function returning a new one
    (opened by :meth:`run` and closed when it returns). The client is synchronous, so every
    request runs in a thread.

    The Lease is read and written through the client's generic object API with plain JSON:
    the typed ``CoordinationV1Api`` turns bodies into models and writes their times with
    ``isoformat()``, which the API server rejects as a MicroTime whenever the fraction is zero.

    No asyncio task is created while the leader's work runs: kopf cancels every task started
    after it, and a cancelled renewal would look like a lost lease.
    """

    def __init__(
        self,
        api_client: Any,
        namespace: str,
        name: str,
        identity: str,
        *,
        lease_duration_s: int = DEFAULT_LEASE_DURATION_S,
        renew_deadline_s: float = DEFAULT_RENEW_DEADLINE_S,
        retry_period_s: float = DEFAULT_RETRY_PERIOD_S,
        shutdown_grace_s: float = 30.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if not lease_duration_s > renew_deadline_s > JITTER_FACTOR * retry_period_s > 0:
            raise ValueError(
                "need lease_duration_s > renew_deadline_s > 1.2 * retry_period_s > 0, got "
                f"{lease_duration_s}, {renew_deadline_s}, {retry_period_s}"
            )
        check_lease_name(namespace, name)
        self._api_client = api_client
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_duration_s = int(lease_duration_s)
        self.renew_deadline_s = renew_deadline_s
        self.retry_period_s = retry_period_s
        self.shutdown_grace_s = shutdown_grace_s
        self._clock = clock
        # One request may not use up the renew deadline on its own.
        self._request_timeout = max(1.0, renew_deadline_s / 2)
        self._api: Any = None
        self._observed_version: str | None = None
        self._observed_at: datetime | None = None
        self._holder: str | None = None
        self._last_problem: str | None = None
        self.leading = False

    @property
    def where(self) -> str:
        return f"{self.namespace}/{self.name}"

    async def run(
        self, on_started_leading: Callable[[], Awaitable[object]], stop_event: asyncio.Event
    ) -> None:
        """Wait for the Lease, then run ``on_started_leading()`` while renewing it.

        Returns when ``stop_event`` is set before leadership is won, or when the leader's work
        returns (it is expected to watch ``stop_event`` too; it is cancelled if it has not
        finished ``shutdown_grace_s`` after the event). The Lease is then released. Raises
        :class:`LostLeadership` when renewal fails for ``renew_deadline_s`` or another
        candidate takes the Lease; the work is cancelled first. Errors of the work itself are
        re-raised after the release.
        """
        owned = callable(self._api_client)
        api_client = self._api_client() if owned else self._api_client
        self._api = client.CustomObjectsApi(api_client)
        try:
            if await self._acquire(stop_event):
                await self._lead(on_started_leading, stop_event)
        finally:
            self.leading = False
            LEADER.set(0)
            if owned:
                api_client.close()

    async def _acquire(self, stop_event: asyncio.Event) -> bool:
        logger.info("Waiting to acquire leader lease %s as %s.", self.where, self.identity)
        while not stop_event.is_set():
            outcome = await self._attempt(leading=False)
            if outcome is _Outcome.LEADING:
                if stop_event.is_set():  # stopped while the request was out
                    await self._release()
                    return False
                return True
            delay = self.retry_period_s * random.uniform(1.0, JITTER_FACTOR)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stop_event.wait()
        return False

    async def _lead(
        self, on_started_leading: Callable[[], Awaitable[object]], stop_event: asyncio.Event
    ) -> None:
        self.leading = True
        LEADER.set(1)
        logger.info("Became leader: holding lease %s as %s.", self.where, self.identity)

        async def work() -> None:
            await on_started_leading()

        task = asyncio.create_task(work(), name=f"leader work ({self.name})")
        renewed = time.monotonic()
        stopping_since: float | None = None
        try:
            while not task.done():
                if stop_event.is_set() and not task.cancelling():
                    stopping_since = stopping_since or time.monotonic()
                    if time.monotonic() - stopping_since > self.shutdown_grace_s:
                        logger.warning("The leader's work did not stop in time; cancelling it.")
                        task.cancel()
                deadline = renewed + self.renew_deadline_s
                wait = min(self.retry_period_s, deadline - time.monotonic())
                await asyncio.wait([task], timeout=max(0.0, wait))
                if task.done():
                    break
                outcome = _Outcome.FAILED
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                        outcome = await self._attempt(leading=True)
                if outcome is _Outcome.LEADING:
                    renewed = time.monotonic()
                elif outcome is _Outcome.HELD:
                    raise LostLeadership(
                        f"lost leadership of lease {self.where}: someone else wrote it "
                        f"(holder now: {self._holder or 'nobody'})"
                    )
                elif time.monotonic() >= deadline:
                    raise LostLeadership(
                        f"lost leadership of lease {self.where}: could not renew it for "
                        f"{self.renew_deadline_s:g}s ({self._last_problem or 'timed out'})"
                    )
        except LostLeadership as error:
            self.leading = False
            LEADER.set(0)
            logger.error("%s; stopping the leader's work.", error)
            task.cancel()
            # The new leader may already be working: stop within the lease margin, then go.
            margin = max(1.0, self.lease_duration_s - self.renew_deadline_s)
            await asyncio.wait([task], timeout=margin)
            raise
        except BaseException:
            task.cancel()  # the elector itself is cancelled: never leave the work running
            raise

        self.leading = False
        LEADER.set(0)
        await self._release()
        if not task.cancelled():  # cancelled: by us, after the shutdown grace
            task.result()  # re-raise the work's own error, if any

    async def _attempt(self, *, leading: bool) -> _Outcome:
        """One client-go ``tryAcquireOrRenew``; logs problems once each, never raises them."""
        try:
            outcome = await self._try_acquire_or_renew(leading=leading)
        except client.ApiException as error:
            self._problem(f"HTTP {error.status} {error.reason}".strip())
            return _Outcome.FAILED
        except Exception as error:  # network, TLS, timeouts: retried until the deadline
            self._problem(" ".join(str(error).split())[:300] or type(error).__name__)
            return _Outcome.FAILED
        self._last_problem = None
        return outcome

    def _problem(self, text: str) -> None:
        if text != self._last_problem:
            logger.warning("Leader lease %s: %s (retrying).", self.where, text)
        self._last_problem = text

    async def _try_acquire_or_renew(self, *, leading: bool) -> _Outcome:
        now = self._clock()
        lease = await self._get()
        if lease is None:
            # Missing (or deleted while we lead, which client-go also answers by re-creating
            # it): a create fails with 409 when another candidate got there first.
            decision = decide(
                None, identity=self.identity, now=now, lease_duration_s=self.lease_duration_s
            )
            body = self._body({"name": self.name, "namespace": self.namespace}, decision.spec)
            try:
                created = await self._call(
                    self._api.create_namespaced_custom_object,
                    LEASE_GROUP, LEASE_VERSION, self.namespace, LEASE_PLURAL, body,
                    field_manager=FIELD_MANAGER,
                )  # fmt: skip
            except client.ApiException as error:
                if error.status == 409:
                    self._problem("another candidate created the lease first")
                    return _Outcome.FAILED
                raise
            self._observe(created, now)
            self._holder = self.identity
            return _Outcome.LEADING

        self._observe(lease, now)
        current = LeaseSpec.from_dict(lease.get("spec"))
        decision = decide(
            current,
            identity=self.identity,
            now=now,
            lease_duration_s=self.lease_duration_s,
            observed_at=self._observed_at,
        )
        # While leading, a record that is not ours (another holder, or a release we did not
        # make) means someone else wrote the Lease: treat it as lost, never take it back.
        if decision.action is Action.WAIT or (leading and decision.action is not Action.RENEW):
            if self._holder != current.holder_identity:
                logger.info(
                    "Leader lease %s is held by %s.",
                    self.where,
                    current.holder_identity or "nobody",
                )
            self._holder = current.holder_identity
            return _Outcome.HELD
        try:
            updated = await self._replace(lease, decision.spec)
        except client.ApiException as error:
            if error.status == 409:
                self._problem("the lease changed between reading and writing it (conflict)")
                return _Outcome.FAILED
            raise
        self._observe(updated, now)
        self._holder = self.identity
        return _Outcome.LEADING

    async def _release(self) -> None:
        """Give the Lease up so that a standby takes over at once; failures only cost time."""
        try:
            lease = await self._get()
            if lease is None:
                return
            current = LeaseSpec.from_dict(lease.get("spec"))
            spec = release_spec(current, identity=self.identity, now=self._clock())
            if spec is None:
                return  # not ours (any more): nothing to give up
            await self._replace(lease, spec)
        except Exception as error:
            logger.warning(
                "Could not release leader lease %s (a standby takes over once it expires): %s",
                self.where,
                " ".join(str(error).split())[:300],
            )
            return
        logger.info("Released leader lease %s.", self.where)

    async def _get(self) -> dict[str, Any] | None:
        try:
            lease = await self._call(
                self._api.get_namespaced_custom_object,
                LEASE_GROUP, LEASE_VERSION, self.namespace, LEASE_PLURAL, self.name,
            )  # fmt: skip
        except client.ApiException as error:
            if error.status == 404:
                return None
            raise
        return dict(lease)

    async def _replace(self, lease: Mapping[str, Any], spec: LeaseSpec) -> Any:
        """PUT ``spec`` with the resourceVersion read: 409 if anyone wrote in between."""
        metadata = {k: v for k, v in (lease.get("metadata") or {}).items() if k != "managedFields"}
        body = self._body(metadata, spec, base=lease.get("spec"))
        return await self._call(
            self._api.replace_namespaced_custom_object,
            LEASE_GROUP, LEASE_VERSION, self.namespace, LEASE_PLURAL, self.name, body,
            field_manager=FIELD_MANAGER,
        )  # fmt: skip

    @staticmethod
    def _body(
        metadata: Mapping[str, Any], spec: LeaseSpec, base: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """A Lease manifest; fields of ``base`` that leader election does not own are kept."""
        cleared = dict.fromkeys(_SPEC_FIELDS)  # sent as null: a PUT clears what spec leaves unset
        return {
            "apiVersion": f"{LEASE_GROUP}/{LEASE_VERSION}",
            "kind": "Lease",
            "metadata": dict(metadata),
            "spec": {**(base or {}), **cleared, **spec.to_dict()},
        }

    async def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(
            method, *args, _request_timeout=self._request_timeout, **kwargs
        )

    def _observe(self, lease: Mapping[str, Any], now: datetime) -> None:
        """Note when the record last changed, on our clock (client-go's observedTime)."""
        version = (lease.get("metadata") or {}).get("resourceVersion")
        if version != self._observed_version or self._observed_at is None:
            self._observed_version = version
            self._observed_at = now
