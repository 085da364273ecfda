"""The Prometheus reader: PromQL it builds, selector checks, and how failures are reported."""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest

from kleave.devcluster.processes import free_ports
from kleave.planner.metrics import (
    MetricsUnavailable,
    PrometheusReader,
    Queries,
    duration,
    validate_selector,
)

SELECTOR = 'namespace="prod",kleave_dev_inference_deployment="llama"'

Reply = tuple[int, Any]  # (status, JSON body or raw bytes)


class StubPrometheus:
    """An HTTP server on 127.0.0.1 answering the query API through `answer(path, params)`."""

    def __init__(self, answer: Callable[[str, dict[str, str]], Reply]) -> None:
        self.answer = answer
        self.requests: list[tuple[str, dict[str, str]]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                params = dict(urllib.parse.parse_qsl(url.query))
                stub.requests.append((url.path, params))
                status, body = stub.answer(url.path, params)
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub() -> Iterator[Callable[[Callable[[str, dict[str, str]], Reply]], StubPrometheus]]:
    servers: list[StubPrometheus] = []

    def make(answer: Callable[[str, dict[str, str]], Reply]) -> StubPrometheus:
        servers.append(StubPrometheus(answer))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def vector(*samples: tuple[dict[str, str], float | str]) -> Reply:
    result = [{"metric": labels, "value": [time.time(), str(value)]} for labels, value in samples]
    return 200, {"status": "success", "data": {"resultType": "vector", "result": result}}


# ----- PromQL construction -----------------------------------------------------------------
def test_selector_accepts_promql_matchers() -> None:
    assert validate_selector("") == []
    assert validate_selector(SELECTOR) == [
        'namespace="prod"',
        'kleave_dev_inference_deployment="llama"',
    ]
    assert validate_selector(" a =~ \"x,y\" , b!~'q', c!=`z`, ") == [
        'a=~"x,y"',
        "b!~'q'",
        "c!=`z`",
    ]


@pytest.mark.parametrize(
    ("selector", "says"),
    [
        ('{namespace="prod"}', "without braces"),
        ('namespace="prod', "unbalanced quotes"),
        ("namespace=prod", 'expected name="value"'),
        ('a="b" c="d"', "expected ','"),
        ('a=="b"', 'expected name="value"'),
        ('1a="b"', 'expected name="value"'),
        ('a="b"}', "without braces"),
    ],
)
def test_selector_rejects_bad_input_clearly(selector: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        validate_selector(selector)


def test_reader_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="braces"):
        PrometheusReader("http://127.0.0.1:9090", "{a='b'}")
    with pytest.raises(ValueError, match="http://host:port"):
        PrometheusReader("127.0.0.1:9090", SELECTOR)
    with pytest.raises(ValueError, match="label name"):
        PrometheusReader("http://127.0.0.1:9090", SELECTOR, role_label="kleave.dev/role")
    with pytest.raises(ValueError, match="engine"):
        PrometheusReader("http://127.0.0.1:9090", SELECTOR, engine="tgi")  # type: ignore[arg-type]


def test_durations() -> None:
    assert duration(10) == "10s"
    assert duration(0.5) == "500ms"
    assert duration(90.25) == "90250ms"
    with pytest.raises(ValueError):
        duration(0)


def test_counter_rate_sums_per_role_and_takes_the_largest_role() -> None:
    q = Queries(SELECTOR, "kleave_dev_role")
    assert q.counter_rate("vllm:request_success_total", "10s") == (
        "max(sum by (kleave_dev_role) (rate(vllm:request_success_total"
        '{namespace="prod",kleave_dev_inference_deployment="llama"}[10s])))'
    )
    isl = q.ratio("vllm:prompt_tokens_total", "10s")
    assert isl.startswith("max(sum by (kleave_dev_role) (rate(vllm:prompt_tokens_total{")
    assert " / max(sum by (kleave_dev_role) (rate(vllm:request_success_total{" in isl


def test_latency_queries_fall_back_to_older_names() -> None:
    q = Queries("", "role")
    tpot = q.quantile(0.9, q.names.tpot, "30s")
    assert tpot == (
        "max(histogram_quantile(0.9, sum by (le, role) "
        "(rate(vllm:inter_token_latency_seconds_bucket[30s])))) or "
        "max(histogram_quantile(0.9, sum by (le, role) "
        "(rate(vllm:time_per_output_token_seconds_bucket[30s]))))"
    )
    mean = q.mean((q.names.ttft,), "30s")
    assert mean == (
        "max(sum by (role) (rate(vllm:time_to_first_token_seconds_sum[30s])) / "
        "sum by (role) (rate(vllm:time_to_first_token_seconds_count[30s])))"
    )
    assert q.per_role("max", q.names.kv_usage) == (
        "max by (role) (vllm:kv_cache_usage_perc) or max by (role) (vllm:gpu_cache_usage_perc)"
    )


def test_role_matchers_are_escaped_and_sglang_has_its_own_names() -> None:
    q = Queries('a="b"', "kleave_dev_role", engine="sglang")
    assert q.series("sglang:num_queue_reqs", 'pre"fill') == (
        'sglang:num_queue_reqs{a="b",kleave_dev_role="pre\\"fill"}'
    )
    assert "sglang:num_requests_total" in q.history("rate", "60s")
    assert "sglang:generation_tokens_total" in q.history("osl", "60s")


# ----- error mapping ------------------------------------------------------------------------
def test_closed_port_is_unreachable_and_names_the_url() -> None:
    url = f"http://127.0.0.1:{free_ports(1)[0]}"
    reader = PrometheusReader(url, SELECTOR, timeout_s=1.0)
    with pytest.raises(MetricsUnavailable) as caught:
        reader.observe(10)
    assert caught.value.reason == "PrometheusUnreachable"
    assert url in caught.value.message
    assert "Connection refused" in caught.value.message
    with pytest.raises(MetricsUnavailable, match="cannot connect"):
        reader.history("rate", duration_s=60, step_s=10)


def test_api_error_is_a_prometheus_error_with_its_text(stub: Any) -> None:
    server = stub(
        lambda path, params: (
            400,
            {"status": "error", "errorType": "bad_data", "error": "parse error: boom"},
        )
    )
    with pytest.raises(MetricsUnavailable) as caught:
        PrometheusReader(server.url, SELECTOR).observe(10)
    assert caught.value.reason == "PrometheusError"
    assert "HTTP 400: bad_data: parse error: boom" in caught.value.message
    assert "vllm:request_success_total" in caught.value.message  # the failing query
    assert server.url in caught.value.message


def test_server_errors_are_not_retried(stub: Any) -> None:
    server = stub(lambda path, params: (503, b"overloaded"))
    with pytest.raises(MetricsUnavailable, match="HTTP 503: overloaded") as caught:
        PrometheusReader(server.url, SELECTOR).observe(10)
    assert caught.value.reason == "PrometheusError"
    assert len(server.requests) == 1


def test_something_that_is_not_prometheus(stub: Any) -> None:
    server = stub(lambda path, params: (200, b"<html>hello</html>"))
    with pytest.raises(MetricsUnavailable) as caught:
        PrometheusReader(server.url, SELECTOR).observe(10)
    assert caught.value.reason == "PrometheusError"


def test_slow_answer_is_unreachable_within_the_timeout(stub: Any) -> None:
    def slow(path: str, params: dict[str, str]) -> Reply:
        time.sleep(1.0)
        return vector()

    server = stub(slow)
    started = time.monotonic()
    with pytest.raises(MetricsUnavailable, match=r"did not answer within 0\.2s") as caught:
        PrometheusReader(server.url, SELECTOR, timeout_s=0.2).observe(10)
    assert caught.value.reason == "PrometheusUnreachable"
    assert time.monotonic() - started < 0.9


def test_empty_request_rate_is_no_series_naming_metric_and_selector(stub: Any) -> None:
    server = stub(lambda path, params: vector())
    with pytest.raises(MetricsUnavailable) as caught:
        PrometheusReader(server.url, SELECTOR).observe(10)
    assert caught.value.reason == "NoSeries"
    assert "vllm:request_success_total" in caught.value.message
    assert SELECTOR in caught.value.message


# ----- parsing answers ----------------------------------------------------------------------
def test_observe_parses_every_quantity(stub: Any) -> None:
    def answer(path: str, params: dict[str, str]) -> Reply:
        query = params["query"]
        if query.startswith("max(sum by (kleave_dev_role) (rate(vllm:prompt_tokens_total"):
            return vector(({}, 512.0))
        if query.startswith("max(sum by (kleave_dev_role) (rate(vllm:generation_tokens_total"):
            return vector(({}, "NaN"))  # 0/0: no requests finished
        if query.startswith("max(sum by (kleave_dev_role) (rate(vllm:request_success_total"):
            return vector(({}, 4.0))
        if "vllm:time_to_first_token_seconds_bucket" in query:
            return vector(({}, 0.25))
        if "vllm:time_to_first_token_seconds_sum" in query:
            return vector(({}, 0.125))
        if "inter_token_latency_seconds" in query:
            return vector()  # no series
        if "num_requests_waiting" in query:
            return vector(({"kleave_dev_role": "prefill"}, 3), ({"kleave_dev_role": "decode"}, 0))
        if "num_requests_running" in query:
            return vector(({}, 7))
        if "kv_cache_usage_perc" in query:
            return vector(({"kleave_dev_role": "decode"}, 0.5), ({"kleave_dev_role": "x"}, "NaN"))
        raise AssertionError(query)

    server = stub(answer)
    load = PrometheusReader(server.url, SELECTOR).observe(30)
    assert load.window_s == 30
    assert load.rate_rps == 4.0
    assert load.mean_isl == 512.0
    assert load.mean_osl is None
    assert load.ttft_p90_s == 0.25
    assert load.ttft_mean_s == 0.125
    assert load.tpot_p90_s is None
    assert load.tpot_mean_s is None
    assert load.waiting == {"prefill": 3.0, "decode": 0.0}
    assert load.running == {"": 7.0}
    assert load.kv_usage == {"decode": 0.5}
    times = {params["time"] for _, params in server.requests}
    assert len(times) == 1  # one instant for every query
    assert all("[30s]" in params["query"] for _, params in server.requests[:7])


def test_history_aligns_points_and_marks_gaps(stub: Any) -> None:
    end = 1_700_000_000.5

    def answer(path: str, params: dict[str, str]) -> Reply:
        assert path == "/api/v1/query_range"
        start = float(params["start"])
        values = [[start, "1"], [start + 20, "3"], [start + 30, "NaN"], [end, "5"]]
        result = [{"metric": {}, "values": values}]
        return 200, {"status": "success", "data": {"resultType": "matrix", "result": result}}

    server = stub(answer)
    history = PrometheusReader(server.url, SELECTOR).history(
        "isl", duration_s=60, step_s=10, end=end
    )
    np.testing.assert_array_equal(history, [1, np.nan, 3, np.nan, np.nan, 5])
    (_, params), *_ = server.requests
    assert float(params["start"]) == end - 50  # exact, not rounded to whole seconds
    assert float(params["end"]) == end
    assert params["step"] == "10"
    assert "vllm:prompt_tokens_total" in params["query"]
    assert "[10s]" in params["query"]


def test_history_without_data_is_all_nan_and_long_ranges_are_split(stub: Any) -> None:
    server = stub(
        lambda path, params: (200, {"status": "success", "data": {"result": []}}),
    )
    history = PrometheusReader(server.url, SELECTOR).history(
        "rate", duration_s=25_000, step_s=1, end=1_700_000_000
    )
    assert history.shape == (25_000,)
    assert np.isnan(history).all()
    assert len(server.requests) == 3
    with pytest.raises(ValueError, match="step"):
        PrometheusReader(server.url, SELECTOR).history("rate", duration_s=5, step_s=10)


def test_role_label_may_be_given_by_position() -> None:
    reader = PrometheusReader("http://127.0.0.1:9090", SELECTOR, "role")
    assert reader.queries.role_label == "role"


def test_peak_history_asks_for_the_highest_burst_rate_per_step(stub: Any) -> None:
    end = 1_700_000_000.0

    def answer(path: str, params: dict[str, str]) -> Reply:
        start = float(params["start"])
        result = [{"metric": {}, "values": [[start, "2"], [end, "9"]]}]
        return 200, {"status": "success", "data": {"resultType": "matrix", "result": result}}

    server = stub(answer)
    reader = PrometheusReader(server.url, SELECTOR)
    peak = reader.peak_history(duration_s=180, step_s=60, burst_s=10, end=end)
    np.testing.assert_array_equal(peak, [2, np.nan, 9])
    (_, params), *_ = server.requests
    query = params["query"]
    assert query.startswith("max_over_time((max(sum by (kleave_dev_role) (rate(")
    assert "vllm:request_success_total" in query and "[10s]" in query
    assert query.endswith("[60s:5s])")
    with pytest.raises(ValueError, match="burst window"):
        reader.peak_history(duration_s=180, step_s=60, burst_s=120)
