"""Read an InferenceDeployment's load from Prometheus: the planner's only view of traffic.

Worker metrics use the engine's own names (vLLM by default, SGLang by table), so real engine
pods and kleave's workers read the same. Choices worth knowing:

- Arrival rate is the rate of the finished-requests counter (``vllm:request_success_total``).
  Engines export no arrival counter; in steady state completions equal arrivals, they lag by
  one request latency, and under overload they undercount, which is why the planner also
  reads the queue gauges.
- In prefill/decode disaggregation both roles may count the same request (vLLM's prefill pod
  sees it with ``max_tokens=1``). Counters are therefore summed per role and the largest role
  wins: ``max(sum by (role) (rate(...)))``. The same rule gives the right answer when only one
  role exports a counter and when pods carry no role label at all (one group).
- Latency quantiles and means are computed per role and the slowest role is reported, so the
  SLO check is conservative and never mixes one role's histogram into another's.
- A quantity whose series are absent or undefined (0/0 with no traffic) is ``None``; only a
  missing request counter is an error (``NoSeries``), because without it nothing is known.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, cast

import numpy as np
import numpy.typing as npt
import requests
from prometheus_api_client.exceptions import PrometheusApiClientException
from prometheus_api_client.prometheus_connect import PrometheusConnect
from urllib3.util.retry import Retry

Engine = Literal["vllm", "sglang"]
Quantity = Literal["rate", "isl", "osl"]

_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_MATCHER = re.compile(
    r"""\s*(?P<name>[a-zA-Z_][a-zA-Z0-9_]*)\s*(?P<op>=~|!~|!=|=)\s*"""
    r"""(?P<value>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|`[^`]*`)\s*"""
)
_MAX_POINTS = 10_000
"""Points per range query; Prometheus refuses more than 11,000 per series."""


@dataclass(frozen=True)
class EngineMetrics:
    """The metric names one engine exports; alternatives are tried in order (newest first)."""

    requests: str
    prompt_tokens: str
    generation_tokens: str
    ttft: str
    tpot: tuple[str, ...]
    waiting: str
    running: str
    kv_usage: tuple[str, ...]


ENGINES: dict[str, EngineMetrics] = {
    "vllm": EngineMetrics(
        requests="vllm:request_success_total",
        prompt_tokens="vllm:prompt_tokens_total",
        generation_tokens="vllm:generation_tokens_total",
        ttft="vllm:time_to_first_token_seconds",
        tpot=("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
        waiting="vllm:num_requests_waiting",
        running="vllm:num_requests_running",
        kv_usage=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    ),
    "sglang": EngineMetrics(
        requests="sglang:num_requests_total",
        prompt_tokens="sglang:prompt_tokens_total",
        generation_tokens="sglang:generation_tokens_total",
        ttft="sglang:time_to_first_token_seconds",
        tpot=("sglang:inter_token_latency_seconds", "sglang:time_per_output_token_seconds"),
        waiting="sglang:num_queue_reqs",
        running="sglang:num_running_reqs",
        kv_usage=("sglang:token_usage",),
    ),
}


class MetricsUnavailable(Exception):  # noqa: N818 - the planner's vocabulary, not an "Error"
    """No load could be read; `reason` is a CamelCase condition reason, `message` says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class ObservedLoad:
    """Load over the last `window_s` seconds; per-role dicts are keyed by the role label value
    ("" for series without one)."""

    window_s: float
    rate_rps: float
    mean_isl: float | None
    mean_osl: float | None
    ttft_p90_s: float | None
    tpot_p90_s: float | None
    ttft_mean_s: float | None
    tpot_mean_s: float | None
    waiting: dict[str, float]
    running: dict[str, float]
    kv_usage: dict[str, float]


def validate_selector(selector: str) -> list[str]:
    """Split PromQL label matchers (no braces) into matchers; ValueError names the problem."""
    text = selector.strip()
    if not text:
        return []
    if text[0] in "{}" or text[-1] in "{}":
        raise ValueError(
            f"selector {selector!r}: give the label matchers without braces, "
            'e.g. namespace="prod",kleave_dev_inference_deployment="llama"'
        )
    matchers: list[str] = []
    position = 0
    while position < len(text):
        match = _MATCHER.match(text, position)
        if match is None:
            rest = text[position:]
            problem = (
                "unbalanced quotes"
                if rest.count('"') % 2 or rest.count("'") % 2
                else 'expected name="value" (operators = != =~ !~, quoted value)'
            )
            raise ValueError(
                f"selector {selector!r}: {problem} at character {position + 1}: {rest[:30]!r}"
            )
        matchers.append(f"{match['name']}{match['op']}{match['value']}")
        position = match.end()
        if position < len(text):
            if text[position] != ",":
                raise ValueError(
                    f"selector {selector!r}: expected ',' between matchers at character "
                    f"{position + 1}: {text[position : position + 30]!r}"
                )
            position += 1  # a trailing comma is valid PromQL
    return matchers


def duration(seconds: float) -> str:
    """A PromQL duration; milliseconds when the value is not whole seconds."""
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"a duration must be a positive number of seconds, got {seconds!r}")
    ms = max(1, round(seconds * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


class Queries:
    """PromQL for one deployment: pure string building, kept apart so it can be tested."""

    def __init__(self, selector: str, role_label: str, engine: Engine = "vllm") -> None:
        if not _LABEL_NAME.fullmatch(role_label):
            raise ValueError(f"role label {role_label!r} is not a Prometheus label name")
        if engine not in ENGINES:
            raise ValueError(f"engine {engine!r}: expected one of {', '.join(ENGINES)}")
        self.matchers = validate_selector(selector)
        self.role_label = role_label
        self.names = ENGINES[engine]

    def series(self, metric: str, role: str | None = None) -> str:
        """`metric{selector[,role="..."]}`."""
        matchers = list(self.matchers)
        if role is not None:
            matchers.append(f'{self.role_label}="{_escape(role)}"')
        return f"{metric}{{{','.join(matchers)}}}" if matchers else metric

    def counter_rate(self, metric: str, window: str) -> str:
        """Per-second rate of a counter, summed per role, largest role (see module doc)."""
        inner = f"rate({self.series(metric)}[{window}])"
        return f"max(sum by ({self.role_label}) ({inner}))"

    def ratio(self, numerator: str, window: str) -> str:
        """Tokens per request: counter rate over the request rate (NaN when no requests)."""
        requests_rate = self.counter_rate(self.names.requests, window)
        return f"{self.counter_rate(numerator, window)} / {requests_rate}"

    def quantile(self, q: float, histograms: tuple[str, ...], window: str) -> str:
        """Per-role histogram quantile, slowest role; older metric names as a fallback."""
        parts = [
            f"max(histogram_quantile({q:g}, sum by (le, {self.role_label}) "
            f"(rate({self.series(name + '_bucket')}[{window}]))))"
            for name in histograms
        ]
        return " or ".join(parts)

    def mean(self, histograms: tuple[str, ...], window: str) -> str:
        """Per-role mean (`_sum` over `_count` rates), slowest role."""
        by = f"sum by ({self.role_label})"
        parts = [
            f"max({by} (rate({self.series(name + '_sum')}[{window}])) / "
            f"{by} (rate({self.series(name + '_count')}[{window}])))"
            for name in histograms
        ]
        return " or ".join(parts)

    def per_role(self, aggregation: str, gauges: tuple[str, ...]) -> str:
        """A gauge aggregated per role (`sum` for queues, `max` for KV usage)."""
        return " or ".join(
            f"{aggregation} by ({self.role_label}) ({self.series(name)})" for name in gauges
        )

    def peak_rate(self, step: str, burst: str, resolution: str) -> str:
        """The highest request rate over `burst`-long windows within each `step`: the bursts
        a pool sized on the step's mean would queue behind (a subquery, so it works on any
        Prometheus without recording rules)."""
        inner = self.counter_rate(self.names.requests, burst)
        return f"max_over_time(({inner})[{step}:{resolution}])"

    def history(self, quantity: Quantity, window: str) -> str:
        if quantity == "rate":
            return self.counter_rate(self.names.requests, window)
        if quantity == "isl":
            return self.ratio(self.names.prompt_tokens, window)
        if quantity == "osl":
            return self.ratio(self.names.generation_tokens, window)
        raise ValueError(f"quantity {quantity!r}: expected rate, isl or osl")


class PrometheusReader:
    """Synchronous reader (the planner calls it from a worker thread)."""

    def __init__(
        self,
        url: str,
        selector: str,
        role_label: str = "kleave_dev_role",
        *,
        timeout_s: float = 5.0,
        engine: Engine = "vllm",
    ) -> None:
        if not re.match(r"https?://[^/\s]+", url):
            raise ValueError(f"Prometheus URL {url!r}: expected http://host:port[/path]")
        if timeout_s <= 0:
            raise ValueError(f"timeout must be positive, got {timeout_s}")
        self.url = url.rstrip("/")
        self.selector = selector
        self.queries = Queries(selector, role_label, engine)
        self.timeout_s = timeout_s
        session = requests.Session()
        # Raise on the response itself, where Prometheus's JSON error is still readable (the
        # client only keeps a repr of the body).
        session.hooks["response"].append(_raise_api_error)
        # One quick reconnect; no retry on status or read (read=False keeps a read timeout a
        # timeout): the planner tries again next interval.
        retry = Retry(total=1, connect=1, read=False, status=0, other=0, backoff_factor=0.1)
        self._client = PrometheusConnect(url=self.url, session=session, retry=retry)

    def observe(self, window_s: float) -> ObservedLoad:
        """Load over the last `window_s` seconds, every query evaluated at the same instant."""
        window = duration(window_s)
        at = time.time()
        q, names = self.queries, self.queries.names
        rate = self._instant(q.counter_rate(names.requests, window), at)
        if not rate:
            raise MetricsUnavailable(
                "NoSeries",
                f"Prometheus at {self.url} has no {names.requests} series matching "
                f"{{{self.selector}}} over the last {window}: check the selector, that "
                "Prometheus scrapes the workers, and that the window spans two scrapes",
            )
        rate_rps = _finite(rate[0][1]) or 0.0
        return ObservedLoad(
            window_s=window_s,
            rate_rps=rate_rps,
            mean_isl=self._scalar(q.ratio(names.prompt_tokens, window), at),
            mean_osl=self._scalar(q.ratio(names.generation_tokens, window), at),
            ttft_p90_s=self._scalar(q.quantile(0.9, (names.ttft,), window), at),
            tpot_p90_s=self._scalar(q.quantile(0.9, names.tpot, window), at),
            ttft_mean_s=self._scalar(q.mean((names.ttft,), window), at),
            tpot_mean_s=self._scalar(q.mean(names.tpot, window), at),
            waiting=self._by_role(q.per_role("sum", (names.waiting,)), at),
            running=self._by_role(q.per_role("sum", (names.running,)), at),
            kv_usage=self._by_role(q.per_role("max", names.kv_usage), at),
        )

    def history(
        self,
        quantity: Quantity,
        *,
        duration_s: float,
        step_s: float,
        end: float | None = None,
    ) -> npt.NDArray[np.float64]:
        """`quantity` at `step_s` resolution over the last `duration_s` seconds before `end`
        (default now), oldest first, each point the average over the step before it. Missing
        points (no data, no requests) are NaN; a deployment without history is all NaN. Each
        point is a rate over `step_s`, so the step must span at least two scrapes."""
        self._check_span(duration_s, step_s)
        return self._series(
            self.queries.history(quantity, duration(step_s)), duration_s, step_s, end
        )

    def peak_history(
        self, *, duration_s: float, step_s: float, burst_s: float, end: float | None = None
    ) -> npt.NDArray[np.float64]:
        """Per step, the highest request rate over any `burst_s` window in it (NaN where
        unknown), on the same points as :meth:`history`. `burst_s` must span two scrapes."""
        self._check_span(duration_s, step_s)
        if not 0 < burst_s <= step_s:
            raise ValueError(f"burst window must be in (0, step], got {burst_s} for step {step_s}")
        query = self.queries.peak_rate(
            duration(step_s), duration(burst_s), duration(max(burst_s / 2, 1.0))
        )
        return self._series(query, duration_s, step_s, end)

    @staticmethod
    def _check_span(duration_s: float, step_s: float) -> None:
        if step_s <= 0 or duration_s < step_s:
            raise ValueError(
                f"history needs 0 < step_s <= duration_s, got step {step_s}, duration {duration_s}"
            )

    def _series(
        self, query: str, duration_s: float, step_s: float, end: float | None
    ) -> npt.NDArray[np.float64]:
        count = int(duration_s // step_s)
        last = time.time() if end is None else end
        first = last - (count - 1) * step_s
        values = np.full(count, np.nan)
        for chunk_start in range(0, count, _MAX_POINTS):
            chunk_end = min(count, chunk_start + _MAX_POINTS) - 1
            start_t, end_t = first + chunk_start * step_s, first + chunk_end * step_s
            for ts, value in self._range(query, start_t, end_t, step_s):
                index = round((ts - first) / step_s)
                if 0 <= index < count:
                    values[index] = value
        return values

    @property
    def _request_timeout(self) -> int:
        # The client annotates int, but hands the value to requests, which takes any float.
        return cast(int, self.timeout_s)

    def _instant(self, query: str, at: float) -> list[tuple[dict[str, str], float]]:
        result = self._call(
            query,
            lambda: self._client.custom_query(
                query, params={"time": at}, timeout=self._request_timeout
            ),
        )
        try:
            return [(item.get("metric", {}), float(item["value"][1])) for item in result]
        except (KeyError, IndexError, TypeError, ValueError) as error:
            raise self._malformed(query, error) from error

    def _scalar(self, query: str, at: float) -> float | None:
        values = [_finite(value) for _, value in self._instant(query, at)]
        present = [value for value in values if value is not None]
        return max(present) if present else None

    def _by_role(self, query: str, at: float) -> dict[str, float]:
        out: dict[str, float] = {}
        for labels, value in self._instant(query, at):
            finite = _finite(value)
            if finite is not None:
                out[labels.get(self.queries.role_label, "")] = finite
        return out

    def _range(
        self, query: str, start: float, end: float, step_s: float
    ) -> list[tuple[float, float]]:
        # The client rounds start/end to whole seconds; the params override them exactly.
        params = {"start": f"{start:.3f}", "end": f"{end:.3f}"}
        result = self._call(
            query,
            lambda: self._client.custom_query_range(
                query,
                start_time=datetime.fromtimestamp(start, UTC),
                end_time=datetime.fromtimestamp(end, UTC),
                step=f"{step_s:g}",
                params=params,
                timeout=self._request_timeout,
            ),
        )
        try:
            return [
                (float(ts), float(value))
                for item in result[:1]
                for ts, value in item["values"]
                if math.isfinite(float(value))
            ]
        except (KeyError, IndexError, TypeError, ValueError) as error:
            raise self._malformed(query, error) from error

    def _call(self, query: str, request: Any) -> Any:
        try:
            return request()
        except _ApiError as error:
            raise MetricsUnavailable(
                "PrometheusError",
                f"Prometheus at {self.url} failed the query `{query}`: {error}",
            ) from error
        except requests.Timeout as error:
            raise MetricsUnavailable(
                "PrometheusUnreachable",
                f"Prometheus at {self.url} did not answer within {self.timeout_s:g}s: "
                "check that it runs and is not overloaded",
            ) from error
        except requests.ConnectionError as error:
            raise MetricsUnavailable(
                "PrometheusUnreachable",
                f"cannot connect to Prometheus at {self.url} ({_root_cause(error)}): "
                "check the URL and that Prometheus is running",
            ) from error
        except (PrometheusApiClientException, requests.RequestException, ValueError) as error:
            # ValueError: a body that is not JSON, i.e. not a Prometheus API at that URL.
            raise MetricsUnavailable(
                "PrometheusError",
                f"Prometheus at {self.url} gave no usable answer to `{query}`: {error}",
            ) from error

    def _malformed(self, query: str, error: Exception) -> MetricsUnavailable:
        return MetricsUnavailable(
            "PrometheusError",
            f"Prometheus at {self.url} answered `{query}` with an unexpected shape ({error!r})",
        )


class _ApiError(Exception):
    """A non-200 answer, with Prometheus's own errorType and error text."""


def _raise_api_error(response: requests.Response, *args: Any, **kwargs: Any) -> None:
    if response.status_code == 200:
        return
    try:
        body = response.json()
        detail = f"{body.get('errorType', 'error')}: {body.get('error', body)}"
    except ValueError:
        detail = response.text.strip()[:200] or response.reason
    raise _ApiError(f"HTTP {response.status_code}: {detail}")


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _root_cause(error: BaseException) -> str:
    """'Connection refused', not three layers of urllib3 repr."""
    text = str(error)
    refused = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if refused:
        return refused.group(1)
    return text.partition("Caused by ")[2][:200] or text[:200]
