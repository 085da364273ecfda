"""Prometheus metrics of the workers and the router, under vLLM's names and buckets.

The planner (kleave/planner/metrics.py) and every dashboard written for vLLM read these names,
so kleave's workers export exactly vLLM's (V1 engine) series: same names, same histogram
buckets, same ``model_name`` and ``engine`` labels, ``finished_reason`` on the success counter.
The pod's role is not a label here: Prometheus adds it from the pod's ``kleave.dev/role`` label
at scrape time, as it does for vLLM pods.

Like vLLM in disaggregated serving, a prefill worker counts each request it serves once (with
one generated token, its first) and a decode worker counts the same request again with all of
its output tokens; the planner sums per role and takes the larger role, so neither double
counts. The router exports only ``kleave:`` series so that summing ``vllm:`` series over a
deployment never counts a request a third time.

One registry per server object, not the process-global default, so tests can run several
servers in one process and every scrape shows only its own server's series.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

__all__ = [
    "CONTENT_TYPE_LATEST",
    "E2E_BUCKETS",
    "ITL_BUCKETS",
    "TTFT_BUCKETS",
    "RouterMetrics",
    "WorkerMetrics",
    "token_buckets",
]

# vLLM v1 (vllm/v1/metrics/loggers.py, PrometheusStatLogger).
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
# Per-layer transfers and exchanges of a small model take micro- to milliseconds.
TRANSFER_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)  # fmt: skip


def token_buckets(max_model_len: int) -> tuple[float, ...]:
    """vLLM's ``build_1_2_5_buckets``: 1, 2, 5, 10, 20, 50, ... up to the context length."""
    buckets: list[float] = []
    base = 1
    while base <= max_model_len:
        for multiplier in (1, 2, 5):
            value = base * multiplier
            if value <= max_model_len:
                buckets.append(float(value))
        base *= 10
    return tuple(buckets)


class WorkerMetrics:
    """The series one worker exports, already bound to its ``model_name``."""

    def __init__(self, model_name: str, *, max_model_len: int, engine: str = "0") -> None:
        self.registry = CollectorRegistry()
        names = ["model_name", "engine"]
        values = (model_name, engine)
        reg = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, names, registry=reg).labels(*values)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, names, registry=reg).labels(*values)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, names, registry=reg, buckets=buckets).labels(*values)

        self.running = gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches."
        )
        self.waiting = gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed."
        )
        self.kv_usage = gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."
        )
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter(
            "vllm:generation_tokens", "Number of generation tokens processed."
        )
        self._success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [*names, "finished_reason"],
            registry=reg,
        )
        self._values = values
        for reason in ("stop", "length", "abort"):
            self._success.labels(*values, reason)  # present at 0 before the first request
        self.ttft = histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            TTFT_BUCKETS,
        )
        self.itl = histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            ITL_BUCKETS,
        )
        self.e2e = histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            E2E_BUCKETS,
        )
        lengths = token_buckets(max_model_len)
        self.request_prompt_tokens = histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", lengths
        )
        self.request_generation_tokens = histogram(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", lengths
        )
        self.prefix_cache_queries = counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
        )
        self.prefix_cache_hits = counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
        )
        self.kv_transfer_bytes = counter(
            "kleave:kv_transfer_bytes", "KV-cache bytes sent (prefill) or received (decode)."
        )
        self.kv_transfer_seconds = histogram(
            "kleave:kv_transfer_seconds",
            "Seconds from the first to the last layer of one request's KV transfer.",
            TRANSFER_BUCKETS,
        )
        self.af_exchange_seconds = histogram(
            "kleave:af_exchange_seconds",
            "Seconds of one attention-to-FFN round trip of one layer (PDAF).",
            TRANSFER_BUCKETS,
        )
        self.preemptions = counter(
            "vllm:num_preemptions", "Cumulative number of preemptions from the engine."
        )

    def request_finished(
        self, *, reason: str, prompt_tokens: int, generation_tokens: int, e2e_s: float
    ) -> None:
        """A request left the engine: vLLM counts it as a success with its finish reason."""
        self._success.labels(*self._values, reason).inc()
        self.request_prompt_tokens.observe(prompt_tokens)
        self.request_generation_tokens.observe(generation_tokens)
        self.e2e.observe(e2e_s)

    def success_count(self, reason: str) -> float:
        """The success counter's value for one finish reason (tests and /v1/info read it)."""
        value = self.registry.get_sample_value(
            "vllm:request_success_total",
            {"model_name": self._values[0], "engine": self._values[1], "finished_reason": reason},
        )
        return value or 0.0

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RouterMetrics:
    """What the router sees: per-worker outstanding requests and outcomes, client latency."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.requests = Counter(
            "kleave:router_requests",
            "Requests the router answered, by endpoint and HTTP status.",
            ["model_name", "endpoint", "status"],
            registry=self.registry,
        )
        self.outstanding = Gauge(
            "kleave:router_outstanding_requests",
            "Requests in flight to each worker (the router's load signal).",
            ["model_name", "role", "worker"],
            registry=self.registry,
        )
        self.worker_errors = Counter(
            "kleave:router_worker_errors",
            "Requests that failed because a worker did not answer or answered an error.",
            ["model_name", "role", "worker"],
            registry=self.registry,
        )
        self.retries = Counter(
            "kleave:router_retries",
            "Requests sent again to other workers after a worker of `role` failed them "
            "before their first token.",
            ["model_name", "role"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "kleave:router_time_to_first_token_seconds",
            "Time to first token as the router's clients see it.",
            ["model_name"],
            registry=self.registry,
            buckets=TTFT_BUCKETS,
        ).labels(model_name)
        self.e2e = Histogram(
            "kleave:router_e2e_request_latency_seconds",
            "End-to-end request latency as the router's clients see it.",
            ["model_name"],
            registry=self.registry,
            buckets=E2E_BUCKETS,
        ).labels(model_name)
        self.prefix_hits = Counter(
            "kleave:router_prefix_affinity",
            "Prefill choices: the prefix's rendezvous worker (hit) or a less busy one (override).",
            ["model_name", "outcome"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
