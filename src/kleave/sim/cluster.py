"""What the simulated cluster shows a policy, and the replica bookkeeping both engines share.

Policies see only what a real planner could read from Prometheus and the API server: per-tick
counters (arrivals, lengths, latencies of requests served) and per-pool gauges (replicas,
waiting requests, KV usage). Both engines fill the same view, so a policy cannot tell which
engine runs it, and GPU time is counted by the same `Pool` code in both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

ROLES = ("prefill", "decode")


@dataclass(frozen=True)
class RoleView:
    replicas: int
    """Replicas asked for and not draining (ready + starting): what `/scale` reports."""
    ready: int
    waiting: float
    """Requests queued for this role (prefill queue; decode admission queue)."""
    kv_usage: float | None
    """Mean KV-cache usage over ready replicas (decode only)."""
    last_change_s: float | None


@dataclass(frozen=True)
class TickStats:
    """Counters over the last tick, as rates of Prometheus counters would give them."""

    arrivals: float = 0.0
    isl_sum: float = 0.0
    osl_sum: float = 0.0
    ttft_sum: float = 0.0
    ttft_n: float = 0.0
    tpot_sum: float = 0.0
    tpot_n: float = 0.0
    duration_sum: float = 0.0
    """Sum of request durations (arrival to last token) of requests finished in the tick."""


@dataclass(frozen=True)
class ClusterView:
    now_s: float
    tick_s: float
    roles: dict[str, RoleView]
    last: TickStats


class Policy(Protocol):
    """A scaling policy: replicas at the start, then targets (or None: hold) every tick."""

    name: str

    def initial(self) -> dict[str, int]: ...

    def decide(self, view: ClusterView) -> dict[str, int] | None: ...


@dataclass
class Replica:
    index: int
    requested_s: float
    ready_s: float
    draining: bool = False
    gone_s: float | None = None


@dataclass
class Pool:
    """Replicas of one role: scale-up starts pods (ready after the start-up delay), scale-down
    cancels pods still starting first (newest first), then drains the ones the engine picks.
    A replica costs GPU time from the scale-up request until it is gone."""

    role: str
    gpus_per_replica: int
    startup_s: float
    replicas: list[Replica] = field(default_factory=list)
    """Every replica ever asked for (GPU time); `_active` holds those not draining or gone,
    so the per-tick counts stay cheap over weeks of scaling."""
    last_change_s: float | None = None
    actions: int = 0
    _active: list[Replica] = field(default_factory=list)

    def add(self, now_s: float, *, ready_now: bool = False) -> Replica:
        ready = now_s if ready_now else now_s + self.startup_s
        replica = Replica(len(self.replicas), now_s, ready)
        self.replicas.append(replica)
        self._active.append(replica)
        return replica

    def active(self) -> list[Replica]:
        """Asked for and not draining or gone."""
        return list(self._active)

    def count(self) -> int:
        return len(self._active)

    def ready_count(self, now_s: float) -> int:
        return sum(1 for r in self._active if r.ready_s <= now_s)

    def release(self, replica: Replica, gone_s: float | None = None) -> None:
        """Take a replica out of service: draining, or gone at `gone_s` when given."""
        replica.draining = True
        if gone_s is not None:
            replica.gone_s = gone_s
        if replica in self._active:
            self._active.remove(replica)

    def scale_up(self, target: int, now_s: float) -> list[Replica]:
        added = [self.add(now_s) for _ in range(target - self.count())]
        if added:
            self.last_change_s = now_s
            self.actions += 1
        return added

    def cancel_starting(self, target: int, now_s: float) -> int:
        """Cancel starting pods, newest first; returns how many ready ones must still go."""
        excess = self.count() - target
        if excess <= 0:
            return 0
        self.last_change_s = now_s
        self.actions += 1
        for replica in sorted(self.active(), key=lambda r: -r.ready_s):
            if excess == 0 or replica.ready_s <= now_s:
                break
            self.release(replica, now_s)
            excess -= 1
        return excess

    def gpu_seconds(self, end_s: float) -> float:
        total = 0.0
        for r in self.replicas:
            gone = end_s if r.gone_s is None else min(r.gone_s, end_s)
            total += max(0.0, gone - r.requested_s)
        return total * self.gpus_per_replica
