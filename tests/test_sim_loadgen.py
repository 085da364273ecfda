"""The load generator: trace replay, the serving model, its metrics and its CLI."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kleave.sim.loadgen import (
    InferencePoolReplicas,
    Loadgen,
    ModelParams,
    ServingModel,
    StaticReplicas,
    TraceArrivals,
    VllmCollector,
    parse_replicas,
    replicas_from_pools,
)
from kleave.sim.loadgen_cli import loadgen
from kleave.traces import read_trace

RATES_HEADER = "window_start_s,window_s,request_rate,mean_input_tokens,mean_output_tokens\n"


def requests_trace(tmp_path: Path) -> Path:
    path = tmp_path / "requests.csv"
    rows = [f"{t:.1f},{100 + t:.0f},{10 + t:.0f}" for t in range(10)]  # one per second
    path.write_text("timestamp_s,input_tokens,output_tokens\n" + "\n".join(rows) + "\n")
    return path


def rates_trace(tmp_path: Path, rate: float = 20.0) -> Path:
    path = tmp_path / "rates.csv"
    path.write_text(RATES_HEADER + f"0,60,{rate},500.4,99.6\n60,60,{rate / 2},300,50\n")
    return path


def test_parse_replicas() -> None:
    assert parse_replicas("prefill=2, decode=3") == {"prefill": 2, "decode": 3}
    assert parse_replicas("decode=0") == {"decode": 0}
    for bad in ("", "prefill", "prefill=x", "prefill=-1", "prefill=1,prefill=2", "=2"):
        with pytest.raises(ValueError):
            parse_replicas(bad)


def test_request_trace_replay_scales_and_loops(tmp_path: Path) -> None:
    trace = read_trace(requests_trace(tmp_path))
    arrivals = TraceArrivals(trace, rng=np.random.default_rng(0))
    isl, osl = arrivals.take(0.0, 3.0)
    assert isl.tolist() == [100, 101, 102]
    assert osl.tolist() == [10, 11, 12]
    assert len(arrivals.take(9.0, 100.0)[0]) == 1
    assert arrivals.finished(10.5)
    assert len(arrivals.take(10.5, 20.0)[0]) == 0

    doubled = TraceArrivals(trace, rate_scale=2.0)
    assert doubled.take(0.0, 3.0)[0].tolist() == [100, 100, 101, 101, 102, 102]

    looped = TraceArrivals(trace, loop=True)
    assert looped.period_s == 10.0  # nine seconds of requests plus one mean gap
    assert not looped.finished(1e6)
    assert looped.take(9.5, 12.5)[0].tolist() == [100, 101, 102]  # wraps to the start
    assert len(looped.take(0.0, 50.0)[0]) == 50


def test_rate_trace_becomes_poisson_arrivals_with_window_means(tmp_path: Path) -> None:
    trace = read_trace(rates_trace(tmp_path))
    arrivals = TraceArrivals(trace, rate_scale=0.5, rng=np.random.default_rng(1))
    counts = [len(arrivals.take(t, t + 1.0)[0]) for t in range(60)]
    assert 10 * 60 * 0.85 < sum(counts) < 10 * 60 * 1.15
    isl, osl = arrivals.take(0.0, 10.0)
    assert set(isl.tolist()) == {500}
    assert set(osl.tolist()) == {100}
    assert set(arrivals.take(60.0, 70.0)[0].tolist()) <= {300}
    assert arrivals.target(61.0) == (5.0, 300.0, 50.0)
    assert arrivals.finished(120.0)
    assert arrivals.target(130.0)[0] == 0.0


def drive(
    model: ServingModel, seconds: float, rate: float, start: float = 0.0, dt: float = 0.1
) -> float:
    """Feed `rate` requests/s of (isl 100, osl 10) for `seconds`; return the end time."""
    now, carry = start, 0.0
    for _ in range(round(seconds / dt)):
        now += dt
        carry += rate * dt
        n = int(carry)
        carry -= n
        model.step(now, dt, [100] * n, [10] * n)
    return now


def test_backlog_grows_only_beyond_capacity() -> None:
    model = ServingModel(ModelParams(prefill_capacity_rps=5.0, decode_capacity_rps=100.0))
    model.set_replicas({"prefill": 2, "decode": 1})
    now = drive(model, 5.0, rate=8.0)  # below 2 x 5
    assert model.gauges()["waiting"]["prefill"] <= 1
    now = drive(model, 5.0, rate=20.0, start=now)  # twice the capacity: 10 extra per second
    waiting = model.gauges()["waiting"]["prefill"]
    assert 40 <= waiting <= 60
    assert model.gauges()["kv_usage"]["prefill"] > 0.8
    pods = model.pods["prefill"]
    ttft = [pod.ttft.total / max(1, sum(pod.ttft.counts)) for pod in pods]
    assert max(ttft) > 0.5  # queueing shows in TTFT
    model.set_replicas({"prefill": 6, "decode": 1})
    drive(model, 6.0, rate=20.0, start=now)  # 30/s against 20/s drains 50 in 5 s
    assert model.gauges()["waiting"]["prefill"] == 0  # more replicas drain the backlog


def test_decode_stage_is_limited_by_its_smallest_role() -> None:
    model = ServingModel(ModelParams(prefill_capacity_rps=100.0, decode_capacity_rps=5.0))
    model.set_replicas({"prefill": 1, "attention": 4, "ffn": 1})
    drive(model, 4.0, rate=10.0)
    gauges = model.gauges()
    assert gauges["waiting"]["attention"] == gauges["waiting"]["ffn"] > 10
    assert gauges["waiting"]["prefill"] == 0


def test_scaling_replaces_pods_like_a_replicaset() -> None:
    model = ServingModel(ModelParams(), pod_prefix="llama")
    model.set_replicas({"prefill": 2, "decode": 1})
    assert [pod.name for pod in model.pods["prefill"]] == ["llama-prefill-0", "llama-prefill-1"]
    drive(model, 1.0, rate=10.0)
    model.set_replicas({"prefill": 1})
    assert "decode" not in model.pods
    model.set_replicas({"prefill": 2, "decode": 1})
    assert [pod.name for pod in model.pods["prefill"]] == ["llama-prefill-0", "llama-prefill-3"]
    assert model.pods["prefill"][1].requests == 0  # a new pod starts its counters at zero


def test_metrics_use_vllm_names_and_pod_labels() -> None:
    model = ServingModel(ModelParams())
    model.set_replicas({"prefill": 1, "decode": 2})
    drive(model, 2.0, rate=10.0)
    collector = VllmCollector(model, model_name="m", role_label="kleave_dev_role")
    registry = CollectorRegistry()
    registry.register(collector)
    families = {
        f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())
    }
    for name in (
        "vllm:request_success",
        "vllm:prompt_tokens",
        "vllm:generation_tokens",
        "vllm:time_to_first_token_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
    ):
        assert name in families, name
    success = [s for s in families["vllm:request_success"].samples if s.name.endswith("_total")]
    assert {s.labels["kleave_dev_role"] for s in success} == {"prefill", "decode"}
    assert {s.labels["model_name"] for s in success} == {"m"}
    by_role: dict[str, float] = {}
    for sample in success:
        role = sample.labels["kleave_dev_role"]
        by_role[role] = by_role.get(role, 0.0) + sample.value
    assert by_role["prefill"] == by_role["decode"] == 20  # both roles see every request
    generated = {
        s.labels["pod"]: s.value
        for s in families["vllm:generation_tokens"].samples
        if s.name.endswith("_total")
    }
    assert generated["loadgen-prefill-0"] == 20  # one token per request on prefill pods
    itl_counts = [
        s.value
        for s in families["vllm:inter_token_latency_seconds"].samples
        if s.name.endswith("_count") and s.labels["kleave_dev_role"] == "decode"
    ]
    assert sum(itl_counts) == 20 * 9  # one observation per token after the first


def test_replicas_from_pools_prefers_ready_replicas() -> None:
    pools: list[dict[str, Any]] = [
        {"spec": {"role": "prefill", "replicas": 3}, "status": {"readyReplicas": 2}},
        {"spec": {"role": "decode", "replicas": 4}},
        {"spec": {"role": "attention", "replicas": 1}, "status": {}},
        {"spec": {}},
    ]
    assert replicas_from_pools(pools) == {"prefill": 2, "decode": 4, "attention": 1}


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_http_endpoints(tmp_path: Path) -> None:
    arrivals = TraceArrivals(read_trace(rates_trace(tmp_path)), rng=np.random.default_rng(2))
    with Loadgen(
        arrivals, StaticReplicas({"prefill": 1, "decode": 2}), speedup=2.0, tick_s=0.02
    ) as server:
        assert get(server.url + "/healthz") == (200, b"ok\n")
        status, body = get(server.url + "/state")
        state = json.loads(body)
        assert status == 200
        assert state["replicas"] == {"prefill": 1, "decode": 2}
        assert state["target_rate_rps"] == 40.0  # trace rate x speedup
        assert state["mean_isl"] == 500.4
        status, body = get(server.url + "/metrics")
        assert status == 200
        assert b'vllm:num_requests_waiting{kleave_dev_role="decode"' in body
        assert get(server.url + "/nope")[0] == 404


def test_cli_reports_a_malformed_trace(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text(RATES_HEADER + "0,60,x,1,1\n")
    result = CliRunner().invoke(loadgen, ["--trace", str(bad)])
    assert result.exit_code == 1
    assert result.output.startswith("error: ")
    assert "line 2" in result.output
    result = CliRunner().invoke(loadgen, ["--trace", str(tmp_path / "missing.csv")])
    assert result.exit_code == 1
    assert "cannot read" in result.output


def test_cli_checks_its_replica_options(tmp_path: Path) -> None:
    trace = str(rates_trace(tmp_path))
    result = CliRunner().invoke(loadgen, ["--trace", trace, "--replicas", "prefill"])
    assert result.exit_code == 2
    assert "ROLE=COUNT" in result.output
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("{}")
    result = CliRunner().invoke(loadgen, ["--trace", trace, "--kubeconfig", str(kubeconfig)])
    assert result.exit_code == 2
    assert "--deployment" in result.output


def test_replicas_follow_the_inference_pools(tmp_path: Path) -> None:
    seen: list[str] = []
    pools = {
        "items": [
            {"spec": {"role": "prefill", "replicas": 2}, "status": {"readyReplicas": 1}},
            {"spec": {"role": "decode", "replicas": 3}},
        ]
    }

    class FakeApiserver(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            body = json.dumps(pools).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeApiserver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "c", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}
                ],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "c",
            }
        )
    )
    source = InferencePoolReplicas(kubeconfig, "prod", "llama", interval_s=0.05)
    source.start()
    try:
        deadline = time.monotonic() + 10
        while source.replicas() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert source.replicas() == {"prefill": 1, "decode": 3}
        assert source.error is None
        url = urllib.parse.urlsplit(seen[0])
        assert url.path == "/apis/kleave.dev/v1alpha1/namespaces/prod/inferencepools"
        query = dict(urllib.parse.parse_qsl(url.query))
        assert query["labelSelector"] == "kleave.dev/inference-deployment=llama"
        server.shutdown()
        server.server_close()
        deadline = time.monotonic() + 10
        while source.error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert source.error is not None and "cannot list InferencePools" in source.error
        assert source.replicas() == {"prefill": 1, "decode": 3}  # the last count is kept
    finally:
        source.stop()
