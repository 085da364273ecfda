"""Discrete-event model of P/D serving: the reference the fluid model is checked against.

- Prefill: one central FCFS queue (Dynamo's prefill queue); an idle ready replica pulls the
  head and serves it alone for `service_s(isl)`. A central queue is what least-work routing
  gives too, and lets a replica that just started take queued work at once.
- KV transfer: `kv_transfer_s(isl)` after prefill, then the request waits in a central FCFS
  decode admission queue.
- Decode: continuous batching per replica. A replica admits the queue head when its KV cache
  holds the sequences' prompts and tokens generated so far plus the new prompt, within a
  `KV_WATERMARK` reserve (vLLM's admission rule; preemption is not modelled), and its batch is
  below `max_batch`; the head goes to the ready replica with the most free KV. Every sequence in
  a batch gains one token per step of `step_s(batch, mean context)`, so a replica is simulated
  in "virtual tokens" and only admissions and completions are events. The first token comes
  one step after admission.
- Scaling: a new replica serves after the start-up delay; scale-down cancels starting pods
  first, then drains (no new work; gone when its work is done). GPU time runs from the
  scale-up request until the replica is gone (see `cluster.Pool`).

TTFT = arrival to first token (queue + prefill + transfer + admission + one step); TPOT = time
from the first to the last token over `osl - 1`.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from kleave.planner.capacity import CapacityProfile
from kleave.planner.solver import Slo
from kleave.sim.cluster import ClusterView, Policy, Pool, Replica, RoleView, TickStats
from kleave.sim.metrics import FloatArray, SimResult, Timeline
from kleave.sim.requests import RequestSet

KV_WATERMARK = 0.01
"""Share of KV cache kept free at admission for the growth of running sequences (vLLM)."""

_PREFILL_DONE, _DECODE_JOIN, _DECODE_FINISH, _READY, _TICK = range(5)


@dataclass
class _Decoder:
    replica: Replica
    position: int
    batch: int = 0
    virtual: float = 0.0
    updated_s: float = 0.0
    rate: float = 0.0
    version: int = 0
    prompt_tokens: float = 0.0
    joined_sum: float = 0.0
    finishing: list[tuple[float, int]] = field(default_factory=list)

    def advance(self, now: float) -> None:
        self.virtual += (now - self.updated_s) * self.rate
        self.updated_s = now

    def usage_tokens(self) -> float:
        return self.prompt_tokens + self.batch * self.virtual - self.joined_sum


@dataclass
class _Prefiller:
    replica: Replica
    busy: bool = False


class Engine:
    """One run of one policy over one request set."""

    def __init__(
        self,
        requests: RequestSet,
        profiles: Mapping[str, CapacityProfile],
        slo: Slo,
        policy: Policy,
        *,
        startup_s: float,
        tick_s: float = 10.0,
        gpus: Mapping[str, int] | None = None,
    ) -> None:
        self.req = requests
        self.slo = slo
        self.policy = policy
        self.tick_s = tick_s
        self.horizon = max(requests.duration_s, tick_s)
        pre, dec = profiles["prefill"], profiles["decode"]
        self.curve = dec.decode
        self.kv_limit = dec.decode.kv_capacity_tokens * (1 - KV_WATERMARK)
        self.service = np.asarray(
            pre.prefill.fixed_s
            + pre.prefill.s_per_token * requests.isl
            + pre.prefill.s_per_token2 * requests.isl**2
        )
        self.transfer = requests.isl * pre.kv_bytes_per_token / (pre.kv_link_gbytes_per_s * 1e9)
        gpus = gpus or {}
        self.pools = {
            role: Pool(role, gpus.get(role, profiles[role].gpus), startup_s)
            for role in ("prefill", "decode")
        }
        n = len(requests)
        self.first = np.full(n, math.nan)
        self.finish = np.full(n, math.nan)
        self.joined = np.zeros(n)
        self.events: list[tuple[float, int, int, int, int]] = []
        self.seq = 0
        self.prefill_queue: deque[int] = deque()
        self.decode_queue: deque[int] = deque()
        self.prefillers: list[_Prefiller] = []
        self.idle: list[int] = []
        self.decoders: list[_Decoder] = []
        self.now = 0.0
        self._stats = [0.0] * 8

    # ----- event plumbing ----------------------------------------------------------------------
    def _push(self, t: float, kind: int, a: int = 0, b: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, a, b))

    def _start(self, role: str, replica: Replica) -> None:
        if role == "prefill":
            self.prefillers.append(_Prefiller(replica))
            index = len(self.prefillers) - 1
        else:
            index = len(self.decoders)
            self.decoders.append(_Decoder(replica, index, updated_s=replica.ready_s))
        self._push(replica.ready_s, _READY, 0 if role == "prefill" else 1, index)

    # ----- prefill -----------------------------------------------------------------------------
    def _dispatch_prefill(self) -> None:
        queue, idle = self.prefill_queue, self.idle
        while queue and idle:
            index = idle.pop()
            p = self.prefillers[index]
            if p.busy or not self._serving(p.replica):
                continue
            i = queue.popleft()
            p.busy = True
            self._push(self.now + float(self.service[i]), _PREFILL_DONE, index, i)

    def _prefill_done(self, index: int, i: int) -> None:
        p = self.prefillers[index]
        p.busy = False
        if p.replica.draining:
            p.replica.gone_s = self.now
        else:
            self.idle.append(index)
        self._push(self.now + float(self.transfer[i]), _DECODE_JOIN, i)
        self._dispatch_prefill()

    # ----- decode ------------------------------------------------------------------------------
    def _reschedule(self, d: _Decoder) -> None:
        d.version += 1
        if d.batch == 0:
            d.rate = 0.0
            return
        ctx = d.usage_tokens() / d.batch
        d.rate = 1.0 / self.curve.step_s(d.batch, ctx)
        v_next = d.finishing[0][0]
        delay = max(0.0, v_next - d.virtual) / d.rate
        self._push(self.now + delay, _DECODE_FINISH, d.position, d.version)

    def _admit(self) -> None:
        now = self.now
        queue = self.decode_queue
        isl = self.req.isl
        max_batch = self.curve.max_batch
        while queue:
            i = queue[0]
            need = float(isl[i])
            best: _Decoder | None = None
            best_free = -math.inf
            for d in self.decoders:
                r = d.replica
                if r.draining or r.gone_s is not None or r.ready_s > now or d.batch >= max_batch:
                    continue
                d.advance(now)
                free = self.kv_limit - d.usage_tokens()
                if free >= need and free > best_free:
                    best, best_free = d, free
            if best is None:
                return
            queue.popleft()
            d = best
            heapq.heappush(d.finishing, (d.virtual + float(self.req.osl[i]), i))
            self.joined[i] = d.virtual
            d.batch += 1
            d.prompt_tokens += need
            d.joined_sum += d.virtual
            self.first[i] = now + self.curve.step_s(d.batch, d.usage_tokens() / d.batch)
            s = self._stats
            s[3] += self.first[i] - self.req.arrival_s[i]
            s[4] += 1
            self._reschedule(d)

    def _decode_finish(self, d: _Decoder) -> None:
        now = self.now
        d.advance(now)
        s = self._stats
        while d.finishing and d.finishing[0][0] <= d.virtual + 1e-9:
            _, i = heapq.heappop(d.finishing)
            self.finish[i] = now
            d.batch -= 1
            d.prompt_tokens -= float(self.req.isl[i])
            d.joined_sum -= self.joined[i]
            osl = float(self.req.osl[i])
            tpot = (now - self.first[i]) / (osl - 1) if osl > 1 else 0.0
            s[5] += max(tpot, 0.0)
            s[6] += 1
            s[7] += now - self.req.arrival_s[i]
        if d.batch == 0:
            d.prompt_tokens = d.joined_sum = 0.0
            if d.replica.draining:
                d.replica.gone_s = now
        self._reschedule(d)
        self._admit()

    # ----- scaling -----------------------------------------------------------------------------
    def _scale(self, role: str, target: int) -> None:
        pool = self.pools[role]
        target = max(0, target)
        if target > pool.count():
            for replica in pool.scale_up(target, self.now):
                self._start(role, replica)
            return
        excess = pool.cancel_starting(target, self.now)
        if excess <= 0:
            return
        if role == "prefill":
            candidates = [p for p in self.prefillers if self._serving(p.replica)]
            candidates.sort(key=lambda p: p.busy)
            for p in candidates[:excess]:
                pool.release(p.replica, None if p.busy else self.now)
        else:
            ready = [d for d in self.decoders if self._serving(d.replica)]
            ready.sort(key=lambda d: d.batch)
            for d in ready[:excess]:
                pool.release(d.replica, self.now if d.batch == 0 else None)

    def _serving(self, r: Replica) -> bool:
        return not r.draining and r.gone_s is None and r.ready_s <= self.now

    def _view(self) -> ClusterView:
        now = self.now
        usage = []
        for d in self.decoders:
            if self._serving(d.replica):
                d.advance(now)
                usage.append(d.usage_tokens() / self.curve.kv_capacity_tokens)
        s = self._stats
        stats = TickStats(*s)
        self._stats = [0.0] * 8
        roles = {}
        for role, pool in self.pools.items():
            roles[role] = RoleView(
                replicas=pool.count(),
                ready=pool.ready_count(now),
                waiting=float(len(self.prefill_queue if role == "prefill" else self.decode_queue)),
                kv_usage=(sum(usage) / len(usage) if usage else 0.0) if role == "decode" else None,
                last_change_s=pool.last_change_s,
            )
        return ClusterView(now, self.tick_s, roles, stats)

    # ----- main loop ---------------------------------------------------------------------------
    def run(self) -> SimResult:
        for role, n in self.policy.initial().items():
            pool = self.pools[role]
            for _ in range(n):
                self._start(role, pool.add(0.0, ready_now=True))
        ticks = math.floor(self.horizon / self.tick_s + 1e-9)
        for k in range(1, ticks + 1):
            self._push(k * self.tick_s, _TICK)
        arrivals = self.req.arrival_s
        isl, osl = self.req.isl, self.req.osl
        n = len(arrivals)
        next_arrival = 0
        timeline: dict[str, list[float]] = {"t": [], "arrivals": []}
        for role in self.pools:
            timeline[role] = []
            timeline[role + "_ready"] = []
        tick_arrivals = 0
        events = self.events
        while events or next_arrival < n:
            if next_arrival < n and (not events or arrivals[next_arrival] <= events[0][0]):
                i = next_arrival
                next_arrival += 1
                self.now = float(arrivals[i])
                s = self._stats
                s[0] += 1
                s[1] += isl[i]
                s[2] += osl[i]
                tick_arrivals += 1
                self.prefill_queue.append(i)
                self._dispatch_prefill()
                continue
            t, _, kind, a, b = heapq.heappop(events)
            self.now = t
            if kind == _PREFILL_DONE:
                self._prefill_done(a, b)
            elif kind == _DECODE_JOIN:
                self.decode_queue.append(a)
                self._admit()
            elif kind == _DECODE_FINISH:
                d = self.decoders[a]
                if b == d.version:
                    self._decode_finish(d)
            elif kind == _READY:
                if a == 0:
                    self.idle.append(b)
                    self._dispatch_prefill()
                else:
                    self.decoders[b].updated_s = t
                    self._admit()
            else:
                view = self._view()
                targets = self.policy.decide(view)
                for role, target in (targets or {}).items():
                    self._scale(role, target)
                if targets:
                    self._dispatch_prefill()
                    self._admit()
                timeline["t"].append(t)
                timeline["arrivals"].append(tick_arrivals)
                tick_arrivals = 0
                for role, pool in self.pools.items():
                    timeline[role].append(pool.count())
                    timeline[role + "_ready"].append(pool.ready_count(t))
        return self._result(timeline)

    def _result(self, tl: dict[str, list[float]]) -> SimResult:
        req = self.req
        ttft = self.first - req.arrival_s
        tpot = np.where(req.osl > 1, (self.finish - self.first) / np.maximum(req.osl - 1, 1), 0.0)
        ttft_ok = ttft <= self.slo.ttft_s + 1e-9
        tpot_ok = tpot <= self.slo.tpot_s + 1e-9
        both = ttft_ok & tpot_ok
        t = np.asarray(tl["t"], dtype=np.float64)
        edges = np.concatenate([[0.0], t])
        met, _ = np.histogram(req.arrival_s[both], bins=edges) if len(t) else (np.zeros(0), None)
        ceiling = _ceiling(self, req)
        return SimResult(
            policy=self.policy.name,
            engine="des",
            duration_s=self.horizon,
            gpu_seconds={r: p.gpu_seconds(self.horizon) for r, p in self.pools.items()},
            actions={r: p.actions for r, p in self.pools.items()},
            timeline=Timeline(
                t_s=t,
                arrivals=np.asarray(tl["arrivals"], dtype=np.float64),
                replicas={r: np.asarray(tl[r], dtype=np.float64) for r in self.pools},
                ready={r: np.asarray(tl[r + "_ready"], dtype=np.float64) for r in self.pools},
                met=met.astype(np.float64),
            ),
            ttft_s=ttft,
            tpot_s=tpot,
            weight=np.ones(len(req)),
            requests=float(len(req)),
            ttft_ok=float(np.sum(ttft_ok)),
            tpot_ok=float(np.sum(tpot_ok)),
            both_ok=float(np.sum(both)),
            ceiling=ceiling,
        )


def _ceiling(engine: Engine, req: RequestSet) -> float:
    """Share meeting both targets with no queueing: prefill + transfer + one step alone."""
    curve = engine.curve
    alone_ttft: FloatArray = engine.service + engine.transfer + curve.step_s(1, 0.0)
    alone_tpot = np.asarray(
        curve.step_fixed_s
        + curve.step_per_seq_s
        + (req.isl + req.osl / 2) * curve.step_per_ctx_token_s
    )
    ok = (alone_ttft <= engine.slo.ttft_s) & (alone_tpot <= engine.slo.tpot_s)
    return float(np.mean(ok)) if len(req) else 1.0


def simulate(
    requests: RequestSet,
    profiles: Mapping[str, CapacityProfile],
    slo: Slo,
    policy: Policy,
    *,
    startup_s: float,
    tick_s: float = 10.0,
) -> SimResult:
    """Run `policy` over `requests` in the discrete-event model."""
    return Engine(requests, profiles, slo, policy, startup_s=startup_s, tick_s=tick_s).run()
