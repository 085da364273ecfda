"""Replay a trace as the metrics of virtual vLLM pods, so the planner can be driven end to end
(Prometheus, PromQL, scaling) without GPUs.

Serving model (a FIFO queue per stage, one service credit per request):

- Stages: *prefill* (role ``prefill``), then *decode* (every other role present: ``decode``, or
  ``attention`` and ``ffn``, which work in lockstep, so the stage has the replicas of its
  smallest role). Without a prefill role, the decode stage also prefills.
- A stage with ``n`` replicas earns ``n * capacity_rps`` credits per second and admits one
  queued request per credit; so the backlog grows exactly when arrivals exceed
  ``capacity * replicas``, and a request waits about ``backlog / (capacity * replicas)``.
  An idle stage banks at most one credit.
- TTFT observed by prefill pods = queue wait + ``base_ttft_s``; by decode pods = their own
  queue wait + ``base_itl_s`` (the first token after the KV arrives), or + ``base_ttft_s``
  when they also prefill. ITL = ``base_itl_s * (1 + utilization)`` (bigger batches step
  slower), observed once per generated token after the first, as vLLM does.
- ``utilization`` is the stage's busy fraction (admitted / capacity), smoothed over ~2 s and
  1 while a backlog exists; it is also the KV-cache usage (a saturated pool's cache is full).
  Running = requests in service (prefill: ``base_ttft_s``; decode: ``osl * itl``); waiting =
  backlog. Gauges are split evenly over the role's pods.
- A stage holds at most ``MAX_BACKLOG`` queued requests; more are rejected (counted in /state).
- Counters count at admission. As in vLLM P/D, a prefill pod counts each request with its
  prompt and one generated token; a decode pod counts it with its prompt and all output.

Rates are wall-clock: trace time runs ``speedup`` times faster, so the pods see
``trace rate * rate_scale * speedup`` requests per second.
"""

from __future__ import annotations

import heapq
import json
import math
import re
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import numpy.typing as npt
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from kleave.traces import RateSeries, RequestTrace

IntArray = npt.NDArray[np.int64]

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
"""vLLM's own bucket bounds, so quantiles interpolate the same way as on real pods."""

PREFILL = "prefill"
UTILIZATION_TAU_S = 2.0
RATE_WINDOW_S = 10.0
MAX_BACKLOG = 100_000
"""Arrivals beyond this backlog are rejected (a router would answer 503), so a pool scaled to
zero under load cannot grow the queue without bound."""


def parse_replicas(text: str) -> dict[str, int]:
    """`prefill=2,decode=3` -> {"prefill": 2, "decode": 3}; ValueError says what is wrong."""
    out: dict[str, int] = {}
    for part in filter(None, (piece.strip() for piece in text.split(","))):
        role, sep, count = part.partition("=")
        role = role.strip()
        if not sep or not role or not count.strip().isdigit():
            raise ValueError(f"{part!r}: expected ROLE=COUNT, e.g. prefill=2,decode=3")
        if role in out:
            raise ValueError(f"role {role!r} given twice")
        out[role] = int(count)
    if not out:
        raise ValueError("expected at least one ROLE=COUNT, e.g. prefill=2,decode=3")
    return out


# ----- arrivals ------------------------------------------------------------------------------
class TraceArrivals:
    """Requests of a trace in trace-time intervals; a rates file becomes Poisson arrivals at
    each window's rate with the window's mean lengths. `rate_scale` thins or copies requests."""

    def __init__(
        self,
        trace: RequestTrace | RateSeries,
        *,
        rate_scale: float = 1.0,
        loop: bool = False,
        rng: np.random.Generator | None = None,
    ) -> None:
        if rate_scale <= 0:
            raise ValueError(f"rate scale must be positive, got {rate_scale}")
        self.trace = trace
        self.rate_scale = rate_scale
        self.loop = loop
        self.rng = rng if rng is not None else np.random.default_rng()
        if isinstance(trace, RequestTrace):
            gap = trace.duration_s / (len(trace) - 1) if trace.duration_s > 0 else 1.0
            # One mean gap after the last request, so a loop does not pile two requests up.
            self.period_s = trace.duration_s + gap
            self._summary = trace.to_rates(RATE_WINDOW_S)
        else:
            self.period_s = trace.duration_s
            self._summary = trace

    def finished(self, t: float) -> bool:
        return not self.loop and t >= self.period_s

    def take(self, t0: float, t1: float) -> tuple[IntArray, IntArray]:
        """Input and output lengths of the requests arriving in trace time [t0, t1)."""
        isl: list[IntArray] = []
        osl: list[IntArray] = []
        for start, end in self._segments(t0, t1):
            a, b = self._take_once(start, end)
            isl.append(a)
            osl.append(b)
        if not isl:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(isl), np.concatenate(osl)

    def target(self, t: float) -> tuple[float, float, float]:
        """(rate in req/s of trace time, mean ISL, mean OSL) at trace time `t`."""
        s = self._summary
        local = t % self.period_s if self.loop else min(t, self.period_s)
        i = min(len(s) - 1, int(local // s.step_s))
        rate = float(s.request_rate[i]) * self.rate_scale if not self.finished(t) else 0.0
        return rate, float(s.mean_input_tokens[i]), float(s.mean_output_tokens[i])

    def _segments(self, t0: float, t1: float) -> Iterator[tuple[float, float]]:
        """[t0, t1) as intervals within one pass of the trace."""
        if not self.loop:
            if t0 < self.period_s:
                yield t0, min(t1, self.period_s)
            return
        cycle = math.floor(t0 / self.period_s)
        while cycle * self.period_s < t1:
            base = cycle * self.period_s
            start, end = max(t0, base) - base, min(t1, base + self.period_s) - base
            if end > start:
                yield start, end
            cycle += 1

    def _take_once(self, t0: float, t1: float) -> tuple[IntArray, IntArray]:
        trace = self.trace
        if isinstance(trace, RequestTrace):
            lo, hi = np.searchsorted(trace.timestamp_s, [t0, t1], side="left")
            isl = trace.input_tokens[lo:hi].astype(np.int64)
            osl = trace.output_tokens[lo:hi].astype(np.int64)
            whole, frac = divmod(self.rate_scale, 1.0)
            copies = int(whole) + (self.rng.random(len(isl)) < frac)
            return np.repeat(isl, copies), np.repeat(osl, copies)
        step = trace.step_s
        first, last = int(t0 // step), min(len(trace) - 1, math.ceil(t1 / step) - 1)
        counts, isl_parts, osl_parts = [], [], []
        for i in range(first, last + 1):
            overlap = min(t1, (i + 1) * step) - max(t0, i * step)
            if overlap <= 0:
                continue
            n = int(self.rng.poisson(trace.request_rate[i] * self.rate_scale * overlap))
            counts.append(n)
            isl_parts.append(max(1, round(float(trace.mean_input_tokens[i]))))
            osl_parts.append(max(1, round(float(trace.mean_output_tokens[i]))))
        return (
            np.repeat(np.array(isl_parts, np.int64), counts),
            np.repeat(np.array(osl_parts, np.int64), counts),
        )


# ----- serving model -------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelParams:
    """Per-replica capacities and unloaded latencies. Defaults: a prefill replica handles about
    20 prompts/s of ~1k tokens (~20k tokens/s); a decode replica completes about 10 requests/s
    (64 sequences at 50 tokens/s with ~300 output tokens each)."""

    prefill_capacity_rps: float = 20.0
    decode_capacity_rps: float = 10.0
    base_ttft_s: float = 0.05
    base_itl_s: float = 0.02


class _Histogram:
    """Cumulative buckets with weighted observations (n tokens of one latency at once)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float, weight: int = 1) -> None:
        if weight <= 0:
            return
        index = next((i for i, bound in enumerate(self.bounds) if value <= bound), -1)
        self.counts[index] += weight
        self.total += value * weight

    def buckets(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            running += count
            out.append((f"{bound:g}", float(running)))
        out.append(("+Inf", float(running + self.counts[-1])))
        return out


@dataclass
class _Pod:
    name: str
    requests: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    ttft: _Histogram = field(default_factory=lambda: _Histogram(TTFT_BUCKETS))
    itl: _Histogram = field(default_factory=lambda: _Histogram(ITL_BUCKETS))


@dataclass
class _Stage:
    capacity_rps: float
    roles: list[str] = field(default_factory=list)
    queue: deque[tuple[float, int, int]] = field(default_factory=deque)  # (enqueued, isl, osl)
    credit: float = 0.0
    utilization: float = 0.0
    in_service: list[float] = field(default_factory=list)  # heap of finish times


class ServingModel:
    """The virtual pods of one deployment and their stages; thread-safe."""

    def __init__(self, params: ModelParams, pod_prefix: str = "loadgen") -> None:
        self.params = params
        self.pod_prefix = pod_prefix
        self.pods: dict[str, list[_Pod]] = {}
        self._serial = 0
        self._next_pod: dict[str, int] = {}
        self.prefill = _Stage(params.prefill_capacity_rps)
        self.decode = _Stage(params.decode_capacity_rps)
        self.rejected = 0
        self.lock = threading.Lock()

    def set_replicas(self, replicas: Mapping[str, int]) -> None:
        """Add pods (new names, fresh counters) or remove the newest, like a ReplicaSet."""
        with self.lock:
            for role in list(self.pods):
                if role not in replicas:
                    del self.pods[role]
            for role, count in replicas.items():
                pods = self.pods.setdefault(role, [])
                while len(pods) > count:
                    pods.pop()
                while len(pods) < count:
                    pods.append(_Pod(f"{self.pod_prefix}-{role}-{self._serial}"))
                    self._serial += 1
            self.prefill.roles = [PREFILL] if PREFILL in self.pods else []
            self.decode.roles = sorted(role for role in self.pods if role != PREFILL)

    def replicas(self) -> dict[str, int]:
        with self.lock:
            return {role: len(pods) for role, pods in self.pods.items()}

    def step(self, now: float, dt: float, isl: Iterable[int], osl: Iterable[int]) -> None:
        """Advance by `dt` seconds: enqueue the arrivals, admit what the credits allow."""
        with self.lock:
            first = self.prefill if self.prefill.roles else self.decode
            for i, o in zip(isl, osl, strict=True):
                self._enqueue(first, (now, int(i), int(o)))
            if self.prefill.roles:
                for _, (enqueued, i, o) in self._admit(self.prefill, dt):
                    self._count(PREFILL, i, 1, ttft=now - enqueued + self.params.base_ttft_s)
                    heapq.heappush(self.prefill.in_service, now + self.params.base_ttft_s)
                    self._enqueue(self.decode, (now, i, o))
            elif self.prefill.queue:  # the prefill role went away: hand its queue on
                self.decode.queue.extend(self.prefill.queue)
                self.prefill.queue.clear()
            first_token = self.params.base_itl_s if self.prefill.roles else self.params.base_ttft_s
            for util, (enqueued, i, o) in self._admit(self.decode, dt):
                itl = self.params.base_itl_s * (1.0 + util)
                for role in self.decode.roles:
                    self._count(role, i, o, ttft=now - enqueued + first_token, itl=itl)
                heapq.heappush(self.decode.in_service, now + o * itl)
            for stage in (self.prefill, self.decode):
                while stage.in_service and stage.in_service[0] <= now:
                    heapq.heappop(stage.in_service)

    def stage_of(self, role: str) -> _Stage:
        return self.prefill if role == PREFILL else self.decode

    def gauges(self) -> dict[str, dict[str, float]]:
        """Per-role totals of waiting, running and KV usage (for /state)."""
        with self.lock:
            out: dict[str, dict[str, float]] = {"waiting": {}, "running": {}, "kv_usage": {}}
            for role in self.pods:
                stage = self.stage_of(role)
                out["waiting"][role] = float(len(stage.queue))
                out["running"][role] = float(len(stage.in_service))
                out["kv_usage"][role] = round(stage.utilization, 4)
            return out

    def _enqueue(self, stage: _Stage, request: tuple[float, int, int]) -> None:
        if len(stage.queue) < MAX_BACKLOG:
            stage.queue.append(request)
        else:
            self.rejected += 1

    def _admit(self, stage: _Stage, dt: float) -> list[tuple[float, tuple[float, int, int]]]:
        """Spend this tick's credits: (utilization at admission, request) per admitted one."""
        replicas = min((len(self.pods.get(role, [])) for role in stage.roles), default=0)
        capacity = replicas * stage.capacity_rps * dt
        stage.credit += capacity
        admitted = []
        while stage.queue and stage.credit >= 1.0:
            stage.credit -= 1.0
            admitted.append((stage.utilization, stage.queue.popleft()))
        if not stage.queue:
            stage.credit = min(stage.credit, 1.0)
        busy = 1.0 if stage.queue else min(1.0, len(admitted) / capacity) if capacity > 0 else 0.0
        alpha = 1.0 - math.exp(-dt / UTILIZATION_TAU_S)
        stage.utilization += alpha * (busy - stage.utilization)
        return admitted

    def _count(
        self, role: str, isl: int, generated: int, *, ttft: float, itl: float | None = None
    ) -> None:
        pods = self.pods.get(role)
        if not pods:
            return
        index = self._next_pod.get(role, 0) % len(pods)
        self._next_pod[role] = index + 1
        pod = pods[index]
        pod.requests += 1
        pod.prompt_tokens += isl
        pod.generation_tokens += generated
        pod.ttft.observe(ttft)
        if itl is not None:
            pod.itl.observe(itl, generated - 1)


class VllmCollector(Collector):
    """Exports a ServingModel under vLLM's metric names, one series set per virtual pod."""

    def __init__(self, model: ServingModel, *, model_name: str, role_label: str) -> None:
        self.model = model
        self.model_name = model_name
        self.role_label = role_label

    def collect(self) -> Iterator[Metric]:
        labels = ["pod", self.role_label, "model_name"]
        counters = {
            "requests": CounterMetricFamily(
                "vllm:request_success", "Finished requests.", labels=[*labels, "finished_reason"]
            ),
            "prompt": CounterMetricFamily(
                "vllm:prompt_tokens", "Prefill tokens processed.", labels=labels
            ),
            "generation": CounterMetricFamily(
                "vllm:generation_tokens", "Generation tokens processed.", labels=labels
            ),
        }
        ttft = HistogramMetricFamily(
            "vllm:time_to_first_token_seconds", "Time to first token.", labels=labels
        )
        itl = HistogramMetricFamily(
            "vllm:inter_token_latency_seconds", "Inter-token latency.", labels=labels
        )
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Queued requests.", labels=labels)
        running = GaugeMetricFamily("vllm:num_requests_running", "Running requests.", labels=labels)
        kv = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV-cache usage (0-1).", labels=labels)
        with self.model.lock:
            for role, pods in self.model.pods.items():
                stage = self.model.stage_of(role)
                for pod in pods:
                    values = [pod.name, role, self.model_name]
                    counters["requests"].add_metric([*values, "stop"], pod.requests)
                    counters["prompt"].add_metric(values, pod.prompt_tokens)
                    counters["generation"].add_metric(values, pod.generation_tokens)
                    ttft.add_metric(values, pod.ttft.buckets(), pod.ttft.total)
                    itl.add_metric(values, pod.itl.buckets(), pod.itl.total)
                    waiting.add_metric(values, len(stage.queue) / len(pods))
                    running.add_metric(values, len(stage.in_service) / len(pods))
                    kv.add_metric(values, stage.utilization)
        yield from (*counters.values(), ttft, itl, waiting, running, kv)


# ----- replica sources -----------------------------------------------------------------------
class ReplicaSource(Protocol):
    """Where the number of virtual pods per role comes from."""

    error: str | None

    def replicas(self) -> dict[str, int] | None: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class StaticReplicas:
    """A fixed `--replicas` map."""

    def __init__(self, replicas: Mapping[str, int]) -> None:
        self._replicas = dict(replicas)
        self.error: str | None = None

    def replicas(self) -> dict[str, int] | None:
        return dict(self._replicas)

    def start(self) -> None:
        return None

    def stop(self) -> None:
        return None


def replicas_from_pools(pools: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Replicas per role from InferencePool objects: ready replicas, else the desired count."""
    out: dict[str, int] = {}
    for pool in pools:
        spec = pool.get("spec") or {}
        status = pool.get("status") or {}
        role = spec.get("role")
        if not role:
            continue
        count = status.get("readyReplicas", spec.get("replicas", 0))
        out[role] = out.get(role, 0) + int(count or 0)
    return out


class InferencePoolReplicas:
    """Follows the InferencePools of one InferenceDeployment, polling every `interval_s`."""

    def __init__(
        self, kubeconfig: Path, namespace: str, deployment: str, interval_s: float = 1.0
    ) -> None:
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.deployment = deployment
        self.interval_s = interval_s
        self.error: str | None = None
        self._latest: dict[str, int] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loadgen-pools", daemon=True)

    def replicas(self) -> dict[str, int] | None:
        return self._latest

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        from kubernetes import client, config

        api_client = config.new_client_from_config(config_file=str(self.kubeconfig))  # type: ignore[no-untyped-call]
        api = client.CustomObjectsApi(api_client)
        selector = f"kleave.dev/inference-deployment={self.deployment}"
        while not self._stop.is_set():
            try:
                listing = api.list_namespaced_custom_object(
                    "kleave.dev",
                    "v1alpha1",
                    self.namespace,
                    "inferencepools",
                    label_selector=selector,
                    _request_timeout=5,
                )
                self._latest = replicas_from_pools(cast(dict[str, Any], listing).get("items", []))
                self.error = None
            except Exception as error:  # keep the last count; report why it is stale
                self.error = (
                    f"cannot list InferencePools {selector} in {self.namespace}: "
                    f"{getattr(error, 'reason', None) or error}"
                )
            self._stop.wait(self.interval_s)


# ----- the process ---------------------------------------------------------------------------
class Loadgen:
    """The replay loop and the HTTP server (`/metrics`, `/healthz`, `/state`), on threads."""

    def __init__(
        self,
        arrivals: TraceArrivals,
        replica_source: ReplicaSource,
        *,
        params: ModelParams | None = None,
        speedup: float = 1.0,
        model_name: str = "kleave-sim",
        role_label: str = "kleave_dev_role",
        pod_prefix: str = "loadgen",
        host: str = "127.0.0.1",
        port: int = 0,
        tick_s: float = 0.1,
    ) -> None:
        if speedup <= 0:
            raise ValueError(f"speedup must be positive, got {speedup}")
        if not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", role_label):
            raise ValueError(f"role label {role_label!r} is not a Prometheus label name")
        self.arrivals = arrivals
        self.replica_source = replica_source
        self.speedup = speedup
        self.tick_s = tick_s
        self.host = host
        self.model = ServingModel(params or ModelParams(), pod_prefix)
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(
            VllmCollector(self.model, model_name=model_name, role_label=role_label)
        )
        self.trace_time_s = 0.0
        self.arrivals_total = 0
        self._recent: deque[tuple[float, int]] = deque()
        self._stop = threading.Event()
        self._server = ThreadingHTTPServer((host, port), _handler(self))
        self._server.daemon_threads = True
        self._threads = [
            threading.Thread(target=self._server.serve_forever, name="loadgen-http", daemon=True),
            threading.Thread(target=self._run, name="loadgen-replay", daemon=True),
        ]

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        self.replica_source.start()
        self._sync_replicas()
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._threads[0].is_alive():  # shutdown() waits for serve_forever, so only if it runs
            self._server.shutdown()
        self._server.server_close()
        self.replica_source.stop()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=5)

    def __enter__(self) -> Loadgen:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def state(self) -> dict[str, Any]:
        """What is being replayed now, in wall-clock units (see the module doc)."""
        now = time.monotonic()
        with self.model.lock:
            t = self.trace_time_s
            recent = list(self._recent)
        rate, isl, osl = self.arrivals.target(t)
        span = min(RATE_WINDOW_S, now - recent[0][0]) if recent else 0.0
        return {
            "trace_time_s": round(t, 3),
            "finished": self.arrivals.finished(t),
            "speedup": self.speedup,
            "rate_scale": self.arrivals.rate_scale,
            "target_rate_rps": rate * self.speedup,
            "observed_rate_rps": sum(n for _, n in recent) / span if span > 0 else 0.0,
            "mean_isl": isl,
            "mean_osl": osl,
            "arrivals_total": self.arrivals_total,
            "rejected_total": self.model.rejected,
            "replicas": self.model.replicas(),
            **self.model.gauges(),
            "replica_source_error": self.replica_source.error,
        }

    def _sync_replicas(self) -> None:
        replicas = self.replica_source.replicas()
        if replicas is not None:
            self.model.set_replicas(replicas)

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.tick_s):
            now = time.monotonic()
            dt, last = now - last, now
            self._sync_replicas()
            t0 = self.trace_time_s
            isl, osl = self.arrivals.take(t0, t0 + dt * self.speedup)
            self.model.step(now, dt, isl.tolist(), osl.tolist())
            with self.model.lock:
                self.trace_time_s = t0 + dt * self.speedup
                self.arrivals_total += len(isl)
                self._recent.append((now, len(isl)))
                while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                    self._recent.popleft()


def _handler(loadgen: Loadgen) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, CONTENT_TYPE_LATEST, generate_latest(loadgen.registry))
            elif path == "/healthz":
                self._reply(200, "text/plain", b"ok\n")
            elif path == "/state":
                body = json.dumps(loadgen.state(), sort_keys=True).encode()
                self._reply(200, "application/json", body)
            else:
                self._reply(404, "text/plain", b"not found: try /metrics, /healthz or /state\n")

        def _reply(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return None  # a scrape per second would drown the log

    return Handler
